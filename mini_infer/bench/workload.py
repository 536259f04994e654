"""The benchmark's requests: prompts of random token ids and the exact output length of each.

The default draw is nano-vllm's bench.py protocol (seed 0, prompt lengths then ids per prompt, then all
output lengths), so runs here and there use the same requests.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NANO_VLLM_TOKEN_ID_MAX = 10000


@dataclass
class Workload:
    """Prompts (token ids) and the exact number of tokens each request must generate."""

    prompts: list[list[int]]
    output_lens: list[int]

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.output_lens[:n])

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    def shape_pairs(self) -> list[tuple[int, int]]:
        return [(len(p), o) for p, o in zip(self.prompts, self.output_lens)]


def make_workload(
    num_prompts: int,
    vocab_size: int,
    seed: int = 0,
    input_len: int | None = None,
    output_len: int | None = None,
    min_input_len: int = 100,
    max_input_len: int = 1024,
    min_output_len: int = 100,
    max_output_len: int = 1024,
) -> Workload:
    """nano-vllm's draw order: each prompt's length then its ids, then all output lengths.

    Ids above the vocabulary (tiny test models) are folded into it, which keeps the random stream and so
    the lengths identical to the full-size workload.
    """
    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        length = input_len if input_len is not None else rng.randint(min_input_len, max_input_len)
        prompts.append([rng.randint(0, NANO_VLLM_TOKEN_ID_MAX) % vocab_size for _ in range(length)])
    output_lens = [
        output_len if output_len is not None else rng.randint(min_output_len, max_output_len)
        for _ in range(num_prompts)
    ]
    return Workload(prompts, output_lens)


# nano-vllm's length ranges; a request can need up to 2048 positions
NANO_VLLM_LENGTHS = {"min_input_len": 100, "max_input_len": 1024, "min_output_len": 100, "max_output_len": 1024}
LENGTH_FLAGS = ("input_len", "output_len", *NANO_VLLM_LENGTHS)


def fit_lengths(settings: dict, max_model_len: int) -> tuple[dict[str, int | None], str | None]:
    """The workload's length settings for a model of `max_model_len` positions, and a note when defaults
    were scaled. Unset ranges take nano-vllm's, scaled by max_model_len / 2048 where the model is
    shorter (stories260K: 25-256 each), so the default run fits every model. Lengths that were set
    and cannot fit raise ValueError naming the flags to change."""
    given = {k: settings.get(k) for k in LENGTH_FLAGS}
    scale = min(1.0, max_model_len / 2048)
    lengths = {
        k: v if v is not None else (max(1, int(NANO_VLLM_LENGTHS[k] * scale)) if k in NANO_VLLM_LENGTHS else None)
        for k, v in given.items()
    }
    note = None
    scaled = [k for k in NANO_VLLM_LENGTHS if given[k] is None and given[k[4:]] is None]  # min_input_len -> input_len
    if scale < 1 and scaled:
        note = (
            f"max_model_len is {max_model_len}: the default lengths are scaled to fit ("
            + ", ".join(f"--{k.replace('_', '-')} {lengths[k]}" for k in scaled)
            + ")"
        )
    for low, high in (("min_input_len", "max_input_len"), ("min_output_len", "max_output_len")):
        if lengths[low] > lengths[high]:
            raise ValueError(
                f"--{low.replace('_', '-')} {lengths[low]} is above --{high.replace('_', '-')} "
                f"{lengths[high]}: lower the first or raise the second"
            )
    longest_in = lengths["input_len"] or lengths["max_input_len"]
    longest_out = lengths["output_len"] or lengths["max_output_len"]
    if longest_in + longest_out > max_model_len:
        in_flag = "--input-len" if lengths["input_len"] else "--max-input-len"
        out_flag = "--output-len" if lengths["output_len"] else "--max-output-len"
        raise ValueError(
            f"the longest request needs {longest_in} prompt + {longest_out} output tokens, more than "
            f"max_model_len {max_model_len}: lower {in_flag} or {out_flag}"
        )
    return lengths, note
