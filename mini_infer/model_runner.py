"""ModelRunner: owns the model and the KV pool; turns a scheduled batch into one forward pass.

The batch is flat, with no padding: the ids of every scheduled token, their positions, the cache
slot each one writes, and per sequence its block table and key count. Only the rows that
sample get logits.

On CUDA the forward passes replay CUDA graphs: decode batches by batch size, prefill chunks by
token count (padded up to the next captured count), and a step that mixes both replays one of
each. Launching the ~15 kernels of each layer one by one from Python costs more host time than a
small step's GPU work, so eager execution is only the fallback for batches no graph holds.

`execute` only queues work: every host-to-device copy is pinned and non-blocking, and the sampled
tokens come back through a `PendingStep`, so the engine can queue the next step before it reads
this one. A decode whose input token the host has not read yet takes it from the previous step's
sampled tokens on the device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from mini_infer.config import EngineConfig
from mini_infer.cpu_threads import step_threads
from mini_infer.forward_context import AttentionMetadata, forward_context
from mini_infer.kernels.prefill_attention import build_prefill_tiles, default_prefill_config, max_prefill_tiles
from mini_infer.sampler import (
    DeviceSample,
    SamplerOutput,
    build_sampling_batch,
    sample,
    sample_on_device,
    to_device,
)
from mini_infer.sampling_params import SamplingParams
from mini_infer.scheduler import ScheduledSeq, SchedulerOutput

logger = logging.getLogger(__name__)

# Larger prefill steps run eagerly: their GPU work dwarfs the launch cost, and each captured size costs
# capture time at startup.
PREFILL_GRAPH_MAX_TOKENS = 8192


class PendingStep:
    """A queued step's sampled tokens on their way to the host. They are copied into pinned memory
    without blocking and an event marks the copy, so `result()` waits for this step only, not for
    the steps queued after it."""

    def __init__(self, sample: DeviceSample | None, prompt_logprobs: dict[int, tuple[int, list]] | None = None) -> None:
        self.event: torch.cuda.Event | None = None
        self.tensors: list[torch.Tensor] = []
        self.prompt_logprobs = prompt_logprobs or {}  # already on the host: computed synchronously, rarely
        if sample is None:
            return
        tensors = sample.tensors()
        if tensors[0].is_cuda:
            self.tensors = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, dev in zip(self.tensors, tensors):
                host.copy_(dev, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.tensors = tensors

    def result(self) -> SamplerOutput:
        if not self.tensors:
            return SamplerOutput([], None, self.prompt_logprobs)
        if self.event is not None:
            self.event.synchronize()
        output = DeviceSample.to_output(self.tensors)
        output.prompt_logprobs = self.prompt_logprobs
        return output


class ModelRunner:
    def __init__(self, model: nn.Module, config: EngineConfig, hf_config: PretrainedConfig,
                 dtype: torch.dtype, device: torch.device, max_model_len: int) -> None:
        self.model, self.config, self.hf_config = model, config, hf_config
        self.dtype, self.device = dtype, device
        self.block_size = config.block_size
        self.max_model_len = max_model_len
        self.vocab_size = hf_config.vocab_size
        self.attn_layers = model.attention_layers()
        first = self.attn_layers[0]
        self.num_kv_heads, self.head_dim = first.num_kv_heads, first.head_dim
        self.generators: dict[int, torch.Generator] = {}
        self.seed_rng = np.random.default_rng(config.seed)  # Philox seeds of unseeded rows (fused sampler)
        self.kv_cache = torch.empty(0)
        # replays of recorded forward passes (`_record`): decode by batch size, prefill by token count
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.prefill_graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.block_m = default_prefill_config(device).block_m  # query tile of the prefill kernel
        self.graph_reserve_bytes = 0  # set by profiling: memory kept back for the CUDA graphs
        self.use_cuda_graphs = (device.type == "cuda" and not config.enforce_eager
                                and model.attention_layers()[0].ops.name == "triton")
        # the last step's sampled tokens, still on the device, and the row of each sequence in them
        self.last_tokens: torch.Tensor | None = None
        self.last_rows: dict[int, int] = {}
        self.num_weights = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # a step's MACs per token

    # -- KV pool ------------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, keys and values."""
        elem = torch.empty(0, dtype=self.dtype).element_size()
        return 2 * len(self.attn_layers) * self.block_size * self.num_kv_heads * self.head_dim * elem

    def _allocate(self, num_blocks: int) -> torch.Tensor:
        shape = (2, len(self.attn_layers), num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def _bind(self, kv_cache: torch.Tensor) -> None:
        for i, layer in enumerate(self.attn_layers):
            layer.k_cache, layer.v_cache = kv_cache[0, i], kv_cache[1, i]

    def determine_num_blocks(self) -> int:
        """How many KV blocks fit: forced, or from free GPU memory after a profiling pass, or
        (CPU) from `cpu_kv_cache_gib`. Never more than max_num_seqs full-length sequences need."""
        if self.config.num_gpu_blocks_override is not None:
            return self.config.num_gpu_blocks_override
        per_seq = (self.max_model_len + self.block_size - 1) // self.block_size
        enough = self.config.max_num_seqs * per_seq
        if self.device.type == "cuda":
            budget = self._profile_free_gpu_memory()
        else:
            budget = int(self.config.cpu_kv_cache_gib * 2**30)
        num_blocks = min(budget // self.block_bytes, enough)
        if num_blocks < per_seq:
            raise ValueError(
                f"the KV pool fits {max(num_blocks, 0)} blocks of {self.block_size} tokens, fewer than one "
                f"sequence of max_model_len={self.max_model_len} needs ({per_seq}); lower max_model_len or "
                "raise gpu_memory_utilization / cpu_kv_cache_gib"
            )
        return int(num_blocks)

    def _profile_free_gpu_memory(self) -> int:
        """Runs the largest batch the scheduler can form on a throwaway cache and returns the
        bytes left for the KV pool under gpu_memory_utilization."""
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        num_tokens = min(self.config.max_num_batched_tokens, self.config.max_num_seqs * self.max_model_len)
        num_seqs = min(self.config.max_num_seqs, num_tokens)
        lens = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        blocks = sum((n + self.block_size - 1) // self.block_size for n in lens)
        scratch = self._allocate(blocks)
        self._bind(scratch)
        self._profile_forward(lens)
        torch.cuda.synchronize()
        peak_extra = torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()
        if self.use_cuda_graphs:  # graphs share one pool of their own: reserve its largest pass
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self._profile_forward([1] * self.max_graph_batch)
            torch.cuda.synchronize()
            largest = torch.cuda.max_memory_allocated() - base
            if self.config.cuda_graph_prefill:
                largest = max(largest, peak_extra)
            self.graph_reserve_bytes = int(1.5 * largest) + 2**26
        del scratch
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info()
        budget = int(total * self.config.gpu_memory_utilization) - (total - free) - peak_extra
        budget -= self.graph_reserve_bytes
        logger.info("profiling: %.2f GiB in use, activation peak %.2f GiB, CUDA graphs %.2f GiB, "
                    "%.2f GiB left for the KV pool", (total - free) / 2**30, peak_extra / 2**30,
                    self.graph_reserve_bytes / 2**30, budget / 2**30)
        return max(budget, 0)

    def _profile_forward(self, lens: list[int]) -> None:
        bs, next_block, tokens, positions, slots, block_tables = self.block_size, 0, [], [], [], []
        for n in lens:
            nb = (n + bs - 1) // bs
            table = list(range(next_block, next_block + nb))
            next_block += nb
            tokens += [0] * n
            positions += list(range(n))
            slots += [table[p // bs] * bs + p % bs for p in range(n)]
            block_tables.append(table)
        meta = self._attention_metadata([], list(zip(lens, lens)), block_tables, slots)
        ids = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        last = torch.tensor(np.cumsum(lens) - 1, device=self.device)
        with torch.inference_mode(), forward_context(meta):
            logits = self.model.compute_logits(self.model(ids, pos)[last])
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * len(lens)
        batch = build_sampling_batch(params, [[0]] * len(lens), [[]] * len(lens), [None] * len(lens),
                                     self.vocab_size, self.device)
        sample(logits.float(), batch)

    def init_kv_cache(self) -> int:
        num_blocks = self.determine_num_blocks()
        self.kv_cache = self._allocate(num_blocks)
        self._bind(self.kv_cache)
        if self.use_cuda_graphs:
            self.capture_cuda_graphs()
        if self.device.type == "cuda":
            self.warm_up_sampling()
        return num_blocks

    @torch.inference_mode()
    def warm_up_sampling(self) -> None:
        """Runs the LM head and the fused sampler once for every number of rows a step can sample, so
        the Triton kernels outside the CUDA graphs compile now and not in the middle of a run: the GEMV
        compiles a variant for 1 and for 2 rows, and the sampler's launch shape follows the row count.
        Each variant costs a few hundred milliseconds once; every call after it, well under one."""
        hidden_size = self.hf_config.hidden_size
        for n in range(1, self.config.max_num_seqs + 1):
            logits = self.model.compute_logits(torch.zeros(n, hidden_size, dtype=self.dtype, device=self.device))
            params = [SamplingParams(temperature=1.0)] * n
            batch = build_sampling_batch(params, [[0]] * n, [[]] * n, [None] * n, self.vocab_size, self.device,
                                         seeds=list(range(n)))
            sample_on_device(logits, batch)
            if n in (1, 2, self.config.max_num_seqs):  # logprobs and penalties sample float32 logits
                sample_on_device(logits.float(), batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- CUDA graphs for decode ---------------------------------------------------------------
    @property
    def max_graph_batch(self) -> int:
        return min(self.config.max_num_seqs, 512)

    def graph_batch_sizes(self) -> list[int]:
        sizes = [b for b in (1, 2, 4) if b < self.max_graph_batch]
        sizes += list(range(8, self.max_graph_batch, 8)) + [self.max_graph_batch]
        return sorted(set(sizes))

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Captures one decode forward per batch size in `graph_batch_sizes`, largest first, all
        sharing one memory pool. A step replays the smallest graph that holds its batch; padded
        rows have key count 0 and slot -1, so they read and write nothing."""
        n, width = self.max_graph_batch, (self.max_model_len + self.block_size - 1) // self.block_size
        dev = self.device
        self.graph_inputs = {
            "ids": torch.zeros(n, dtype=torch.int64, device=dev),
            "positions": torch.zeros(n, dtype=torch.int64, device=dev),
            "slots": torch.full((n,), -1, dtype=torch.int64, device=dev),
            "seq_lens": torch.zeros(n, dtype=torch.int32, device=dev),
            "tables": torch.zeros(n, width, dtype=torch.int32, device=dev),
        }
        self.graph_staging = [self._staging(self.graph_inputs) for _ in range(2)]
        self.graph_steps = 0
        empty_i32 = torch.zeros(0, dtype=torch.int32, device=dev)
        cuda = dev.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        free_before = torch.cuda.mem_get_info()[0] if cuda else 0
        pool = None
        for b in reversed(self.graph_batch_sizes()):
            g = self.graph_inputs
            meta = AttentionMetadata(g["slots"][:b], b, g["seq_lens"][:b], g["tables"][:b],
                                     torch.zeros(1, dtype=torch.int32, device=dev), empty_i32,
                                     g["tables"][:0], 0)
            self.graphs[b], pool = self._record(meta, g["ids"][:b], g["positions"][:b], pool)
        self.graphs = dict(sorted(self.graphs.items()))
        if self.config.cuda_graph_prefill:
            self._capture_prefill_graphs(pool)
        if cuda:
            torch.cuda.synchronize()
            logger.info("captured %d decode CUDA graphs (batch 1..%d) and %d prefill graphs (up to %d tokens) "
                        "using %.2f GiB", len(self.graphs), self.max_graph_batch, len(self.prefill_graphs),
                        max(self.prefill_graphs, default=0), (free_before - torch.cuda.mem_get_info()[0]) / 2**30)

    def _staging(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Host copies of static inputs (pinned on CUDA), filled each step and sent with one non-blocking
        copy per buffer. Callers keep two sets and use them in turn: a step fills its set while the
        copies of the step before may still be queued."""
        pin = self.device.type == "cuda"
        return {k: torch.zeros(v.shape, dtype=v.dtype, pin_memory=pin) for k, v in inputs.items()}

    def _record(self, meta: AttentionMetadata, ids: torch.Tensor, positions: torch.Tensor,
                pool: object) -> tuple[Callable[[], torch.Tensor], object]:
        """A replayable forward over static inputs and the graph memory pool to share with the next:
        a CUDA graph, or off CUDA (tests of the static-input path) the same forward run eagerly."""
        if self.device.type != "cuda":
            def run_eagerly() -> torch.Tensor:
                with forward_context(meta):
                    return self.model(ids, positions)

            return run_eagerly, pool
        with forward_context(meta):
            self.model(ids, positions)  # warm-up: compiles kernels outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self.model(ids, positions)

        def replay() -> torch.Tensor:
            graph.replay()
            return hidden

        return replay, pool or graph.pool()

    # -- CUDA graphs for prefill chunks -------------------------------------------------------
    @property
    def max_prefill_seqs(self) -> int:
        """Chunks one prefill graph takes; a step with more runs eagerly."""
        return min(self.config.max_num_seqs, self.config.max_num_batched_tokens)

    def prefill_graph_sizes(self) -> list[int]:
        """Token counts captured: powers of two to 512, then every 512 up to the step's token budget
        (at most PREFILL_GRAPH_MAX_TOKENS), so padding wastes at most half a small chunk and 511 tokens
        of a large one."""
        top = min(self.config.max_num_batched_tokens, PREFILL_GRAPH_MAX_TOKENS)
        sizes = [t for t in (16, 32, 64, 128, 256) if t < top] + list(range(512, top, 512)) + [top]
        return sorted(set(sizes))

    def _capture_prefill_graphs(self, pool: object) -> None:
        """One prefill forward per token count in `prefill_graph_sizes`, largest first, in the decode
        graphs' pool. Padded tokens write slot -1 and belong to no chunk; padded chunks have no query
        tokens, and the tile list's unused entries say -1, so they cost nothing in attention."""
        top, seqs, dev = self.prefill_graph_sizes()[-1], self.max_prefill_seqs, self.device
        width = self.graph_inputs["tables"].shape[1]
        self.prefill_inputs = {
            "ids": torch.zeros(top, dtype=torch.int64, device=dev),
            "positions": torch.zeros(top, dtype=torch.int64, device=dev),
            "slots": torch.full((top,), -1, dtype=torch.int64, device=dev),
            "cu_seqlens": torch.zeros(seqs + 1, dtype=torch.int32, device=dev),
            "seq_lens": torch.zeros(seqs, dtype=torch.int32, device=dev),
            "tables": torch.zeros(seqs, width, dtype=torch.int32, device=dev),
            "tiles": torch.full((max_prefill_tiles(top, seqs, self.block_m), 2), -1, dtype=torch.int32, device=dev),
        }
        self.prefill_staging = [self._staging(self.prefill_inputs) for _ in range(2)]
        self.prefill_steps = 0
        g = self.prefill_inputs
        empty_i32 = torch.zeros(0, dtype=torch.int32, device=dev)
        for t in reversed(self.prefill_graph_sizes()):
            meta = AttentionMetadata(g["slots"][:t], 0, empty_i32, g["tables"][:0], g["cu_seqlens"], g["seq_lens"],
                                     g["tables"], t, g["tiles"][: max_prefill_tiles(t, seqs, self.block_m)])
            self.prefill_graphs[t], pool = self._record(meta, g["ids"][:t], g["positions"][:t], pool)
        self.prefill_graphs = dict(sorted(self.prefill_graphs.items()))

    def _prefill_graph_size(self, prefills: list[ScheduledSeq]) -> int | None:
        """The captured token count that holds these chunks, or None when no graph does."""
        if not self.prefill_graphs or len(prefills) > self.max_prefill_seqs:
            return None
        if max(len(s.seq.block_table) for s in prefills) > self.prefill_inputs["tables"].shape[1]:
            return None
        tokens = sum(s.num_new_tokens for s in prefills)
        return next((t for t in self.prefill_graphs if t >= tokens), None)

    def _run_prefill_graph(self, prefills: list[ScheduledSeq], size: int) -> torch.Tensor:
        """Fills the static inputs for these prefill chunks and replays the graph of `size` tokens."""
        st = self.prefill_staging[self.prefill_steps % 2]
        self.prefill_steps += 1
        ids, positions, slots, pending, q_lens, seq_lens = self._flat_inputs(prefills)
        n, p = len(ids), len(prefills)
        host = {k: st[k].numpy() for k in st}
        host["ids"][:n], host["positions"][:n], host["slots"][:n] = ids, positions, slots
        host["slots"][n:size], host["positions"][n:size] = -1, 0
        host["cu_seqlens"][0] = 0
        host["cu_seqlens"][1 : p + 1] = np.cumsum(q_lens)
        host["cu_seqlens"][p + 1 :] = n  # padded chunks are empty (the reference walks every chunk)
        host["seq_lens"][:p], host["seq_lens"][p:] = seq_lens, 0
        width = max(len(s.seq.block_table) for s in prefills)
        for i, s in enumerate(prefills):
            table = s.seq.block_table
            host["tables"][i, : len(table)] = table
        num_tiles = max_prefill_tiles(size, self.max_prefill_seqs, self.block_m)
        host["tiles"][:num_tiles] = build_prefill_tiles(q_lens, seq_lens, self.block_m, num_tiles)
        g = self.prefill_inputs
        for key, count in (("ids", size), ("positions", size), ("slots", size), ("cu_seqlens", len(host["cu_seqlens"])),
                           ("seq_lens", len(host["seq_lens"])), ("tiles", num_tiles)):
            g[key][:count].copy_(st[key][:count], non_blocking=True)
        g["tables"][:p, :width].copy_(st["tables"][:p, :width], non_blocking=True)
        self._fill_pending(g["ids"], pending)
        return self.prefill_graphs[size]()[:n]

    def _run_decode_graph(self, decodes: list[ScheduledSeq]) -> torch.Tensor:
        """Fills the static inputs for a decode-only batch and replays the fitting graph."""
        n = len(decodes)
        size = next(b for b in self.graphs if b >= n)  # captured sizes, kept in ascending order
        st = self.graph_staging[self.graph_steps % 2]
        self.graph_steps += 1
        ids, pos, slots, lens, tables = (st[k].numpy() for k in ("ids", "positions", "slots", "seq_lens", "tables"))
        bs = self.block_size
        pending: list[tuple[int, int]] = []
        for i, s in enumerate(decodes):
            seq, p = s.seq, s.seq.num_computed_tokens
            table = seq.block_table
            if p < len(seq.token_ids):
                ids[i] = seq.token_ids[p]
            else:
                pending.append((i, self.last_rows[seq.seq_id]))
            pos[i], lens[i] = p, p + 1
            slots[i] = table[p // bs] * bs + p % bs
            tables[i, : len(table)] = table
        slots[n:size], lens[n:size] = -1, 0
        g = self.graph_inputs
        for key in ("ids", "positions", "slots", "seq_lens"):
            g[key][:size].copy_(st[key][:size], non_blocking=True)
        width = max(len(s.seq.block_table) for s in decodes)
        g["tables"][:n, :width].copy_(st["tables"][:n, :width], non_blocking=True)
        self._fill_pending(g["ids"], pending)
        return self.graphs[size]()[:n]

    def _fill_pending(self, ids: torch.Tensor, pending: list[tuple[int, int]]) -> None:
        """ids[row] = the token the last step sampled for that sequence, for (row, last row) pairs."""
        if not pending:
            return
        rows = np.array(pending, dtype=np.int64)
        dst = to_device(rows[:, 0], torch.int64, self.device)
        src = to_device(rows[:, 1], torch.int64, self.device)
        ids.index_copy_(0, dst, self.last_tokens.index_select(0, src))

    # -- one step -----------------------------------------------------------------------------
    def _attention_metadata(self, decodes: list[tuple[int, int]], prefills: list[tuple[int, int]],
                            block_tables: list[list[int]], slots: list[int] | np.ndarray) -> AttentionMetadata:
        """decodes/prefills: (query tokens, keys) per sequence in batch order; block_tables alike."""
        def tensor(data, dtype=torch.int32) -> torch.Tensor:
            return to_device(data, dtype, self.device)

        width = max((len(t) for t in block_tables), default=1) or 1
        tables = np.zeros((len(block_tables), width), dtype=np.int32)
        for i, t in enumerate(block_tables):
            tables[i, : len(t)] = t
        nd = len(decodes)
        cu = np.zeros(len(prefills) + 1, dtype=np.int32)
        cu[1:] = np.cumsum([q for q, _ in prefills])
        tiles = build_prefill_tiles(np.diff(cu), np.array([k for _, k in prefills]), self.block_m)
        return AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            num_decode_tokens=nd,
            decode_seq_lens=tensor([k for _, k in decodes]),
            decode_block_tables=tensor(tables[:nd]),
            prefill_cu_seqlens_q=tensor(cu),
            prefill_seq_lens=tensor([k for _, k in prefills]),
            prefill_block_tables=tensor(tables[nd:]),
            num_prefill_tokens=int(cu[-1]),
            prefill_tiles=to_device(tiles, torch.int32, self.device),
        )

    def _flat_inputs(self, seqs: list[ScheduledSeq]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                               list[tuple[int, int]], np.ndarray, np.ndarray]:
        """The scheduled tokens of seqs, flat: ids (0 where the input is still pending), positions and
        cache slots; the (row, last step's row) pairs of the pending inputs; per sequence its query
        count and key count."""
        bs = self.block_size
        ids, positions, slots = [], [], []
        pending: list[tuple[int, int]] = []
        offset = 0
        for s in seqs:
            seq, start, n = s.seq, s.start, s.num_new_tokens
            pos = np.arange(start, start + n)
            table = np.asarray(seq.block_table, dtype=np.int64)
            known = seq.token_ids[start : start + n]
            if len(known) < n:  # only the last input can be pending: the token the last step sampled
                assert len(known) == n - 1, "more than one pending input token"
                pending.append((offset + n - 1, self.last_rows[seq.seq_id]))
                known = [*known, 0]
            ids.append(np.asarray(known, dtype=np.int64))
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            offset += n
        q_lens = np.array([s.num_new_tokens for s in seqs], dtype=np.int64)
        seq_lens = np.array([s.start + s.num_new_tokens for s in seqs], dtype=np.int64)
        return np.concatenate(ids), np.concatenate(positions), np.concatenate(slots), pending, q_lens, seq_lens

    def prepare_inputs(self, out: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata,
                                                              torch.Tensor]:
        """Eager inputs for any batch: token ids, positions, attention metadata and the sampled rows."""
        ids, positions, slots, pending, q_lens, seq_lens = self._flat_inputs(out.seqs)
        spans = list(zip(q_lens.tolist(), seq_lens.tolist()))
        nd = len(out.decodes)
        meta = self._attention_metadata(spans[:nd], spans[nd:], [s.seq.block_table for s in out.seqs], slots)
        input_ids = to_device(ids, torch.int64, self.device)
        self._fill_pending(input_ids, pending)
        rows = (np.cumsum(q_lens) - 1)[[s.samples for s in out.seqs]]
        positions_t = to_device(positions, torch.int64, self.device)
        return input_ids, positions_t, meta, to_device(rows, torch.int64, self.device)

    def _generator(self, s: ScheduledSeq) -> torch.Generator | None:
        seed = s.seq.params.seed
        if seed is None:
            return None
        gen = self.generators.get(s.seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed((seed + s.seq.index) % 2**64)
            self.generators[s.seq.seq_id] = gen
        return gen

    def _philox_seeds(self, sampling: list[ScheduledSeq]) -> list[int]:
        """Per-row seeds for the fused sampler: a seeded request's depend only on its seed, which of its
        n samples it is, and how many tokens it has made; the others are fresh random draws."""
        fresh = self.seed_rng.integers(0, 2**63 - 1, size=len(sampling))
        seeds = []
        for s, r in zip(sampling, fresh.tolist()):
            seq = s.seq
            seed = seq.params.seed
            seeds.append(r if seed is None else
                         hash((seed, seq.index, seq.num_total_tokens - seq.num_prompt_tokens)) & (2**63 - 1))
        return seeds

    def _run_graphs(self, out: SchedulerOutput, prefill_size: int | None) -> torch.Tensor:
        """Replays the prefill graph, then the decode graph, and returns the hidden states of the rows
        that sample (decodes first). The graphs share a memory pool, so the prefill rows are copied
        out before the decode graph runs."""
        prefill_part = None
        if out.prefills:
            hidden = self._run_prefill_graph(out.prefills, prefill_size)
            ends = np.cumsum([s.num_new_tokens for s in out.prefills]) - 1
            prefill_part = hidden[to_device(ends[[s.samples for s in out.prefills]], torch.int64, self.device)]
        if not out.decodes:
            return prefill_part
        hidden = self._run_decode_graph(out.decodes)
        if not all(s.samples for s in out.decodes):
            hidden = hidden[to_device([i for i, s in enumerate(out.decodes) if s.samples], torch.int64, self.device)]
        return hidden if prefill_part is None else torch.cat((hidden, prefill_part))

    def release(self, seq_id: int) -> None:
        self.generators.pop(seq_id, None)

    def _prompt_logprob_rows(self, out: SchedulerOutput) -> list[tuple[int, int, list[int], list[int]]]:
        """(seq id, first prompt position, rows of the flat batch, target tokens) for each prefill chunk of a
        request that wants prompt logprobs: row p's logits predict prompt token p + 1."""
        entries, offset = [], 0
        for s in out.seqs:
            seq = s.seq
            end = min(s.start + s.num_new_tokens, seq.num_prompt_tokens - 1)
            if seq.params.prompt_logprobs is not None and s.start < end:
                rows = list(range(offset, offset + end - s.start))
                entries.append((seq.seq_id, s.start + 1, rows, seq.prompt_token_ids[s.start + 1 : end + 1]))
            offset += s.num_new_tokens
        return entries

    def _prompt_logprobs(self, hidden: torch.Tensor, entries: list, out: SchedulerOutput,
                         chunk_rows: int = 512) -> dict[int, tuple[int, list]]:
        """Per sequence: (first position, [(logprob, rank, top ids, top logprobs)] per position), read back
        at once. Logits are made `chunk_rows` rows at a time, since a whole prompt's would not fit."""
        k = max(s.seq.params.prompt_logprobs or 0 for s in out.seqs)
        rows = [r for _, _, rs, _ in entries for r in rs]
        targets = [t for _, _, _, ts in entries for t in ts]
        values: list[tuple] = []
        for i in range(0, len(rows), chunk_rows):
            index = to_device(rows[i : i + chunk_rows], torch.int64, self.device)
            target = to_device(targets[i : i + chunk_rows], torch.int64, self.device).unsqueeze(1)
            logprobs = self.model.compute_logits(hidden[index]).float().log_softmax(dim=-1)
            chosen = logprobs.gather(1, target)
            ranks = (logprobs > chosen).sum(dim=-1) + 1
            top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], target[:, :0])
            values += zip(chosen.squeeze(1).tolist(), ranks.tolist(), top_ids.tolist(), top_values.tolist())
        result, start = {}, 0
        for seq_id, first, rs, _ in entries:
            result[seq_id] = (first, values[start : start + len(rs)])
            start += len(rs)
        return result

    def execute(self, out: SchedulerOutput) -> PendingStep:
        """Queues one step; the returned PendingStep yields the sampled token (and logprobs) of each
        sequence that samples, in batch order, and the prompt logprobs its prefill chunks asked for.
        Small CPU steps run single-threaded (cpu_threads.py)."""
        with step_threads(self.device, out.num_tokens * self.num_weights):
            return self._execute(out)

    @torch.inference_mode()
    def _execute(self, out: SchedulerOutput) -> PendingStep:
        sampling = [s for s in out.seqs if s.samples]
        prompt_rows = self._prompt_logprob_rows(out)
        prefill_size = self._prefill_graph_size(out.prefills) if out.prefills else None
        graphs_fit = len(out.decodes) <= self.max_graph_batch and (not out.prefills or prefill_size)
        if self.graphs and graphs_fit and not prompt_rows:  # prompt logprobs need every row: eager
            hidden, rows = self._run_graphs(out, prefill_size), None
        else:
            ids, positions, meta, rows = self.prepare_inputs(out)
            with forward_context(meta):
                hidden = self.model(ids, positions)
        prompt_logprobs = self._prompt_logprobs(hidden, prompt_rows, out) if prompt_rows else None
        if not sampling:
            self.last_tokens, self.last_rows = None, {}
            return PendingStep(None, prompt_logprobs)
        logits = self.model.compute_logits(hidden if rows is None else hidden[rows])
        params = [s.seq.params for s in sampling]
        penalties = any(p.uses_penalties for p in params)
        batch = build_sampling_batch(
            params,
            [s.seq.prompt_token_ids for s in sampling],
            [s.seq.output_token_ids for s in sampling] if penalties else [[]] * len(sampling),
            [self._generator(s) for s in sampling],
            self.vocab_size,
            self.device,
            num_outputs=[s.seq.num_total_tokens - s.seq.num_prompt_tokens for s in sampling],
            seeds=self._philox_seeds(sampling) if self.device.type == "cuda" else None,
        )
        result = sample_on_device(logits, batch)
        self.last_tokens = result.tokens
        self.last_rows = {s.seq.seq_id: i for i, s in enumerate(sampling)}
        return PendingStep(result, prompt_logprobs)
