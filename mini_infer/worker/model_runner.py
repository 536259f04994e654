"""ModelRunner: owns the model and its KV pool; runs one step's forward pass and samples.

A step's scheduled sequences become one StepInputs (step_inputs.py); the attention backend turns it
into its metadata; the forward pass replays CUDA graphs where they hold the step and runs eagerly
otherwise (cuda_graphs.py), and so do a speculative proposer's passes, over graphs of its own model.
Only the rows that sample get logits.

`execute` only queues work: every host-to-device copy is pinned and non-blocking, and the sampled
tokens come back through a `PendingStep`, so the engine can queue the next step before it reads
this one. A decode whose input token the host has not read yet takes it from the previous step's
sampled tokens on the device.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig

from mini_infer.attention.backend import AttentionBackend, AttentionMetadata, Put
from mini_infer.config import EngineConfig
from mini_infer.cpu_threads import step_threads
from mini_infer.distributed.communication_op import broadcast_from_driver, min_over_ranks
from mini_infer.forward_context import forward_context
from mini_infer.kv_transfer.connector_base import KVConnectorBase
from mini_infer.lora.manager import LoRAModelManager
from mini_infer.sampler import DeviceSample, SamplerOutput, build_sampling_batch, sample, sample_on_device, to_device
from mini_infer.sampling_params import SamplingParams
from mini_infer.scheduler import ScheduledSeq, SchedulerOutput
from mini_infer.sequence import Sequence
from mini_infer.spec_decode.draft_model import DraftModel
from mini_infer.spec_decode.eagle3 import Eagle3Proposer
from mini_infer.spec_decode.rejection_sampler import rejection_sample
from mini_infer.worker.cuda_graphs import CUDAGraphs, graph_output_bytes
from mini_infer.worker.kv_cache import KVCache, num_kv_blocks, profile_free_gpu_memory
from mini_infer.worker.kv_swap import KVSwapper, num_host_blocks
from mini_infer.worker.step_inputs import StepInputs, build_step_inputs

logger = logging.getLogger(__name__)


class PendingStep:
    """A queued step's sampled tokens on their way to the host. They are copied into pinned memory
    without blocking and an event marks the copy, so `result()` waits for this step only, not for
    the steps queued after it."""

    def __init__(self, sample: DeviceSample | None, prompt_logprobs: dict[int, tuple[int, list]] | None = None) -> None:
        self.event: torch.cuda.Event | None = None
        self.tensors: list[torch.Tensor] = []
        self.prompt_logprobs = prompt_logprobs or {}  # already on the host: computed synchronously, rarely
        self.waited = 0.0  # seconds result() waited for the device
        self.output: SamplerOutput | None = None
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

    @classmethod
    def ready(cls, output: SamplerOutput) -> PendingStep:
        """A step whose result is on the host already (a verification step reads its tokens back)."""
        step = cls(None, output.prompt_logprobs)
        step.output = output
        return step

    def result(self) -> SamplerOutput:
        if self.output is not None:
            return self.output
        if self.event is not None:
            start = time.perf_counter()
            self.event.synchronize()
            self.waited = time.perf_counter() - start
        output = DeviceSample.to_output(self.tensors) if self.tensors else SamplerOutput([], None)
        output.prompt_logprobs = self.prompt_logprobs
        return output


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        config: EngineConfig,
        hf_config: PretrainedConfig,
        dtype: torch.dtype,
        device: torch.device,
        max_model_len: int,
        backend: AttentionBackend,
        proposer: DraftModel | Eagle3Proposer | None = None,
        lora: LoRAModelManager | None = None,
    ) -> None:
        """proposer: a speculative decoding proposer that runs a model of its own beside this one
        (spec_decode/draft_model.py, eagle3.py); its caches sit in the same pool and block tables.
        lora: the adapter slots of a model whose projections take LoRA (enable_lora; lora/manager.py)."""
        self.model, self.config, self.backend, self.lora = model, config, backend, lora
        self.dtype, self.device = dtype, device
        self.block_size, self.max_model_len = config.block_size, max_model_len
        self.vocab_size, self.hidden_size = hf_config.vocab_size, hf_config.hidden_size
        self.proposer = proposer
        layers = model.attention_layers() + (proposer.attention_layers() if proposer is not None else [])
        self.kv_cache = KVCache(layers, config.block_size, config.resolve_kv_cache_dtype(dtype), device)
        self.use_cuda_graphs = device.type == "cuda" and not config.enforce_eager and backend.supports_cuda_graphs
        self.graphs: CUDAGraphs | None = None  # the target's
        self.proposer_graphs: CUDAGraphs | None = None  # the proposer's model's, in the same memory pool
        self.kv_swapper: KVSwapper | None = None  # preemption_mode="swap": the host pool of this rank's KV
        self.kv_connector: KVConnectorBase | None = None  # kv_transfer_config: KV loaded from / saved for others
        self.seed_rng = np.random.default_rng(config.seed)  # seeds of unseeded rows (fused sampler)
        # the last step's sampled tokens, still on the device, and the row of each sequence in them
        self.last_tokens: torch.Tensor | None = None
        self.last_rows: dict[int, int] = {}
        self.num_weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2)  # MACs per token, at most

    # -- setup --------------------------------------------------------------------------------
    def init_kv_cache(self) -> int:
        """Sizes and allocates the KV pool, then captures the CUDA graphs and warms the sampler up."""
        graph_batch = self.config.max_decode_rows if self.use_cuda_graphs else None
        num_blocks = num_kv_blocks(
            self.config,
            self.kv_cache,
            self.max_model_len,
            lambda: profile_free_gpu_memory(
                self.config, self.kv_cache, self.max_model_len, self._profile_run, graph_batch, self._graph_output_bytes
            ),
        )
        num_blocks = min_over_ranks(num_blocks, self.device)  # every rank's pool holds the same blocks
        self.kv_cache.allocate(num_blocks)
        if self.config.preemption_mode == "swap":  # each rank swaps its shard of the blocks
            num_host = num_host_blocks(self.config.swap_space, self.kv_cache.block_bytes)
            self.kv_swapper = KVSwapper(self.kv_cache, min_over_ranks(num_host, self.device))
        if self.use_cuda_graphs:
            self.capture_cuda_graphs()
        if self.device.type == "cuda":
            self.warm_up_sampling()
        return num_blocks

    def _profile_run(self, lens: list[int]) -> int:
        """A prefill of prompts of these lengths and its sampling, on consecutive blocks (KV sizing); the
        bytes per token of the model's output (hidden states, and the aux ones an EAGLE-3 head reads)."""
        seqs, first_block = [], 0
        for n in lens:
            seq = Sequence("profile", 0, [0] * n, SamplingParams())
            seq.block_table = list(range(first_block, first_block + -(-n // self.block_size)))
            first_block += len(seq.block_table)
            seqs.append(ScheduledSeq(seq, 0, n, True, 0))
        inputs = build_step_inputs(seqs, 0, self.block_size, {})
        if self.lora is not None:  # slot 0 (zeros until an adapter loads): the LoRA kernels' memory counts too
            inputs.lora_slots = np.zeros(inputs.num_tokens, np.int32)
        with torch.inference_mode():
            hidden, aux = self._forward_with_aux(inputs)
            logits = self.model.compute_logits(hidden[to_device(inputs.logits_indices, torch.int64, self.device)])
        output_bytes = sum(t.shape[-1] * t.element_size() for t in (hidden, aux) if t is not None)
        params = [SamplingParams(temperature=1.0, top_p=0.9, top_k=50)] * len(lens)
        batch = build_sampling_batch(
            params, [[0]] * len(lens), [[]] * len(lens), [None] * len(lens), self.vocab_size, self.device
        )
        sample(logits.float(), batch)
        return output_bytes

    def _graph_output_bytes(self, target_bytes_per_token: int) -> int:
        """What the graphs capture_cuda_graphs will make keep for their outputs, at every captured size: the
        target's (target_bytes_per_token, as the profile pass measured) and the proposer's model's."""
        variants = 2 if self.lora is not None else 1  # cuda_graphs.CUDAGraphs: LoRA's decode graphs come twice
        total = graph_output_bytes(self.config, target_bytes_per_token, decode_variants=variants)
        if self.proposer is not None:
            per_token = self.proposer.graph_output_features() * self.dtype.itemsize
            total += graph_output_bytes(self.config, per_token, self.proposer.prefill_graphs)
        return total

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """The target's graphs, then the proposer's (its model and extra inputs; prefill graphs if it runs
        prefill chunks), in one memory pool."""
        cuda = self.device.type == "cuda"
        free_before = torch.cuda.mem_get_info()[0] if cuda else 0
        self.graphs = CUDAGraphs(self, self.model)
        pool = self.graphs.capture()
        if self.proposer is not None:
            proposer = self.proposer
            self.proposer_graphs = CUDAGraphs(self, proposer.model, proposer.graph_inputs(), proposer.prefill_graphs)
            self.proposer_graphs.capture(pool)
        if cuda:
            torch.cuda.synchronize()
            logger.info(
                "captured %d decode CUDA graphs (batch 1..%d) and %d prefill graphs (up to %d tokens)%s using %.2f GiB",
                len(self.graphs.decode.sizes),
                self.graphs.max_batch,
                len(self.graphs.prefill.sizes),
                max(self.graphs.prefill.sizes, default=0),
                ", and as many of the proposer's" if self.proposer is not None else "",
                (free_before - torch.cuda.mem_get_info()[0]) / 2**30,
            )

    @torch.inference_mode()
    def warm_up_sampling(self) -> None:
        """Runs the LM head and the fused sampler once for every number of rows a step can sample, so
        the Triton kernels outside the CUDA graphs compile now and not in the middle of a run: the GEMV
        compiles its 1- and 2-row variants where it is used, and the sampler's launch shape follows the
        row count. Each variant costs a few hundred milliseconds once; every call after it, well under one."""
        for n in range(1, self.config.max_num_seqs + 1):
            logits = self.model.compute_logits(torch.zeros(n, self.hidden_size, dtype=self.dtype, device=self.device))
            params = [SamplingParams(temperature=1.0)] * n
            batch = build_sampling_batch(
                params, [[0]] * n, [[]] * n, [None] * n, self.vocab_size, self.device, seeds=list(range(n))
            )
            sample_on_device(logits, batch)
            if n in (1, 2, self.config.max_num_seqs):  # logprobs and penalties sample float32 logits
                sample_on_device(logits.float(), batch)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- a forward pass -----------------------------------------------------------------------
    def prepare(
        self, inputs: StepInputs, put: Put, lora: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """The device inputs of a forward pass (through `put`: fresh tensors, or a graph's buffers). lora:
        whether the pass applies adapters (a graph's variant); by default, whether any token has one, so a
        step of the base model alone launches no LoRA kernel (meta.lora stays None)."""
        ids = put("input_ids", inputs.token_ids)
        if len(inputs.pending):  # inputs sampled by the previous step, still on the device
            rows = to_device(inputs.pending, torch.int64, self.device)
            ids.index_copy_(0, rows[:, 0], self.last_tokens.index_select(0, rows[:, 1]))
        meta = self.backend.build_metadata(inputs, put)
        if self.lora is not None and (inputs.uses_lora if lora is None else lora):
            meta.lora = self.lora.build_index(inputs.lora_slots, inputs.num_tokens, put)  # beside the attention's
        return ids, put("positions", inputs.positions), meta

    def _put(self, name: str, array: np.ndarray) -> torch.Tensor:
        return to_device(array, None, self.device)

    def _forward(
        self, graphs: CUDAGraphs | None, model: nn.Module, inputs: StepInputs, **device_inputs: torch.Tensor
    ) -> Any:
        """model(ids, positions, **extra) over inputs: its graphs' replays where they hold inputs, else eager.
        device_inputs: `input_ids` on the device instead of inputs.token_ids, and the model's extra inputs."""
        if graphs is not None and (out := graphs.run(inputs, device_inputs)) is not None:
            return out
        ids, positions, meta = self.prepare(inputs, self._put)
        ids = device_inputs.pop("input_ids", ids)
        with forward_context(meta):
            return model(ids, positions, **device_inputs)

    def _forward_with_aux(self, inputs: StepInputs) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The target's hidden states, and those an EAGLE-3 proposer reads where the model gives them."""
        out = self._forward(self.graphs, self.model, inputs)
        return out if isinstance(out, tuple) else (out, None)

    def _propose_forward(self, inputs: StepInputs, **device_inputs: torch.Tensor) -> Any:
        """The proposer's model over inputs (step_inputs.Forward): what the proposers are handed each step,
        not kept, so they hold no reference back to the runner."""
        return self._forward(self.proposer_graphs, self.proposer.model, inputs, **device_inputs)

    # -- one step -----------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> PendingStep:
        """Queues one step; the returned PendingStep yields the sampled token (and logprobs) of each
        sequence that samples, in `out.sampling` order, and the prompt logprobs its prefill chunks asked
        for. Small CPU steps run single-threaded (cpu_threads.py). Swapped KV blocks are copied first
        (worker/kv_swap.py), ordered before this step's forward pass; a step may be nothing else. A KV
        connector's loads run before the forward pass too, and its saves after it (kv_transfer/)."""
        if out.has_swaps:
            self.kv_swapper.swap(out.blocks_to_swap_out, out.blocks_to_swap_in)
        if not out:
            return PendingStep(None)
        transfers = out.kv_connector_metadata
        with step_threads(self.device, out.num_tokens * self.num_weights):
            if transfers is not None:
                self.kv_connector.start_load_kv(transfers)
            pending = self._execute(out)
            if transfers is not None:
                self.kv_connector.wait_for_save(transfers)
        return pending

    @torch.inference_mode()
    def _execute(self, out: SchedulerOutput) -> PendingStep:
        sampling = out.sampling
        if self.proposer is not None:
            self.proposer.before_forward(out, self._propose_forward)
        prompt_rows = self._prompt_logprob_rows(out)
        # the step's adapters in device slots (loading any that hold none): adapter id -> slot
        lora_slots = self.lora.activate(s.seq.lora_int_id for s in out.seqs if s.seq.lora_int_id) if self.lora else None
        inputs = build_step_inputs(out.seqs, len(out.decodes), self.block_size, self.last_rows, lora_slots)
        all_hidden, aux = self._forward_with_aux(inputs)
        if self.proposer is not None:
            self.proposer.after_forward(out, inputs, aux, self._propose_forward)
        prompt_logprobs = self._prompt_logprobs(all_hidden, prompt_rows, out) if prompt_rows else None
        hidden = all_hidden[to_device(inputs.logits_indices, torch.int64, self.device)]
        if not sampling:
            self.last_tokens, self.last_rows = None, {}
            return PendingStep(None, prompt_logprobs)
        logits = self.model.compute_logits(hidden)
        # the forward pass is queued: the host fills the grammars' masks while the device runs it
        bitmask = out.fill_grammar_bitmask() if out.fill_grammar_bitmask is not None else None
        if self.config.speculative_config is not None:  # every token by one sampler: seeds stay batch-proof
            self.last_tokens, self.last_rows = None, {}  # speculation runs synchronous steps
            output = self._verify(logits, sampling, bitmask)
            output.prompt_logprobs = prompt_logprobs or {}
            return PendingStep.ready(output)
        result = self._sample(logits, sampling, bitmask)
        self.last_tokens = result.tokens
        self.last_rows = {s.seq.seq_id: i for i, s in enumerate(sampling)}
        return PendingStep(result, prompt_logprobs)

    def _sample(
        self, logits: torch.Tensor, sampling: list[ScheduledSeq], grammar_bitmask: tuple | None = None
    ) -> DeviceSample:
        """Samples one token per row. With tensor parallelism only rank 0 samples and sends the tokens to
        the other ranks (they feed the next step's pending inputs there too); see distributed/worker.py."""
        params = [s.seq.params for s in sampling]
        penalties = any(p.uses_penalties for p in params)
        seeds = self._row_seeds(sampling)
        batch = build_sampling_batch(
            params,
            [s.seq.prompt_token_ids for s in sampling],
            [s.seq.output_token_ids for s in sampling] if penalties else [[]] * len(sampling),
            [
                None if s.seq.params.seed is None else torch.Generator(self.device).manual_seed(seed)
                for s, seed in zip(sampling, seeds)
            ],
            self.vocab_size,
            self.device,
            num_outputs=[s.num_generated for s in sampling],
            seeds=seeds if self.device.type == "cuda" else None,
            grammar_bitmask=grammar_bitmask,
        )
        result = sample_on_device(logits, batch)
        broadcast_from_driver(result.tokens)
        return result

    def _verify(
        self, logits: torch.Tensor, sampling: list[ScheduledSeq], grammar_bitmask: tuple | None = None
    ) -> SamplerOutput:
        """Rejection sampling of the drafts: each sequence's rows are its token positions, so each row gets
        its position's logits processors (drafts before it count as generated) and seed."""
        rows = [(s, j) for s in sampling for j in range(s.num_sampled_rows)]
        penalties = any(s.seq.params.uses_penalties for s in sampling)
        seeds = [
            hash((s.seq.params.seed, s.seq.index, s.num_generated + j)) & (2**63 - 1)
            if s.seq.params.seed is not None
            else None
            for s, j in rows
        ]
        batch = build_sampling_batch(
            [s.seq.params for s, _ in rows],
            [s.seq.prompt_token_ids for s, _ in rows],
            [s.seq.output_token_ids + s.draft_token_ids[:j] if penalties else [] for s, j in rows],
            [None if seed is None else torch.Generator(self.device).manual_seed(seed) for seed in seeds],
            self.vocab_size,
            self.device,
            num_outputs=[s.num_generated + j for s, j in rows],
            grammar_bitmask=grammar_bitmask,
        )
        verified = rejection_sample(logits, batch, [s.draft_token_ids for s in sampling], [None] * len(sampling))
        return SamplerOutput(verified.token_ids, verified.logprobs)

    def _row_seeds(self, sampling: list[ScheduledSeq]) -> list[int]:
        """Per-row sampler seeds: a seeded request's depend only on its seed, which of its n samples it is
        and how many tokens it has made (so its tokens do not depend on its batch); the others are fresh."""
        fresh = self.seed_rng.integers(0, 2**63 - 1, size=len(sampling)).tolist()
        seeds = [s.seq.params.seed for s in sampling]
        return [
            r if seed is None else hash((seed, s.seq.index, s.num_generated)) & (2**63 - 1)
            for s, seed, r in zip(sampling, seeds, fresh)
        ]

    # -- prompt logprobs ----------------------------------------------------------------------
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

    def _prompt_logprobs(
        self, hidden: torch.Tensor, entries: list, out: SchedulerOutput, chunk_rows: int = 512
    ) -> dict[int, tuple[int, list]]:
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
