"""AsyncLLMEngine: the blocking LLMEngine driven by a background thread, for asyncio servers.

`LLMEngine.step()` is blocking compute, so it must never run on the event loop. One dedicated
thread owns the engine: it applies the adds and aborts that callers queue (thread-safely), runs
`step()` while there is work, and hands each step's outputs back to the callers' event loops.
Every request added while a step runs joins the next step, so all live requests share each step
(continuous batching).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

from mini_infer.outputs import RequestOutput
from mini_infer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5


class EngineDeadError(RuntimeError):
    """The background loop stopped (a step raised, or the engine was shut down)."""


class RequestMetricsObserver(Protocol):
    """Receives per-request latencies (seconds) and per-step token counts as they happen; the Prometheus
    metrics implement it. `output` is the request's last RequestOutput (None when aborted before one)."""

    def observe_first_token(self, seconds: float) -> None: ...

    def observe_inter_token(self, seconds: float) -> None: ...

    def observe_finished(self, finished_reason: str, e2e_seconds: float, output: RequestOutput | None) -> None: ...

    def observe_iteration(self, num_tokens: int) -> None: ...


class RequestStream:
    """The outputs of one request, moved from the engine thread to the caller's event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.loop = loop
        self.queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()
        self.finished = False
        self.arrival_time = time.monotonic()
        self.last_token_time: float | None = None

    def put(self, item: RequestOutput | BaseException | None) -> None:
        """Runs on the stream's loop."""
        self.queue.put_nowait(item)

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        """Yields cumulative outputs until the finished one; None means aborted without a last output.

        Outputs are cumulative, so when a slow consumer lets several pile up only the newest is
        yielded: under load a client gets fewer, larger deltas instead of falling further behind.
        """
        while True:
            item = await self.queue.get()
            while isinstance(item, RequestOutput) and not item.finished and not self.queue.empty():
                item = self.queue.get_nowait()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return


@dataclasses.dataclass
class _AddOp:
    stream: RequestStream
    prompt: Any
    params: SamplingParams
    priority: int
    done: concurrent.futures.Future
    lora_request: Any = None


