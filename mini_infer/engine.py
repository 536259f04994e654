"""LLMEngine: requests in, one scheduled forward pass per `step()`, RequestOutputs back.

step() = scheduler.schedule() -> executor.execute_model() -> scheduler.update_from_output() ->
output_processor.process(). Everything a request does happens inside this loop.

With async scheduling (the default) a step queues its forward pass and then reads back the tokens
of the step before it, so the host's bookkeeping overlaps the GPU's work. Sequences plan with their
pending token counted (Sequence.num_pending); one that stops on a token the host had not read yet
costs one discarded decode. Penalties need every earlier token, so while a request uses them the
engine reads each step back before scheduling the next, and so it does while speculating (the next step's
drafts start after the tokens this one accepts). A grammar's mask needs every earlier token too, but
only to sample: the runner asks for the masks once the forward pass is queued, and the step before is
read back then (`_grammar_bitmask`), so the host's matchers work while the device runs the model.
"""

from __future__ import annotations

import atexit
import gc
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Protocol

import torch
from transformers import AutoTokenizer

from mini_infer.attention import get_attention_backend
from mini_infer.block_manager import BlockManager
from mini_infer.config import EngineConfig
from mini_infer.detokenizer import Detokenizer
from mini_infer.distributed.executor import ExecutorError, make_executor
from mini_infer.input_processor import InputProcessor, PromptType
from mini_infer.lora.adapter import LoRAAdapter
from mini_infer.lora.manager import LoRAModelManager
from mini_infer.lora.request import LoRARequest
from mini_infer.model_loader import checkpoint_dtype, eos_token_ids, load_hf_config, load_model, resolve_model_path
from mini_infer.output_processor import OutputProcessor, is_device_fault
from mini_infer.outputs import RequestOutput
from mini_infer.sampling_params import SamplingParams
from mini_infer.scheduler import Scheduler, SchedulerOutput
from mini_infer.spec_decode.draft_model import DraftModel, plan_draft_slots
from mini_infer.spec_decode.eagle3 import Eagle3Proposer, aux_layer_ids, load_eagle3_head
from mini_infer.spec_decode.ngram import NgramProposer
from mini_infer.structured_output import StructuredOutputManager
from mini_infer.worker.model_runner import ModelRunner, PendingStep

logger = logging.getLogger(__name__)

__all__ = ["EngineStats", "LLMEngine", "PromptType", "StepObserver"]


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
    spec_num_draft_tokens: int = 0  # speculative decoding: draft tokens verified, accepted, accepted per position
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_per_pos: list[int] = field(default_factory=list)
    num_swapped: int = 0  # swap preemption: sequences in host blocks now; swaps out and in, in total
    num_swap_outs: int = 0
    num_swap_ins: int = 0
    num_host_blocks_used: int = 0
    num_host_blocks_total: int = 0
    kv_transfer_loaded_tokens: int = 0  # KV connector: prompt tokens loaded instead of computed, and saved
    kv_transfer_saved_tokens: int = 0


class StepObserver(Protocol):
    """Watches the step loop from outside (the benchmarks' step timer is one)."""

    def launching(self, out: SchedulerOutput) -> None: ...  # the step's forward pass is about to be queued

    def launched(self, out: SchedulerOutput, pending: PendingStep) -> None: ...  # and now it is

    def step_done(self, seconds: float, read: list[PendingStep]) -> None: ...  # step() took seconds; it read these


