"""N-gram proposals (prompt lookup): the tokens that followed the request's latest n-gram the last time
it appeared in its own prompt or output, for the longest n that appeared."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from mini_infer.sequence import Sequence


def propose_ngram(token_ids: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to k draft tokens for what follows token_ids; [] when no suffix of min_n..max_n tokens recurs."""
    if k <= 0 or len(token_ids) <= min_n:
        return []
    tokens = np.asarray(token_ids, dtype=np.int64)
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        windows = sliding_window_view(tokens[:-1], n)  # every earlier n-gram (the suffix itself excluded)
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n  # the latest occurrence: its continuation is the likeliest repeat
            return tokens[start : start + k].tolist()
    return []


class NgramProposer:
    """The scheduler's `propose(seq, k)` for method "ngram": a lookup in the sequence's own tokens."""

    def __init__(self, prompt_lookup_min: int, prompt_lookup_max: int) -> None:
        self.min_n, self.max_n = prompt_lookup_min, prompt_lookup_max

    def __call__(self, seq: Sequence, k: int) -> list[int]:
        return propose_ngram(seq.token_ids, k, self.min_n, self.max_n)
