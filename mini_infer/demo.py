"""The built-in demo model: runs with no download and no model files.

It is the `tiny-llama` architecture preset (2 layers, hidden 64) with RANDOM weights and a
byte-level tokenizer built on the spot, so its text is noise. It exists to check an install
end to end; pass `--model` with a real checkpoint for real text.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from mini_infer.model_loader import PRESETS_DIR

SPECIALS = ["<unk>", "<s>", "</s>"]


def _byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def demo_model_dir() -> str:
    """Writes the demo model's config and tokenizer to a temporary folder and returns it."""
    path = Path(tempfile.mkdtemp(prefix="mini-infer-demo-"))
    config = json.loads((PRESETS_DIR / "tiny-llama.json").read_text())
    config["vocab_size"] = len(SPECIALS) + 256
    (path / "config.json").write_text(json.dumps(config))
    _byte_tokenizer().save_pretrained(path)
    return str(path)
