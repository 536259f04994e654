"""CUDA graphs: forward passes captured by size over static buffers and replayed on new inputs.

Launching the ~15 kernels of each layer one by one from Python costs more host time than a small
step's GPU work, so on CUDA a model's passes replay graphs: decode rows by count, prefill chunks by
token count (padded up to the next captured size), and a pass that mixes both replays one of each.
The target has its graphs, and a speculative proposer's model (a draft model, an EAGLE-3 head) has its
own over the same memory pool; a model's inputs beyond token ids and positions (the head's hidden
states) are static buffers too. Host inputs reach a graph through the same `put(name, array)` the eager
path uses: at capture it makes the static buffer, at replay it copies the step's array into a pinned
staging buffer and from there, without blocking, into the static one; inputs already on the device
(a draft pass's tokens, made by the pass before it) are copied in on the device. Off CUDA (tests of
this path) a "graph" runs the same forward eagerly over the same buffers, into static outputs too.

With enable_lora every size is captured with the LoRA kernels (any mix of adapters replays it), and the
decode sizes a second time without them: a decode batch in which no token has an adapter replays that
one and pays nothing for LoRA. Prefill sizes are not doubled (each graph keeps its own [tokens, hidden]
output, hundreds of MiB over the prefill sizes of a large model); a prefill chunk without adapters
replays the LoRA graph, whose kernels find no tile to do and return at once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from mini_infer.forward_context import forward_context
from mini_infer.worker.step_inputs import StepInputs

if TYPE_CHECKING:
    from mini_infer.attention.backend import AttentionMetadata
    from mini_infer.config import EngineConfig
    from mini_infer.worker.model_runner import ModelRunner

# Larger prefill steps run eagerly: their GPU work dwarfs the launch cost, and each captured size costs
# capture time at startup.
PREFILL_GRAPH_MAX_TOKENS = 8192


def decode_graph_sizes(max_batch: int) -> list[int]:
    """The decode graphs' row (= token) counts: 1, 2, 4, then every 8 up to max_batch."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


def prefill_graph_sizes(config: EngineConfig) -> list[int]:
    """The prefill graphs' token counts (none without cuda_graph_prefill): powers of two to 256, then every
    512; padding wastes at most half a small chunk, 511 tokens of a large one."""
    if not config.cuda_graph_prefill:
        return []
    top = min(config.max_num_batched_tokens, PREFILL_GRAPH_MAX_TOKENS)
    return sorted(set([t for t in (16, 32, 64, 128, 256) if t < top] + list(range(512, top, 512)) + [top]))


def graph_output_bytes(
    config: EngineConfig, bytes_per_token: int, prefill: bool = True, decode_variants: int = 1
) -> int:
    """What a model's graphs keep allocated for their outputs: each graph's output is a static tensor of the
    shared pool, alive as long as the graph (its replays return it), so the pool holds one per captured size
    at once, bytes_per_token (the model's outputs: hidden states, and an EAGLE-3 target's aux hidden states)
    times the tokens of every size. prefill: whether this model captures prefill graphs; decode_variants:
    graphs per decode size (two with LoRA: with and without the adapters' kernels)."""
    decode = decode_variants * sum(decode_graph_sizes(config.max_decode_rows))
    return (decode + (sum(prefill_graph_sizes(config)) if prefill else 0)) * bytes_per_token


def _corner(shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(0, d) for d in shape)


def _rows(out: Any, n: int) -> Any:
    """The first n rows of a model's output: a tensor, or a tuple of them (hidden states and more)."""
    return tuple(t[:n] for t in out) if isinstance(out, tuple) else out[:n]


def _cat(outs: list) -> Any:
    return tuple(torch.cat(ts) for ts in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)