class AsyncLLMEngine:
    """Runs an LLMEngine in a background thread; `generate()` is an async iterator of its outputs."""

    def __init__(self, engine: Any, observer: RequestMetricsObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self._adds: collections.deque[_AddOp] = collections.deque()
        self._aborts: collections.deque[str] = collections.deque()
        self._calls: collections.deque[tuple[Any, tuple, concurrent.futures.Future]] = collections.deque()
        self._wakeup = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._streams_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._stopping = False
        self.dead_error: BaseException | None = None
        self.latest_stats: Any = _read_stats(engine)
        self.num_steps = 0
        # Tokenization and chat templates run here: off the event loop, and off the engine thread, where a
        # long prompt would stall every stream's next step.
        self._blocking_pool = concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="mini-infer-tokenize")

    @classmethod
    def from_config(cls, config: Any, observer: RequestMetricsObserver | None = None) -> AsyncLLMEngine:
        from mini_infer import LLMEngine

        return cls(LLMEngine(config), observer=observer)

    # ---- what servers read -------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return getattr(self.engine, "tokenizer", None)

    @property
    def detokenizer(self) -> Any:
        return getattr(self.engine, "detokenizer", None)

    @property
    def config(self) -> Any:
        return self.engine.config

    async def run_blocking(self, fn: Any, *args: Any) -> Any:
        """Runs blocking, request-sized work (tokenizing, templating) in a worker thread."""
        return await asyncio.get_running_loop().run_in_executor(self._blocking_pool, fn, *args)

    async def tokenize(self, prompt: Any) -> tuple[str | None, list[int]]:
        """The engine's (text, token ids) of a prompt, computed in a worker thread."""
        return await self.run_blocking(self.engine.tokenize, prompt)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def healthy(self) -> bool:
        """True until the loop has died; a loop not yet started (no request so far) is healthy."""
        return self.dead_error is None and not self._stopping

    # ---- request API ---------------------------------------------------------------------------
    async def add_request(
        self, request_id: str, prompt: Any, params: SamplingParams, priority: int = 0, lora_request: Any = None
    ) -> RequestStream:
        """Queues a request for the next step and waits until the engine accepted it.

        Raises the engine's ValueError (bad prompt, too long, duplicate id) before any output, so a
        server can answer 400 before it starts a streaming response. A text prompt is tokenized here,
        in a worker thread, so the engine thread only ever sees token ids.
        """
        if self.dead_error is not None or self._stopping:
            raise EngineDeadError("the engine loop is not running") from self.dead_error
        if not (isinstance(prompt, dict) and "prompt_token_ids" in prompt):
            text, ids = await self.tokenize(prompt)
            prompt = {"prompt": text, "prompt_token_ids": ids}
        if params.structured_outputs is not None:  # a grammar that does not compile is a ValueError here
            await self.run_blocking(self.engine.check_structured_outputs, params)
        self._ensure_started()
        stream = RequestStream(request_id, asyncio.get_running_loop())
        with self._streams_lock:
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._adds.append(_AddOp(stream, prompt, params, priority, done, lora_request))
        self._wakeup.set()
        try:
            await asyncio.wrap_future(done)
        except BaseException:
            with self._streams_lock:
                self._streams.pop(request_id, None)
            if done.cancelled() or not done.done() or done.exception() is None:
                # Cancelled while waiting: it may still be added, so take it back out.
                self._aborts.append(request_id)
                self._wakeup.set()
            raise
        return stream

    async def add_lora(self, lora_request: Any) -> bool:
        """Registers an adapter: read and checked in a worker thread, then added on the engine's thread
        between two steps (ValueError if it cannot be applied)."""
        adapter = await self.run_blocking(self.engine.load_lora, lora_request)
        return await self._on_engine_thread(self.engine.add_lora, lora_request, adapter)

    async def remove_lora(self, lora_id: int) -> bool:
        return await self._on_engine_thread(self.engine.remove_lora, lora_id)

    async def _on_engine_thread(self, fn: Any, *args: Any) -> Any:
        """Runs fn(*args) on the engine's thread between steps and returns its result (or raises its error)."""
        if self.dead_error is not None or self._stopping:
            raise EngineDeadError("the engine loop is not running") from self.dead_error
        self._ensure_started()
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.append((fn, args, done))
        self._wakeup.set()
        return await asyncio.wrap_future(done)

    async def generate(
        self, prompt: Any, params: SamplingParams, request_id: str | None = None, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Yields the request's cumulative RequestOutputs; leaving early (cancel, break) aborts it."""
        request_id = request_id or uuid.uuid4().hex
        stream = await self.add_request(request_id, prompt, params, priority)
        async for output in self.iterate(stream):
            yield output

    async def iterate(self, stream: RequestStream) -> AsyncIterator[RequestOutput]:
        """Yields a stream's outputs; aborts the request if the caller stops before it finished."""
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort_nowait(stream.request_id)

    async def abort(self, request_id: str | Iterable[str]) -> None:
        self.abort_nowait(request_id)

    def abort_nowait(self, request_id: str | Iterable[str]) -> None:
        """Ends the request's stream now and frees its KV blocks at the engine's next turn."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        for rid in ids:
            with self._streams_lock:
                stream = self._streams.pop(rid, None)
            if stream is None:
                continue
            stream.finished = True
            self._observe_finished(stream, "abort", time.monotonic(), None)
            _call_soon(stream.loop, stream.put, None)
            self._aborts.append(rid)
        self._wakeup.set()

    def shutdown(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self._blocking_pool.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ---- the background loop -------------------------------------------------------------------
    def _ensure_started(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mini-infer-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._apply_pending()
                if not self.engine.has_unfinished_requests():
                    self.latest_stats = _read_stats(self.engine)
                    self._wakeup.wait(_IDLE_WAIT_S)
                    self._wakeup.clear()
                    continue
                outputs = self.engine.step()
                now = time.monotonic()
                self.num_steps += 1
                previous, self.latest_stats = self.latest_stats, _read_stats(self.engine)
                self._observe_iteration(previous, self.latest_stats)
                if outputs:
                    self._dispatch(outputs, now)
        except BaseException as exc:  # the engine is unusable now: tell every waiting caller
            logger.exception("engine loop died")
            self.dead_error = exc
            self._fail_everything(exc)

    def _apply_pending(self) -> None:
        """Calls (adapter registration) first, then adds, then aborts: an abort queued while its add still
        waits must come after it."""
        while self._calls:
            fn, args, done = self._calls.popleft()
            if not done.set_running_or_notify_cancel():
                continue
            try:
                done.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)
        while self._adds:
            op = self._adds.popleft()
            if not op.done.set_running_or_notify_cancel():
                continue
            try:
                self.engine.add_request(
                    op.stream.request_id, op.prompt, op.params, priority=op.priority, lora_request=op.lora_request
                )
            except Exception as exc:  # noqa: BLE001 - handed to the caller, who turns it into a 400
                op.done.set_exception(exc)
            else:
                op.done.set_result(None)
        while self._aborts:
            rid = self._aborts.popleft()
            try:
                self.engine.abort_request(rid)
            except (KeyError, ValueError):
                pass

    def _dispatch(self, outputs: list[RequestOutput], now: float) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, RequestOutput]]] = {}
        with self._streams_lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    stream.finished = True
                    del self._streams[output.request_id]
                self._observe_step(stream, output, now)
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():
            _call_soon(loop, _deliver, items)

    def _observe_step(self, stream: RequestStream, output: RequestOutput, now: float) -> None:
        if self.observer is not None:
            if stream.last_token_time is None:
                self.observer.observe_first_token(now - stream.arrival_time)
            else:
                self.observer.observe_inter_token(now - stream.last_token_time)
        stream.last_token_time = now
        if output.finished:
            reason = output.outputs[0].finish_reason if output.outputs else None
            self._observe_finished(stream, reason or "stop", now, output)

    def _observe_finished(self, stream: RequestStream, reason: str, now: float, output: RequestOutput | None) -> None:
        if self.observer is not None:
            self.observer.observe_finished(reason, now - stream.arrival_time, output)

    def _observe_iteration(self, before: Any, after: Any) -> None:
        """Tokens the step just taken computed, from the engine's running count."""
        if self.observer is None or before is None or after is None:
            return
        num_tokens = getattr(after, "num_scheduled_tokens", 0) - getattr(before, "num_scheduled_tokens", 0)
        if num_tokens > 0:
            self.observer.observe_iteration(num_tokens)

    def _fail_everything(self, exc: BaseException) -> None:
        error = EngineDeadError(f"the engine loop died: {exc!r}")
        while self._calls:
            _, _, done = self._calls.popleft()
            if done.set_running_or_notify_cancel():
                done.set_exception(error)
        while self._adds:
            op = self._adds.popleft()
            if op.done.set_running_or_notify_cancel():
                op.done.set_exception(error)
        with self._streams_lock:
            streams = list(self._streams.values())
            self._streams.clear()
        for stream in streams:
            stream.finished = True
            _call_soon(stream.loop, stream.put, error)


def _deliver(items: list[tuple[RequestStream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.put(output)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is listening any more
        pass


def _read_stats(engine: Any) -> Any:
    stats = getattr(engine, "stats", None)
    return dataclasses.replace(stats) if dataclasses.is_dataclass(stats) else stats
