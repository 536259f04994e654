"""Incremental detokenization and stop-string handling.

Decoding a sliding window of ids and diffing it against the window without the newest ids
gives exactly the new text, across byte-fallback tokens and SentencePiece's leading-space rule.
Text that ends in U+FFFD (half of a multi-byte character) is held back until it completes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mini_infer.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"
BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")


@dataclass
class DecodeWindow:
    """Where one sequence's incremental decoding stands: ids[prefix_offset:read_offset] is the context
    already turned into text, ids[read_offset:] what is not yet."""

    prefix_offset: int = 0
    read_offset: int = 0


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

    def new_text(
        self, ids: list[int], window: DecodeWindow, skip_special_tokens: bool = True, flush: bool = False
    ) -> str:
        """The text that ids' newest tokens add; moves the window past what it returns. flush: release
        what is held back too (at the end)."""
        if not flush and ids and ids[-1] in self.byte_token_ids:
            return ""
        prefix_text = self.tokenizer.decode(
            ids[window.prefix_offset : window.read_offset], skip_special_tokens=skip_special_tokens
        )
        full_text = self.tokenizer.decode(ids[window.prefix_offset :], skip_special_tokens=skip_special_tokens)
        if len(full_text) > len(prefix_text) and (flush or not full_text.endswith(REPLACEMENT_CHAR)):
            window.prefix_offset, window.read_offset = window.read_offset, len(ids)
            return full_text[len(prefix_text) :]
        return ""

    def token_texts(self, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
        """One piece per token that joins to exactly decode(ids): each token's piece is the text that
        becomes final with it (a character split over byte tokens goes to the one completing it)."""
        window = DecodeWindow()
        return [
            self.new_text(ids[:end], window, skip_special_tokens, flush=end == len(ids))
            for end in range(1, len(ids) + 1)
        ]

    def next_token_texts(
        self,
        ids: list[int],
        window: DecodeWindow,
        candidates: list[int],
        skip_special_tokens: bool = True,
        end: int | None = None,
    ) -> list[str]:
        """What each candidate would add as the next token after ids[:end], in the context of the text so
        far (so SentencePiece's leading spaces survive); for logprobs' alternatives."""
        context = ids[window.prefix_offset : end]
        base = self.tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
        texts = []
        for token in candidates:
            full = self.tokenizer.decode([*context, token], skip_special_tokens=skip_special_tokens)
            texts.append(full[len(base) :] if full.startswith(base) else self.decode(token))
        return texts


def find_stop_string(text: str, params: SamplingParams, num_new_chars: int) -> tuple[str, int] | None:
    """The first stop string that the last `num_new_chars` characters complete, and where the
    text must be cut (before it, or after it with include_stop_str_in_output)."""
    best: tuple[str, int, int] | None = None
    for stop in params.stop:
        start = max(0, len(text) - num_new_chars - len(stop) + 1)
        pos = text.find(stop, start)
        if pos != -1 and (best is None or pos < best[1]):
            best = (stop, pos, pos + len(stop))
    if best is None:
        return None
    stop, pos, end = best
    return stop, end if params.include_stop_str_in_output else pos


def visible_text(text: str, params: SamplingParams, finished: bool) -> str:
    """The text that may be shown now: while unfinished, a tail that could still grow into a
    stop string is held back, so streamed text never has to be taken back."""
    if finished or not params.stop:
        return text
    hold = 0
    for stop in params.stop:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    return text[: len(text) - hold] if hold else text
