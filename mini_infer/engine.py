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
from mini_infer.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
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
    num_scheduled_tokens: int


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
    prompt_logprob_seqs: list[Sequence] = dataclasses.field(default_factory=list)


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    arrival_time: float
    final_only: bool = False
    num_unfinished: int = 0
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        self.num_unfinished = len(self.seqs)

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0


def is_device_fault(exc: BaseException) -> bool:
    """A fault that leaves the device unusable for every request (a sticky CUDA error), as opposed to one
    that a request's own data or a bug in its processing caused."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    message = str(exc)
    return isinstance(exc, RuntimeError) and any(
        marker in message for marker in ("CUDA error", "CUBLAS_STATUS", "device-side assert", "illegal memory access")
    )


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
        self.num_scheduled_tokens = 0  # over all steps: the metrics' per-iteration token counts are its steps
        self.step_timings: list[StepTiming] = []
        self._timed = device.type == "cuda"
        self.in_flight: _InFlight | None = None
        self.num_penalty_requests = 0  # while any, steps run synchronously (see the module docstring)
        # What exists now (modules, compiled kernels, graphs, the tokenizer) lives as long as the engine:
        # frozen, it is left out of Python's full collections, which would otherwise scan all of it in
        # the middle of a step. The freeze is process-wide, so a reference cycle among objects alive now
        # is not reclaimed before exit (plain references still are); unfreezing at exit lets the
        # interpreter's last collections free them (one exit hook however many engines).
        gc.collect()
        gc.freeze()
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)

    # -- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt. Thread-safe, so servers run it off the engine's thread; a text
        too long to fit max_model_len whatever its tokens is refused before it is tokenized."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list | tuple) or not all(type(t) is int for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as token ids")
            # Normalization may merge characters, hence the margin of 4.
            if len(prompt) > 4 * self.max_model_len * self.detokenizer.max_token_chars:
                raise ValueError(f"the prompt has {len(prompt)} characters, more tokens than max_model_len "
                                 f"({self.max_model_len}) holds")
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if prompt else []
        if isinstance(prompt, list | tuple) and all(type(t) is int for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def _check_params(self, params: SamplingParams) -> None:
        """The checks of a request's parameters that need the model (SamplingParams checks the rest)."""
        vocab, config = self.model_config.vocab_size, self.config
        if params.n > config.max_seqs_per_request:
            raise ValueError(f"n must be at most max_seqs_per_request={config.max_seqs_per_request}, got {params.n}")
        if params.top_k > vocab:
            raise ValueError(f"top_k must be at most the vocabulary size {vocab} (or -1 for off), got {params.top_k}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > config.max_logprobs:
                raise ValueError(f"{name} must be at most max_logprobs={config.max_logprobs}, got {value}")
        for name, ids in params.token_ids_to_check().items():
            outside = [t for t in ids if not 0 <= t < vocab]
            if outside:
                raise ValueError(f"{name} holds token ids outside the vocabulary [0, {vocab}): {outside[:4]}")

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Validates and queues a request; raises ValueError (and adds nothing) on bad input."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        params = params or SamplingParams()
        self._check_params(params)
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                "it must be shorter to leave room for generated tokens"
            )
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got one of {max(ids)}")
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
        (in the same step when async scheduling is off or a request uses penalties).

        A fault in one request's processing finishes that request with finish_reason "error" and the
        others go on; a fault in the batch's forward pass fails that batch's requests. Only a device
        fault (a CUDA error, after which nothing on the GPU can be trusted) propagates."""
        start = time.perf_counter()
        sync = not self.config.async_scheduling or self.num_penalty_requests > 0
        outputs: list[RequestOutput] = []
        waited = gpu = 0.0
        if sync and self.in_flight is not None:  # turned synchronous with a step in flight: read it first
            waited, gpu = self._finish_step(self.in_flight, outputs)
            self.in_flight = None
        out = self.scheduler.schedule()
        launched = self._launch(out, outputs) if out else None
        if self.in_flight is not None:
            waited, gpu = self._finish_step(self.in_flight, outputs)
        self.in_flight = launched
        if sync and launched is not None:
            w, gpu = self._finish_step(launched, outputs)
            waited += w
            self.in_flight = None
        if out:
            self.num_scheduled_tokens += sum(s.num_new_tokens for s in out.seqs)
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

    def _launch(self, out: SchedulerOutput, outputs: list[RequestOutput]) -> _InFlight | None:
        """Queues the batch's forward pass and sampling; counts each sampling sequence's token as pending.
        If the batch fails (and the device is fine), its requests end with an error; None is returned."""
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if self._timed else None
        if events:
            events[0].record()
        now = time.monotonic()
        for s in out.seqs:
            if s.seq.first_scheduled_time is None:
                s.seq.first_scheduled_time = now
        sampling = [s.seq for s in out.seqs if s.samples]
        try:
            pending = self.model_runner.execute(out)
        except Exception as exc:
            if is_device_fault(exc):
                raise
            ids = sorted({s.seq.request_id for s in out.seqs})
            logger.exception("a forward pass failed; failing its %d requests: %s", len(ids), ", ".join(ids))
            for rid in ids:
                self._fail_request(self.requests[rid], outputs)
            return None
        if events:
            events[1].record()
        self.scheduler.advance(out)
        for seq in sampling:
            seq.num_pending += 1
        prompt_logprob_seqs = [s.seq for s in out.prefills if s.seq.prompt_logprobs is not None]
        return _InFlight(sampling, pending, events, prompt_logprob_seqs=prompt_logprob_seqs)

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
        for seq in step.prompt_logprob_seqs:
            if not seq.is_finished and seq.seq_id in result.prompt_logprobs:
                self._guarded(seq, outputs, self._record_prompt_logprobs, seq, *result.prompt_logprobs[seq.seq_id])
        for i, seq in enumerate(step.sampling):
            seq.num_pending -= 1
            if seq.is_finished:  # stopped or aborted while this step ran: its token is dropped
                continue
            request = self.requests[seq.request_id]
            if not self._guarded(seq, outputs, self._append_token, seq, result.token_ids[i],
                                 result.logprobs[i] if result.logprobs else None):
                continue
            if request.first_token_time is None:
                request.first_token_time = time.monotonic()
            if not seq.is_finished:  # publish the block its token completed, held back while pending
                self.block_manager.cache_full_blocks(seq, min(seq.num_computed_tokens, seq.num_tokens))
            moved[seq.request_id] = request
        for r in moved.values():
            if r.request_id not in self.requests:  # failed on a later sequence: its output is out already
                continue
            if r.finished:
                del self.requests[r.request_id]
                self._forget(r)
                outputs.append(self._make_output(r))
            elif not r.final_only:
                outputs.append(self._make_output(r))
        return waited, gpu

    def _guarded(self, seq: Sequence, outputs: list[RequestOutput], fn, *args) -> bool:
        """Runs one request's processing; a fault there fails that request only. False if it failed."""
        try:
            fn(*args)
            return True
        except Exception as exc:
            if is_device_fault(exc):
                raise
            logger.exception("request %s failed while processing its output; the others go on", seq.request_id)
            if seq.request_id in self.requests:
                self._fail_request(self.requests[seq.request_id], outputs)
            return False

    def _fail_request(self, request: _Request, outputs: list[RequestOutput]) -> None:
        """Ends a request whose processing raised: finish_reason "error", its blocks freed, a final output."""
        for seq in request.seqs:
            if not seq.is_finished:
                seq.finish_reason = "error"
                request.num_unfinished -= 1
                self._free(seq)
        del self.requests[request.request_id]
        self._forget(request)
        outputs.append(self._make_output(request))

    def _forget(self, request: _Request) -> None:
        if request.seqs[0].params.uses_penalties:
            self.num_penalty_requests -= 1

    def _append_token(self, seq: Sequence, token: int, logprobs: tuple | None) -> None:
        params = seq.params
        want_logprobs = logprobs is not None and seq.logprobs is not None
        alternatives = self._alternative_texts(seq, token, logprobs) if want_logprobs else {}
        seq.token_ids.append(token)
        self.generation_tokens += 1
        new_text = ""
        if self.detokenizer is not None:
            new_text = self.detokenizer.new_text(seq)
            seq.output_text += new_text
        if want_logprobs:
            self._record_logprobs(seq, token, logprobs, new_text, alternatives)
        n_out = seq.num_output_tokens
        if n_out < params.min_tokens:
            if n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
                self._finish(seq, "length")
            return
        if not params.ignore_eos and token in params.eos_token_ids:
            self._finish(seq, "stop")
        elif token in params.stop_token_ids:
            self._finish(seq, "stop", token)
        elif new_text and params.stop and (hit := find_stop_string(seq, len(new_text))):
            stop, cut = hit
            seq.output_text = seq.output_text[:cut]
            self._finish(seq, "stop", stop, flush=False)
        elif n_out >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _alternative_texts(self, seq: Sequence, token: int, logprobs: tuple) -> dict[int, str | None]:
        """The text of each top-logprob alternative other than the sampled token, decoded in context."""
        top_ids = [t for t in logprobs[2][: seq.params.logprobs] if t != token]
        if self.detokenizer is None:
            return dict.fromkeys(top_ids)
        return dict(zip(top_ids, self.detokenizer.next_token_texts(seq, top_ids)))

    def _record_logprobs(self, seq: Sequence, token: int, logprobs: tuple, text: str,
                         alternatives: dict[int, str | None]) -> None:
        """The sampled token's text is what it added to the output, so a request's tokens join to its text."""
        sampled_lp, rank, top_ids, top_lps = logprobs
        decoded = text if self.detokenizer is not None else None
        entry = {token: Logprob(sampled_lp, rank, decoded)}
        for r, (t, lp) in enumerate(zip(top_ids[: seq.params.logprobs], top_lps), start=1):
            entry.setdefault(t, Logprob(lp, r, alternatives.get(t)))
        seq.logprobs.append(entry)
        seq.cumulative_logprob += sampled_lp

    def _record_prompt_logprobs(self, seq: Sequence, first: int, rows: list[tuple]) -> None:
        """Prompt logprobs of positions first, first + 1, ...; positions recomputed after a preemption
        are already there and skipped. Entry 0 is None (nothing predicts the first token), as in vLLM."""
        prompt = seq.prompt_token_ids
        if not seq.prompt_logprobs:
            seq.prompt_logprobs.append(None)
        texts = seq.prompt_token_texts
        if texts is None and self.detokenizer is not None:
            texts = seq.prompt_token_texts = self.detokenizer.token_texts(prompt, seq.params.skip_special_tokens)
        decode = self.detokenizer.decode if self.detokenizer is not None else (lambda t: None)
        k = seq.params.prompt_logprobs
        for position, (lp, rank, top_ids, top_lps) in enumerate(rows, start=first):
            if position < len(seq.prompt_logprobs):
                continue
            token = prompt[position]
            entry = {token: Logprob(lp, rank, texts[position] if texts is not None else None)}
            for r, (t, v) in enumerate(zip(top_ids[:k], top_lps), start=1):
                entry.setdefault(t, Logprob(v, r, decode(t)))
            seq.prompt_logprobs.append(entry)

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None,
                flush: bool = True) -> None:
        if flush and self.detokenizer is not None:
            tail = self.detokenizer.new_text(seq, flush=True)
            seq.output_text += tail
            if tail and seq.logprobs:
                last = seq.logprobs[-1][seq.token_ids[-1]]
                last.decoded_token = (last.decoded_token or "") + tail
        if not flush and seq.logprobs:  # a stop string cut the text: cut the tokens' texts to match
            excess = sum(len(e[t].decoded_token or "") for e, t in zip(seq.logprobs, seq.output_token_ids))
            excess -= len(seq.output_text)
            for entry, t in zip(reversed(seq.logprobs), reversed(seq.output_token_ids)):
                if excess <= 0:
                    break
                piece = entry[t].decoded_token or ""
                cut = min(excess, len(piece))
                entry[t].decoded_token = piece[: len(piece) - cut]
                excess -= cut
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
        first = r.seqs[0]
        scheduled = [s.first_scheduled_time for s in r.seqs if s.first_scheduled_time is not None]
        metrics = RequestMetrics(
            arrival_time=r.arrival_time,
            first_scheduled_time=min(scheduled) if scheduled else None,
            first_token_time=r.first_token_time,
            finished_time=time.monotonic() if r.finished else None,
        )
        return RequestOutput(r.request_id, r.prompt, r.prompt_token_ids, completions, r.finished,
                             first.num_cached_tokens, metrics,
                             prompt_logprobs=list(first.prompt_logprobs) if first.prompt_logprobs is not None else None)

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
            num_scheduled_tokens=self.num_scheduled_tokens,
        )