def record(
    model: nn.Module, meta: AttentionMetadata, ids: torch.Tensor, positions: torch.Tensor, extra: dict, pool: object
) -> tuple[Callable[[], Any], object]:
    """A replayable model(ids, positions, **extra) over static inputs, and the graph memory pool to share
    with the next: a CUDA graph, or off CUDA (tests of the static-input path) the same forward run eagerly."""
    if ids.device.type != "cuda":
        static: list = []  # the outputs, kept and overwritten like a graph's, so tests see what a GPU sees

        def run_eagerly() -> Any:
            with forward_context(meta):
                out = model(ids, positions, **extra)
            outs = out if isinstance(out, tuple) else (out,)
            if not static:
                static.extend(outs)
            for kept, new in zip(static, outs):
                kept.copy_(new)
            return tuple(static) if isinstance(out, tuple) else static[0]

        return run_eagerly, pool
    with forward_context(meta):
        model(ids, positions, **extra)  # warm-up: compiles kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = model(ids, positions, **extra)

    def replay() -> Any:
        graph.replay()
        return out  # static: the next replay of this graph overwrites it, no other graph's does

    return replay, pool or graph.pool()


class GraphSet:
    """One model's graphs of one kind (decode or prefill), one per size, over one set of static buffers."""

    def __init__(
        self,
        runner: ModelRunner,
        model: nn.Module,
        sizes: list[int],
        shape: Callable[[int], tuple[int, int]],
        decode: bool,
        extra_inputs: dict[str, int] | None = None,
        lora_variants: tuple[bool, ...] = (False,),
    ) -> None:
        """shape(size) = (tokens, sequences) of the padded batch a graph of that size runs; decode: its
        sequences have one query token each; extra_inputs: the model's inputs beyond ids and positions, name
        -> features per token (in the model dtype); lora_variants: which of with / without the LoRA kernels
        each size is captured in. The runner owns the graphs; the reference back to it is weak, so a dropped
        engine has no reference cycle and frees its GPU memory at once."""
        self.runner, self.model, self.sizes, self.shape = weakref.proxy(runner), model, sorted(sizes), shape
        self.is_decode, self.extra_inputs = decode, extra_inputs or {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.staging: list[dict[str, torch.Tensor]] = [{}, {}]  # filled by turns: a copy may still be queued
        # when each staging set's last copies are queued: a pass may replay again before the device ran them
        self.copied = [torch.cuda.Event(), torch.cuda.Event()] if runner.device.type == "cuda" else None
        self.lora_variants = lora_variants
        self.replays: dict[tuple[int, bool], Callable[[], Any]] = {}  # (size, with LoRA) -> its replay
        self.num_replays = 0
        self.max_blocks = -(-runner.max_model_len // runner.block_size)

    def size_for(self, inputs: StepInputs) -> int | None:
        """The smallest graph that holds inputs (all decode rows, or all prefill chunks), or None."""
        if inputs.num_decodes != (inputs.num_seqs if self.is_decode else 0):
            return None
        if inputs.block_tables.shape[1] > self.max_blocks:
            return None
        fits = (s for s in self.sizes if self.shape(s)[0] >= inputs.num_tokens)
        size = next(fits, None)
        return size if size is not None and self.shape(size)[1] >= inputs.num_seqs else None

    def capture(self, pool: object) -> object:
        """Records every size and LoRA variant, largest first (it makes the buffers), in the shared pool."""
        runner = self.runner
        for size, lora in ((s, v) for s in reversed(self.sizes) for v in self.lora_variants):
            num_tokens, num_seqs = self.shape(size)
            dummy = StepInputs(
                token_ids=np.zeros(num_tokens, np.int64),
                positions=np.zeros(num_tokens, np.int64),
                slot_mapping=np.full(num_tokens, -1, np.int64),
                query_lens=np.zeros(num_seqs, np.int64),
                seq_lens=np.zeros(num_seqs, np.int64),
                block_tables=np.zeros((num_seqs, self.max_blocks), np.int32),
                num_decodes=num_seqs if self.is_decode else 0,
                logits_indices=np.zeros(0, np.int64),
                pending=np.zeros((0, 2), np.int64),
            )
            ids, positions, meta = runner.prepare(dummy, self._make_buffer, lora)
            for name, features in self.extra_inputs.items():
                if name not in self.buffers:
                    self.buffers[name] = torch.zeros(num_tokens, features, dtype=runner.dtype, device=runner.device)
            extra = {name: self.buffers[name][:num_tokens] for name in self.extra_inputs}
            self.replays[size, lora], pool = record(self.model, meta, ids, positions, extra, pool)
        return pool

    def _make_buffer(self, name: str, array: np.ndarray) -> torch.Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.from_numpy(array).to(self.runner.device)
        return self.buffers[name][_corner(array.shape)]

    def _stage(self, name: str, array: np.ndarray) -> torch.Tensor:
        """Copies a step's array into its buffer's leading corner (block tables are not padded: padding
        rows read none of theirs) and returns the buffer view the graph was captured with."""
        buffer = self.buffers[name]
        stage = self.staging[self.num_replays % 2]
        if name not in stage:
            stage[name] = torch.empty(buffer.shape, dtype=buffer.dtype, pin_memory=buffer.is_cuda)
        corner = _corner(array.shape)
        stage[name].numpy()[corner] = array
        buffer[corner].copy_(stage[name][corner], non_blocking=True)
        return buffer[corner]

    def replay(self, inputs: StepInputs, size: int, device_inputs: dict[str, torch.Tensor]) -> Any:
        """The model's output for inputs' tokens, from the graph of `size`; device_inputs (`input_ids` and
        the extra inputs) are copied into their buffers' first rows (padding rows keep what they held)."""
        num_tokens, num_seqs = self.shape(size)
        turn = self.num_replays % 2
        if self.copied is not None:  # the staging set's copies of two replays ago have run (no-op if so)
            self.copied[turn].synchronize()
        lora = max(self.lora_variants) if inputs.uses_lora else min(self.lora_variants)
        self.runner.prepare(inputs.padded(num_tokens, num_seqs), self._stage, lora)
        if self.copied is not None:
            self.copied[turn].record()
        for name, tensor in device_inputs.items():
            self.buffers[name][: len(tensor)].copy_(tensor)
        self.num_replays += 1
        return _rows(self.replays[size, lora](), inputs.num_tokens)


class CUDAGraphs:
    """A model's graphs: decode graphs by rows (batch size, or 1 + k per sequence when speculating) and
    prefill graphs by token count, sharing one memory pool with the other models' graphs."""

    def __init__(
        self, runner: ModelRunner, model: nn.Module, extra_inputs: dict[str, int] | None = None, prefill: bool = True
    ) -> None:
        """prefill: whether to capture prefill graphs too (where the config asks for them)."""
        config = runner.config
        self.max_batch = config.max_decode_rows
        lora = runner.lora is not None
        decode_variants = (False, True) if lora else (False,)  # base-only decode batches skip LoRA
        self.decode = GraphSet(
            runner, model, decode_graph_sizes(self.max_batch), lambda b: (b, b), True, extra_inputs, decode_variants
        )
        seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        sizes = prefill_graph_sizes(config) if prefill else []
        # (seqs, not self, in the lambda: that would be a reference cycle)
        self.prefill = GraphSet(runner, model, sizes, lambda t: (t, seqs), False, extra_inputs, (lora,))

    def capture(self, pool: object = None) -> object:
        pool = self.decode.capture(pool)
        return self.prefill.capture(pool)

    def run(self, inputs: StepInputs, device_inputs: dict[str, torch.Tensor]) -> Any:
        """The model's output over inputs from graph replays (a mixed step: the decode rows' graph, then the
        prefill chunks'), or None where the graphs do not hold them."""
        if inputs.num_decodes == inputs.num_seqs:
            parts = [(inputs, self.decode)]
        elif inputs.num_decodes == 0:
            parts = [(inputs, self.prefill)]
        else:
            parts = list(zip(inputs.split(), (self.decode, self.prefill)))
        sizes = [graphs.size_for(part) for part, graphs in parts]
        if None in sizes:
            return None
        outs, start = [], 0
        for (part, graphs), size in zip(parts, sizes):
            end = start + part.num_tokens
            outs.append(graphs.replay(part, size, {k: v[start:end] for k, v in device_inputs.items()}))
            start = end
        return outs[0] if len(outs) == 1 else _cat(outs)
