"""Incremental detokenization and stop-string handling.

Decoding a sliding window of ids and diffing it against the window without the newest ids
gives exactly the new text, across byte-fallback tokens and SentencePiece's leading-space rule.
Text that ends in U+FFFD (half of a multi-byte character) is held back until it completes.
"""

from __future__ import annotations

from mini_infer.sequence import Sequence

REPLACEMENT_CHAR = "\ufffd"


def decode_new_text(tokenizer, seq: Sequence, flush: bool = False) -> str:
    """Returns the text that the newest generated ids add, advancing the sequence's offsets."""
    ids = seq.output_token_ids
    skip = seq.params.skip_special_tokens
    prefix_text = tokenizer.decode(ids[seq.prefix_offset : seq.read_offset], skip_special_tokens=skip)
    full_text = tokenizer.decode(ids[seq.prefix_offset :], skip_special_tokens=skip)
    if len(full_text) > len(prefix_text) and (flush or not full_text.endswith(REPLACEMENT_CHAR)):
        new_text = full_text[len(prefix_text) :]
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids)
        return new_text
    return ""


def find_stop_string(seq: Sequence, num_new_chars: int) -> tuple[str, int] | None:
    """The first stop string that the last `num_new_chars` characters complete, and where the
    text must be cut (before it, or after it with include_stop_str_in_output)."""
    text = seq.output_text
    best: tuple[str, int, int] | None = None
    for stop in seq.params.stop:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        pos = text.find(stop, start)
        if pos != -1 and (best is None or pos < best[1]):
            best = (stop, pos, pos + len(stop))
    if best is None:
        return None
    stop, pos, end = best
    return stop, end if seq.params.include_stop_str_in_output else pos


def visible_text(seq: Sequence) -> str:
    """The text that may be shown now: while unfinished, a tail that could still grow into a
    stop string is held back, so streamed text never has to be taken back."""
    text = seq.output_text
    if seq.finish_reason is not None or not seq.params.stop:
        return text
    hold = 0
    for stop in seq.params.stop:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return text[: len(text) - hold] if hold else text
