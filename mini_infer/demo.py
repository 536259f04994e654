"""The built-in demo model: runs with no download and no model files.

It is the `tiny-llama` architecture preset (2 layers, hidden 64) with RANDOM weights and a
character-level tokenizer built on the spot, so its text is random characters. The vocabulary is the
printable ASCII characters and newline only: a byte-level one let random weights pick bytes that are not
UTF-8, which printed as rows of U+FFFD and looked like an encoding bug. It exists to check an install end
to end; pass `--model` with a real checkpoint for real text.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

from mini_infer.model_loader import PRESETS_DIR

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 95 printable characters and "\n"


def _char_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def demo_model_dir() -> str:
    """Writes the demo model's config and tokenizer to a temporary folder and returns it."""
    path = Path(tempfile.mkdtemp(prefix="mini-infer-demo-"))
    config = json.loads((PRESETS_DIR / "tiny-llama.json").read_text())
    config["vocab_size"] = len(SPECIALS) + len(CHARS)
    (path / "config.json").write_text(json.dumps(config))
    _char_tokenizer().save_pretrained(path)
    return str(path)
