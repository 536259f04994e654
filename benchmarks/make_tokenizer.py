"""A stand-in for a real 151k-token tokenizer, for benchmarks whose cost depends on the vocabulary.

No tokenizer of that size can be downloaded here, and a grammar's bitmask fill walks the whole vocabulary
(a JSON row of 151k byte-level BPE tokens took ~135 us on this project's CPU machine, against a few us
for the fixtures' 512). This trains a byte-level BPE of Qwen3's size (151,643 tokens and one special
token) on the Python sources of the running interpreter's site-packages: real-looking merges (words,
indentation, punctuation, digits), not Qwen3's. About 2 minutes on 2 cores.

    python benchmarks/make_tokenizer.py .gpu/bpe151k
    python benchmarks/structured_outputs.py --model qwen3-8b --tokenizer .gpu/bpe151k --output-json ...
"""

from __future__ import annotations

import argparse
import glob
import sysconfig

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir")
    parser.add_argument("--vocab-size", type=int, default=151643)
    args = parser.parse_args()
    files = sorted(glob.glob(f"{sysconfig.get_paths()['purelib']}/**/*.py", recursive=True))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train(files, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(args.output_dir)
    print(f"{tokenizer.get_vocab_size()} tokens from {len(files)} files -> {args.output_dir}")


if __name__ == "__main__":
    main()
