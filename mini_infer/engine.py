"""LLMEngine: requests in, one scheduled forward pass per `step()`, RequestOutputs back.

step() = scheduler.schedule() -> model_runner.execute() -> append tokens, detokenize, check
stops -> free what finished. Everything a request does happens inside this loop.

With async scheduling (the default) a step queues its forward pass and then reads back the tokens
of the step before it, so the host's bookkeeping overlaps the GPU's work. Sequences plan with their
pending token counted (Sequence.num_pending); one that stops on a token the host had not read yet
costs one discarded decode. Penalties need every earlier token, so while a request uses them the
engine reads each step back before scheduling the next.
"""

from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from mini_infer.block_manager import BlockManager
from mini_infer.config import EngineConfig
from mini_infer.detokenizer import Detokenizer, find_stop_string, visible_text
from mini_infer.kernels import get_ops
from mini_infer.model_loader import (
    checkpoint_dtype,
    eos_token_ids,
    load_hf_config,
    load_model,
    resolve_model_path,
)
from mini_infer.model_runner import ModelRunner, PendingStep
from mini_infer.outputs import CompletionOutput, Logprob, RequestOutput
from mini_infer.sampling_params import SamplingParams
from mini_infer.scheduler import Scheduler, SchedulerOutput
from mini_infer.sequence import Sequence

logger = logging.getLogger(__name__)

PromptType = str | list[int] | dict


@dataclass
class EngineStats:
    """Counters for metrics: gauges are current, *_tokens / num_preemptions / prefix_cache_* are totals."""

    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    num_live_tokens: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int


@dataclass(slots=True)
class StepTiming:
    """One step: the engine's CPU seconds in the step() call that queued it, other than waiting for the
    GPU; the CUDA-event seconds of its own ModelRunner.execute, set when its tokens are read back (None
    on CPU or until then; it includes any wait for the host to launch the work); and what it queued."""

    host_seconds: float
    gpu_seconds: float | None
    num_decodes: int
    num_prefill_tokens: int


@dataclass
class _InFlight:
    """A step whose forward pass is queued and whose tokens the host has not read yet."""

    sampling: list[Sequence]
    pending: PendingStep
    events: tuple[torch.cuda.Event, torch.cuda.Event] | None
    timing: StepTiming | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float
    final_only: bool = False
    num_unfinished: int = 0

    def __post_init__(self) -> None:
        self.num_unfinished = len(self.seqs)

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


