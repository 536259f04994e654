"""Incremental detokenization and stop-string handling.

Decoding a sliding window of ids and diffing it against the window without the newest ids
gives exactly the new text, across byte-fallback tokens and SentencePiece's leading-space rule.
Text that ends in U+FFFD (half of a multi-byte character) is held back until it completes.
"""

from __future__ import annotations

import re

from mini_infer.sequence import Sequence

REPLACEMENT_CHAR = "\ufffd"
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


class Detokenizer:
    """Turns each sequence's newest ids into text.

    SentencePiece byte-fallback tokens (`<0xE6>`) decode as one run: consecutive byte tokens are
    read together as UTF-8, or become one U+FFFD each if invalid. So text is only released, and
    the window only moves, after a token that is not a byte token: windows never split a run,
    and the joined text equals decoding all ids at once, even for invalid byte sequences.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.byte_token_ids = frozenset(i for i, t in enumerate(tokens) if t and BYTE_TOKEN.match(t))
        # No token decodes to more characters than its own spelling has (byte-level BPE spells one byte
        # per character, SentencePiece one character per character), so this bounds text per token.
        self.max_token_chars = max((len(t) for t in tokens if t), default=1)

    def decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def new_text(self, seq: Sequence, flush: bool = False) -> str:
        """The text that the newest generated ids add; advances the sequence's window."""
        text, seq.prefix_offset, seq.read_offset = self._advance(
            seq.output_token_ids, seq.prefix_offset, seq.read_offset, seq.params.skip_special_tokens, flush)
        return text

    def _advance(self, ids: list[int], prefix_offset: int, read_offset: int, skip: bool, flush: bool,
                 end: int | None = None) -> tuple[str, int, int]:
        """(new text, new prefix offset, new read offset) once ids[:end] are known."""
        end = len(ids) if end is None else end
        if not flush and end and ids[end - 1] in self.byte_token_ids:
            return "", prefix_offset, read_offset
        prefix_text = self.tokenizer.decode(ids[prefix_offset:read_offset], skip_special_tokens=skip)
        full_text = self.tokenizer.decode(ids[prefix_offset:end], skip_special_tokens=skip)
        if len(full_text) > len(prefix_text) and (flush or not full_text.endswith(REPLACEMENT_CHAR)):
            return full_text[len(prefix_text) :], read_offset, end
        return "", prefix_offset, read_offset

    def token_texts(self, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
        """One piece per token that joins to exactly decode(ids): each token's piece is the text that
        becomes final with it (a character split over byte tokens goes to the one completing it)."""
        pieces, prefix, read = [], 0, 0
        for end in range(1, len(ids) + 1):
            text, prefix, read = self._advance(ids, prefix, read, skip_special_tokens, end == len(ids), end)
            pieces.append(text)
        return pieces

    def next_token_texts(self, seq: Sequence, candidates: list[int]) -> list[str]:
        """What each candidate would add as the sequence's next token, in the context of its text so far
        (so SentencePiece's leading spaces survive); for logprobs' alternatives."""
        skip = seq.params.skip_special_tokens
        window = seq.output_token_ids[seq.prefix_offset :]
        base = self.tokenizer.decode(window, skip_special_tokens=skip)
        texts = []
        for token in candidates:
            full = self.tokenizer.decode([*window, token], skip_special_tokens=skip)
            texts.append(full[len(base) :] if full.startswith(base) else self.decode(token))
        return texts


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