@dataclass
class _InFlight:
    """A step whose forward pass is queued and whose tokens the host has not read yet."""

    out: SchedulerOutput
    pending: PendingStep


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
        self.tokenizer = (
            load_tokenizer(tokenizer_src, required=config.load_format != "dummy") if tokenizer_src else None
        )
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        self.eos_token_ids = frozenset(eos_token_ids(path, self.model_config))
        # tensor parallelism: starts the other ranks, which build their shards while this one does
        self.executor = make_executor(config, path, self.max_model_len)
        device = config.resolved_device
        dtype = config.resolve_dtype(checkpoint_dtype(self.model_config))
        backend = get_attention_backend(config.resolved_kernel_backend, config.block_size, device)
        start = time.perf_counter()
        model = load_model(
            path, self.model_config, backend.ops, dtype, device, config.load_format, config.seed, config.quantization
        )
        logger.info(
            "loaded %s (%s, %s, %s kernels) in %.1fs",
            config.model,
            type(model).__name__,
            dtype,
            backend.ops.name,
            time.perf_counter() - start,
        )
        spec = config.speculative_config
        proposer = self._load_proposer(spec, model, backend, dtype, device) if spec else None
        # enable_lora: the projections take adapters, whose slots are allocated now (before the KV pool)
        self.lora_manager = (
            LoRAModelManager(model, config.max_loras, config.max_lora_rank, dtype, device, backend.ops)
            if config.enable_lora
            else None
        )
        self.model_runner = ModelRunner(
            model, config, self.model_config, dtype, device, self.max_model_len, backend, proposer, self.lora_manager
        )
        num_blocks = self.model_runner.init_kv_cache()
        logger.info(
            "KV pool: %d blocks of %d tokens (%.2f GiB); up to %.1f concurrent sequences of %d tokens",
            num_blocks,
            config.block_size,
            num_blocks * self.model_runner.kv_cache.block_bytes / 2**30,
            num_blocks * config.block_size / self.max_model_len,
            self.max_model_len,
        )
        self.executor.bind(self.model_runner)
        block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        propose = None
        if spec is not None:
            ngram = NgramProposer(spec.prompt_lookup_min, spec.prompt_lookup_max)
            propose = plan_draft_slots if proposer is not None else ngram
        swapper = self.model_runner.kv_swapper  # swap preemption's host pool (worker/kv_swap.py)
        host_blocks = swapper.num_blocks if swapper is not None else 0
        if swapper is not None and host_blocks == 0:
            logger.warning("swap_space=%s GiB holds no KV block: every preemption recomputes", config.swap_space)
        connector = None
        if config.kv_transfer_config is not None:  # prefill/decode disaggregation (docs/disaggregation.md)
            from mini_infer.kv_transfer.factory import make_kv_connector

            seed = f"|seed {config.seed}" if config.load_format == "dummy" else ""  # dummy weights: the seed's
            model_id = f"{path.resolve()}|{dtype}|{config.quantization}{seed}"
            connector = make_kv_connector(config.kv_transfer_config, self.model_runner.kv_cache, model_id)
            self.model_runner.kv_connector = connector
        self.kv_connector = connector
        self.scheduler = Scheduler(config, block_manager, self.max_model_len, propose, host_blocks, connector)
        self.input_processor = InputProcessor(
            config, self.model_config, self.detokenizer, self.max_model_len, self.eos_token_ids, self.scheduler.fits
        )
        self.output_processor = OutputProcessor(self.detokenizer, self.scheduler)
        self.observer: StepObserver | None = None
        self._structured: StructuredOutputManager | None = None  # made on the first constrained request
        self._structured_lock = threading.Lock()
        self.grammar_waiting: dict[str, tuple[object, Future]] = {}  # request id -> (request, its grammar)
        self.in_flight: _InFlight | None = None
        self.prompt_tokens = 0
        self.num_scheduled_tokens = 0  # over all steps: the metrics' per-iteration token counts are its steps
        # What exists now (modules, compiled kernels, graphs, the tokenizer) lives as long as the engine:
        # frozen, it is left out of Python's full collections, which would otherwise scan all of it in
        # the middle of a step. The freeze is process-wide, so a reference cycle among objects alive now
        # is not reclaimed before exit (plain references still are); unfreezing at exit lets the
        # interpreter's last collections free them (one exit hook however many engines).
        gc.collect()
        gc.freeze()
        atexit.unregister(gc.unfreeze)
        atexit.register(gc.unfreeze)

    def _load_proposer(self, spec, model, backend, dtype, device) -> DraftModel | Eagle3Proposer | None:
        """The model a speculative method proposes with (n-gram needs none): a draft model of the target's
        vocabulary, or an EAGLE-3 head reading the target's hidden states."""
        if spec.method == "ngram":
            return None
        path = resolve_model_path(spec.model, self.config.load_format)
        if spec.method == "eagle3":
            if not hasattr(getattr(model, "model", None), "aux_layers"):
                raise ValueError(f"EAGLE-3 needs a Llama-family target; {type(model).__name__} gives no hidden states")
            head = load_eagle3_head(path, model, backend.ops, dtype, device)
            model.model.aux_layers = aux_layer_ids(head.config, len(model.model.layers))
            return Eagle3Proposer(head, self.config.block_size)
        draft_config = load_hf_config(path)
        if draft_config.vocab_size != self.model_config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft_config.vocab_size}) differs from the "
                f"target's ({self.model_config.vocab_size}); they must share a tokenizer"
            )
        if (getattr(draft_config, "max_position_embeddings", None) or 2048) < self.max_model_len:
            raise ValueError(
                f"the draft model takes {draft_config.max_position_embeddings} positions, fewer than "
                f"max_model_len={self.max_model_len}"
            )
        draft = load_model(path, draft_config, backend.ops, dtype, device, self.config.load_format, self.config.seed)
        return DraftModel(draft, self.config.block_size)

    # -- requests -----------------------------------------------------------------------------
    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt; thread-safe, so servers run it off the engine's thread."""
        return self.input_processor.tokenize(prompt, add_special_tokens)

    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """Validates and queues a request; raises ValueError (and adds nothing) on bad input. lora_request:
        the adapter it runs with (registered here on first use), None for the base model."""
        if request_id in self.output_processor.requests or request_id in self.grammar_waiting:
            raise ValueError(f"request id {request_id!r} is already in use")
        if lora_request is not None:
            self.add_lora(lora_request)
        request = self.input_processor.process(
            request_id, prompt, params or SamplingParams(), priority, lora_request=lora_request
        )
        spec = request.outputs[0].seq.params.structured_outputs
        if spec is not None:  # waits here, off the scheduler, until its grammar compiles
            self.grammar_waiting[request_id] = (request, self.structured.submit(spec))
            return
        self._admit(request)

    @property
    def structured(self) -> StructuredOutputManager:
        with self._structured_lock:  # the server's threads check grammars too
            if self._structured is None:
                self._structured = StructuredOutputManager(
                    self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids)
                )
        return self._structured

    @property
    def _grammars_active(self) -> bool:
        """Whether a running sequence follows a grammar (its masks and matchers need every step)."""
        return self._structured is not None and self._structured.num_active > 0

    def check_structured_outputs(self, params: SamplingParams) -> None:
        """ValueError with the compiler's message if params' grammar does not compile; blocks while it
        compiles, so callers off the step loop (the server) use it before add_request."""
        if params.structured_outputs is not None:
            self.structured.check(params.structured_outputs)

    def _admit_grammar_ready(self, outputs: list[RequestOutput]) -> None:
        """Hands the requests whose grammar compiled to the scheduler; a grammar that did not compile
        ends its request with finish_reason "error"."""
        if not self.grammar_waiting:
            return
        if not self.scheduler.running and not self.scheduler.waiting:  # nothing else to do: wait a little
            wait([f for _, f in self.grammar_waiting.values()], timeout=0.05, return_when="FIRST_COMPLETED")
        for rid, (request, future) in list(self.grammar_waiting.items()):
            if not future.done():
                continue
            del self.grammar_waiting[rid]
            self._admit(request)
            if future.exception() is not None:
                logger.warning("request %s: %s", rid, future.exception())
                outputs += self.output_processor.fail([rid])
                continue
            for out in request.outputs:
                self.structured.add(out.seq, future.result())

    def _admit(self, request) -> None:
        self.output_processor.add(request)
        for out in request.outputs:
            self.scheduler.add(out.seq)
        self.prompt_tokens += len(request.prompt_token_ids)

    # -- LoRA adapters (vLLM's add_lora / remove_lora / list_loras) ------------------------------
    def add_lora(self, lora_request: LoRARequest, loaded: LoRAAdapter | None = None) -> bool:
        """Registers an adapter (its weights read and checked now, on the host; put in a device slot when a
        step needs it). False if it is registered already; ValueError if it cannot be applied, if its id
        names another adapter, or without enable_lora. loaded: the adapter as `load_lora` read it (the
        async engine reads it off the engine's thread)."""
        manager = self._require_lora()
        if not isinstance(lora_request, LoRARequest):
            raise ValueError(f"lora_request must be a LoRARequest, got {type(lora_request).__name__}")
        known = manager.adapters.get(lora_request.lora_int_id)
        if known is not None:
            if known.request != lora_request:
                raise ValueError(
                    f"lora_int_id {lora_request.lora_int_id} is already adapter {known.request.lora_name!r} "
                    f"({known.request.lora_path}); remove it first or pick another id"
                )
            return False
        manager.add(loaded if loaded is not None else manager.load(lora_request))
        return True

    def load_lora(self, lora_request: LoRARequest) -> LoRAAdapter:
        """Reads and checks an adapter's folder without registering it (thread-safe)."""
        return self._require_lora().load(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        """Unregisters an adapter and frees its slot; False if it was not registered. ValueError while
        unfinished requests still use it."""
        manager = self._require_lora()
        users = [
            rid
            for rid, state in [*self.output_processor.requests.items(), *self.grammar_waiting.items()]
            if (state if not isinstance(state, tuple) else state[0]).outputs[0].seq.lora_int_id == lora_id
        ]
        if users:
            raise ValueError(f"LoRA adapter {lora_id} is in use by {len(users)} unfinished request(s)")
        return manager.remove(lora_id)

    def list_loras(self) -> set[int]:
        return set(self._require_lora().adapters)

    def _require_lora(self) -> LoRAModelManager:
        if self.lora_manager is None:
            raise ValueError("LoRA adapters need an engine started with enable_lora=True")
        return self.lora_manager

    def abort_request(self, request_id: str | Iterable[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else list(request_id):
            self.grammar_waiting.pop(rid, None)
            self.output_processor.abort(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.output_processor.requests or self.grammar_waiting)

    def get_num_unfinished_requests(self) -> int:
        return len(self.output_processor.requests) + len(self.grammar_waiting)

    # -- the loop -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Queues one batch, then returns an output for every request that moved in the step before it
        (in the same step when async scheduling is off or a request uses penalties).

        A fault in one request's processing finishes that request with finish_reason "error" and the
        others go on; a fault in the batch's forward pass fails that batch's requests. Only a device
        fault (a CUDA error, after which nothing on the GPU can be trusted) propagates."""
        start = time.perf_counter()
        sync = (
            not self.config.async_scheduling
            or self.output_processor.num_penalty_requests > 0
            or self.config.speculative_config is not None
        )  # a verified run's length is read back first
        outputs: list[RequestOutput] = []
        read: list[PendingStep] = []
        if sync and self.in_flight is not None:  # turned synchronous with a step in flight: read it first
            outputs += self._update(self.in_flight, read)
            self.in_flight = None
        self._admit_grammar_ready(outputs)
        out = self.scheduler.schedule()
        if out and self._grammars_active:
            out.fill_grammar_bitmask = lambda: self._grammar_bitmask(out, outputs, read)
        launched = self._execute(out, outputs) if out or out.has_swaps else None
        if self.in_flight is not None:
            outputs += self._update(self.in_flight, read)
        self.in_flight = launched
        if sync and launched is not None:
            outputs += self._update(launched, read)
            self.in_flight = None
        self.num_scheduled_tokens += out.num_tokens
        if self.observer is not None:
            self.observer.step_done(time.perf_counter() - start, read)
        return outputs

    def _grammar_bitmask(
        self, out: SchedulerOutput, outputs: list[RequestOutput], read: list[PendingStep]
    ) -> tuple[list[int], torch.Tensor] | None:
        """The step's grammar masks, filled while its forward pass runs (the runner calls this once it is
        queued). A mask needs every token before it, so the step before is read back first: by now the
        device has finished it, and the matchers take its tokens before this step's rows are filled."""
        if self.in_flight is not None:
            outputs += self._update(self.in_flight, read)
            self.in_flight = None
        self._structured.prune()
        return self._structured.bitmask(out.sampling)

    def _execute(self, out: SchedulerOutput, outputs: list[RequestOutput]) -> _InFlight | None:
        """Queues the batch's forward pass and sampling. If it fails (and the device is fine), the batch's
        requests end with an error and None is returned."""
        if self.observer is not None:
            self.observer.launching(out)
        try:
            pending = self.executor.execute_model(out)
        except Exception as exc:
            if is_device_fault(exc) or isinstance(exc, ExecutorError):  # a lost rank stops all
                raise
            ids = sorted({s.seq.request_id for s in out.seqs})
            logger.exception("a forward pass failed; failing its %d requests: %s", len(ids), ", ".join(ids))
            outputs += self.output_processor.fail(ids)
            return None
        if self.observer is not None:
            self.observer.launched(out, pending)
        return _InFlight(out, pending)

    def _update(self, step: _InFlight, read: list[PendingStep]) -> list[RequestOutput]:
        """Reads a step's tokens back; the scheduler takes them, then the output processor."""
        result = step.pending.result()
        read.append(step.pending)
        taken = self.scheduler.update_from_output(step.out, result.token_ids)
        if self._grammars_active:
            self._structured.accept(taken)
        return self.output_processor.process(step.out, taken, result)

    def shutdown(self) -> None:
        """Stops the other tensor-parallel ranks (at exit they stop by themselves)."""
        self.executor.shutdown()

    # -- metrics ------------------------------------------------------------------------------
    @property
    def stats(self) -> EngineStats:
        scheduler = self.scheduler
        bm = scheduler.block_manager
        return EngineStats(
            num_running=len(scheduler.running),
            num_waiting=len(scheduler.waiting),
            num_kv_blocks_used=bm.num_used_blocks,
            num_kv_blocks_total=bm.num_blocks,
            num_live_tokens=sum(s.num_computed_tokens for s in scheduler.running),
            prefix_cache_queries=bm.prefix_cache_queries,
            prefix_cache_hits=bm.prefix_cache_hits,
            num_preemptions=scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.output_processor.generation_tokens,
            num_scheduled_tokens=self.num_scheduled_tokens,
            spec_num_draft_tokens=scheduler.spec_num_draft_tokens,
            spec_num_accepted_tokens=scheduler.spec_num_accepted_tokens,
            spec_num_accepted_per_pos=list(scheduler.spec_num_accepted_per_pos),
            num_swapped=len(scheduler.swapped),
            num_swap_outs=scheduler.num_swap_outs,
            num_swap_ins=scheduler.num_swap_ins,
            num_host_blocks_used=scheduler.host_blocks.num_used_blocks,
            num_host_blocks_total=scheduler.host_blocks.num_blocks,
            kv_transfer_loaded_tokens=self.kv_connector.num_loaded_tokens if self.kv_connector else 0,
            kv_transfer_saved_tokens=self.kv_connector.num_saved_tokens if self.kv_connector else 0,
        )