def load_tokenizer(name_or_path: str, required: bool):
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        if required:
            raise ValueError(f"could not load a tokenizer from {name_or_path!r}: {e}") from e
        logger.warning("no tokenizer at %s: prompts must be token ids and outputs carry no text", name_or_path)
        return None


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.manual_seed(config.seed)
        path = resolve_model_path(config.model, config.load_format)
        self.model_config = load_hf_config(path)
        max_positions = getattr(self.model_config, "max_position_embeddings", None) or 2048
        if config.max_model_len is not None and config.max_model_len > max_positions:
            raise ValueError(
                f"max_model_len={config.max_model_len} exceeds the model's max_position_embeddings={max_positions}"
            )
        self.max_model_len = config.max_model_len or max_positions
        tokenizer_src = config.tokenizer or (str(path) if path.is_dir() else None)  # presets have none
        self.tokenizer = (load_tokenizer(tokenizer_src, required=config.load_format != "dummy")
                          if tokenizer_src else None)
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self.eos_token_ids = frozenset(eos_token_ids(path, self.model_config))
        device = config.resolved_device
        dtype = config.resolve_dtype(checkpoint_dtype(self.model_config))
        backend = config.resolved_kernel_backend
        start = time.perf_counter()
        model = load_model(path, self.model_config, get_ops(backend), dtype, device, config.load_format,
                           config.seed)
        logger.info("loaded %s (%s, %s, %s kernels) in %.1fs", config.model,
                    type(model).__name__, dtype, backend, time.perf_counter() - start)
        self.model_runner = ModelRunner(model, config, self.model_config, dtype, device, self.max_model_len)
        num_blocks = self.model_runner.init_kv_cache()
        logger.info(
            "KV pool: %d blocks of %d tokens (%.2f GiB); up to %.1f concurrent sequences of %d tokens",
            num_blocks, config.block_size, num_blocks * self.model_runner.block_bytes / 2**30,
            num_blocks * config.block_size / self.max_model_len, self.max_model_len,
        )
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(config, self.block_manager)
        self.requests: dict[str, _Request] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.step_timings: list[StepTiming] = []
        self._timed = device.type == "cuda"
        self.in_flight: _InFlight | None = None
        self.num_penalty_requests = 0  # while any, steps run synchronously (see the module docstring)
        # What exists now (modules, compiled kernels, graphs, the tokenizer) lives as long as the engine.
        # Frozen, it is left out of Python's full collections, which then scan only what the steps
        # allocate: unfrozen, one full collection stalled a batch-128 decode step for 0.25 s on the H100
        # (mini-infer bench latency, gc_during_run). The freeze is process-wide: whatever else is alive
        # now is frozen too, and a reference cycle among those objects is not reclaimed before exit
        # (plain references still are). Unfrozen at exit, so the interpreter's last collections free
        # them (one exit hook however many engines).
        gc.collect()
        gc.freeze()
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs) -> LLMEngine:
        return cls(EngineConfig(model=model, **kwargs))

    # -- requests -----------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt) if prompt else []
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Validates and queues a request; raises ValueError (and adds nothing) on bad input."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        text, ids = self._tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got one of {max(ids)}")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                "it must be shorter to leave room for generated tokens"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise ValueError(
                f"max_tokens={max_tokens} cannot fit: the prompt has {len(ids)} tokens and "
                f"max_model_len is {self.max_model_len}, leaving room for {room}"
            )
        if self.block_manager.blocks_needed(len(ids) + max_tokens) > self.block_manager.num_blocks:
            raise ValueError(
                f"{len(ids)} prompt tokens + {max_tokens} max_tokens need more KV blocks than the pool has "
                f"({self.block_manager.num_blocks} of {self.config.block_size} tokens)"
            )
        params = dataclasses.replace(params, max_tokens=max_tokens, eos_token_ids=self.eos_token_ids)
        if params.uses_penalties:
            self.num_penalty_requests += 1
        seqs = [Sequence(request_id, i, ids, params, priority) for i in range(params.n)]
        self.requests[request_id] = _Request(request_id, text, ids, seqs, time.monotonic(),
                                             final_only=params.output_kind == "final_only")
        for seq in seqs:
            self.scheduler.add(seq)
        self.prompt_tokens += len(ids)

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            request = self.requests.pop(rid, None)
            if request is None:
                continue
            self._forget(request)
            for seq in request.seqs:
                if not seq.is_finished:
                    seq.finish_reason = "abort"
                    self._free(seq)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Queues one batch, then returns an output for every request that moved in the step before it
        (in the same step when async scheduling is off or a request uses penalties)."""
        start = time.perf_counter()
        sync = not self.config.async_scheduling or self.num_penalty_requests > 0
        outputs: list[RequestOutput] = []
        waited = gpu = 0.0
        if sync and self.in_flight is not None:  # turned synchronous with a step in flight: read it first
            waited, gpu = self._finish_step(self.in_flight, outputs)
            self.in_flight = None
        out = self.scheduler.schedule()
        launched = self._launch(out) if out else None
        if self.in_flight is not None:
            waited, gpu = self._finish_step(self.in_flight, outputs)
        self.in_flight = launched
        if sync and launched is not None:
            w, gpu = self._finish_step(launched, outputs)
            waited += w
            self.in_flight = None
        if out:
            timing = StepTiming(time.perf_counter() - start - waited, None, len(out.decodes),
                                sum(s.num_new_tokens for s in out.prefills))
            self.step_timings.append(timing)
            if self.in_flight is not None:  # still queued: its GPU seconds come when it is read back
                self.in_flight.timing = timing
            elif self._timed:
                timing.gpu_seconds = gpu
        if len(self.step_timings) > 1_000_000:  # a long-running server keeps the newest half
            del self.step_timings[:500_000]
        return outputs

    def _launch(self, out: SchedulerOutput) -> _InFlight:
        """Queues the batch's forward pass and sampling; counts each sampling sequence's token as pending."""
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self._timed else None
        if events:
            events[0].record()
        sampling = [s.seq for s in out.seqs if s.samples]
        pending = self.model_runner.execute(out)
        if events:
            events[1].record()
        self.scheduler.advance(out)
        for seq in sampling:
            seq.num_pending += 1
        return _InFlight(sampling, pending, events)

    def _finish_step(self, step: _InFlight, outputs: list[RequestOutput]) -> tuple[float, float]:
        """Reads a step's tokens back, appends them, and adds the outputs of the requests that moved.
        Returns (seconds spent waiting for the GPU, the step's GPU seconds)."""
        t = time.perf_counter()
        result = step.pending.result()
        waited = time.perf_counter() - t
        gpu = 0.0
        if step.events:
            step.events[1].synchronize()
            gpu = step.events[0].elapsed_time(step.events[1]) / 1e3
            if step.timing is not None:
                step.timing.gpu_seconds = gpu
        moved: dict[str, _Request] = {}
        for i, seq in enumerate(step.sampling):
            seq.num_pending -= 1
            if seq.is_finished:  # stopped or aborted while this step ran: its token is dropped
                continue
            self._append_token(seq, result.token_ids[i], result.logprobs[i] if result.logprobs else None)
            if not seq.is_finished:  # publish the block its token completed, held back while pending
                self.block_manager.cache_full_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens))
            moved[seq.request_id] = self.requests[seq.request_id]
        for r in moved.values():
            if r.finished:
                del self.requests[r.request_id]
                self._forget(r)
                outputs.append(self._make_output(r))
            elif not r.final_only:
                outputs.append(self._make_output(r))
        return waited, gpu

    def _forget(self, request: _Request) -> None:
        if request.seqs[0].params.uses_penalties:
            self.num_penalty_requests -= 1

    def _append_token(self, seq: Sequence, token: int, logprobs: tuple | None) -> None:
        seq.token_ids.append(token)
        self.generation_tokens += 1
        params = seq.params
        if logprobs is not None and seq.logprobs is not None:
            self._record_logprobs(seq, token, logprobs)
        new_chars = 0
        if self.detokenizer is not None:
            new_text = self.detokenizer.new_text(seq)
            seq.output_text += new_text
            new_chars = len(new_text)
        n_out = seq.num_output_tokens
        if n_out < params.min_tokens:
            if n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                self._finish(seq, "length")
            return
        if not params.ignore_eos and token in params.eos_token_ids:
            self._finish(seq, "stop")
        elif token in params.stop_token_ids:
            self._finish(seq, "stop", token)
        elif new_chars and params.stop and (hit := find_stop_string(seq, new_chars)):
            stop, cut = hit
            seq.output_text = seq.output_text[:cut]
            self._finish(seq, "stop", stop, flush=False)
        elif n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _record_logprobs(self, seq: Sequence, token: int, logprobs: tuple) -> None:
        sampled_lp, rank, top_ids, top_lps = logprobs
        decode = self.detokenizer.decode if self.detokenizer is not None else (lambda t: None)
        n = seq.params.logprobs
        entry = {token: Logprob(sampled_lp, rank, decode(token))}
        for r, (t, lp) in enumerate(zip(top_ids[:n], top_lps[:n]), start=1):
            entry.setdefault(t, Logprob(lp, r, decode(t)))
        seq.logprobs.append(entry)
        seq.cumulative_logprob += sampled_lp

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None,
                flush: bool = True) -> None:
        if flush and self.detokenizer is not None:
            seq.output_text += self.detokenizer.new_text(seq, flush=True)
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        self.requests[seq.request_id].num_unfinished -= 1
        self._free(seq)

    def _free(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.model_runner.release(seq.seq_id)

    def _make_output(self, r: _Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=s.index,
                text=visible_text(s),
                token_ids=s.output_token_ids,
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for s in r.seqs
        ]
        return RequestOutput(r.request_id, r.prompt, r.prompt_token_ids, completions, r.finished,
                             r.seqs[0].num_cached_tokens)

    # -- metrics ------------------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_kv_blocks_used=bm.num_used_blocks,
            num_kv_blocks_total=bm.num_blocks,
            num_live_tokens=sum(s.num_computed_tokens for s in self.scheduler.running),
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
        )
