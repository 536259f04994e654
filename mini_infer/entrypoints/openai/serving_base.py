"""What completions and chat share: model check, adding requests, merging streams, SSE, logprobs."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from mini_infer.async_engine import AsyncLLMEngine, EngineDeadError, RequestStream
from mini_infer.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    OpenAIError,
    bad_value,
    internal_error,
)
from mini_infer.lora.request import LoRARequest
from mini_infer.outputs import RequestOutput
from mini_infer.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mini_infer.entrypoints.openai.serving_lora import ServingLoRAs

_DISCONNECT_POLL_S = 0.25
_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields)
_STREAM_DONE = object()


class OpenAIServing:
    """State every endpoint needs: the engine, the names it answers to, the tokenizer."""

    def __init__(
        self, engine: AsyncLLMEngine, served_model_names: list[str], loras: ServingLoRAs | None = None
    ) -> None:
        """loras: the LoRA adapters the `model` field may also name (enable_lora)."""
        self.engine = engine
        self.served_model_names = served_model_names
        self.loras = loras

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def check_model(self, name: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve (nor a LoRA adapter of it)."""
        if name is None or name in self.served_model_names:
            return name or self.served_model_names[0]
        if self.lora_request(name) is not None:
            return name
        raise OpenAIError(f"The model `{name}` does not exist.", status=404, param="model", code="model_not_found")

    def lora_request(self, name: str | None) -> LoRARequest | None:
        """The adapter a `model` name picks; None for the base model."""
        return self.loras.get(name) if self.loras is not None else None

    def require_tokenizer(self, why: str) -> Any:
        if self.tokenizer is None:
            raise OpenAIError(f"this model has no tokenizer, so {why}")
        return self.tokenizer

    def check_fan_out(self, num_prompts: int, n: int) -> None:
        """One HTTP request may start at most max_seqs_per_request sequences (n for each prompt)."""
        limit = self.engine.config.max_seqs_per_request
        if num_prompts * n > limit:
            what = f"{num_prompts} prompts x n={n}" if num_prompts > 1 else f"n={n}"
            raise OpenAIError(
                f"{what} asks for {num_prompts * n} sequences; at most {limit} (max_seqs_per_request) per request",
                param="n",
            )

    async def start_requests(
        self,
        base_id: str,
        prompts: list[Any],
        params: SamplingParams,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
    ) -> list[RequestStream]:
        """Adds one engine request per prompt (the async engine tokenizes in a worker thread); if the engine
        refuses one, takes back the others. lora_request: the adapter the request's model names."""
        self.check_fan_out(len(prompts), params.n)
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                request_id = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.engine.add_request(request_id, prompt, params, priority, lora_request))
        except BaseException as exc:
            self.engine.abort_nowait([s.request_id for s in streams])
            if isinstance(exc, EngineDeadError):
                raise OpenAIError(str(exc), status=503, type="server_error") from exc
            if isinstance(exc, (ValueError, TypeError)):
                raise bad_value(exc, _FIELDS) from exc
            raise
        return streams

    async def merge(self, streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Yields (prompt index, output) from all streams as they come; leaving early aborts them all."""
        if len(streams) == 1:
            async for output in self.engine.iterate(streams[0]):
                check_not_failed(output)
                yield 0, output
            return
        queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for output in self.engine.iterate(stream):
                    queue.put_nowait((i, output))
            except Exception as exc:  # noqa: BLE001 - re-raised by the consumer below
                queue.put_nowait((i, exc))
            finally:
                queue.put_nowait((i, _STREAM_DONE))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(tasks)
            while remaining:
                i, item = await queue.get()
                if item is _STREAM_DONE:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    check_not_failed(item)
                    yield i, item
        finally:
            self.engine.abort_nowait([s.request_id for s in streams if not s.finished])
            for task in tasks:
                task.cancel()

    async def collect(self, streams: list[RequestStream]) -> list[RequestOutput | None]:
        """The last output of each stream."""
        finals: list[RequestOutput | None] = [None] * len(streams)
        async for i, output in self.merge(streams):
            finals[i] = output
        return finals


def check_not_failed(output: RequestOutput) -> None:
    """A request whose processing failed in the engine ends its response with a 500 (no internals)."""
    if any(c.finish_reason == "error" for c in output.outputs):
        raise internal_error(output.request_id)


async def stream_errors(request_id: str, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    """An SSE stream's chunks, then `[DONE]`; an error after the 200 went out is one error event first."""
    try:
        async for chunk in chunks:
            yield chunk
    except OpenAIError as exc:
        yield sse(exc.body())
    except Exception:  # noqa: BLE001 - the status is already sent; the details go to the log only
        logger.exception("request %s failed while streaming", request_id)
        yield sse(internal_error(request_id).body())
    yield SSE_DONE


async def run_until_disconnected(raw_request: Request, work: Awaitable[Any]) -> Any:
    """Awaits `work`, cancelling it (and so aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await raw_request.is_disconnected():
                task.cancel()
                raise OpenAIError("client disconnected", status=499)
    finally:
        if not task.done():
            task.cancel()


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def usage(finals: list[RequestOutput | None], num_cached: bool = True) -> dict[str, Any]:
    """Token counts of the outputs so far (the final ones, or the latest for continuous usage stats)."""
    prompt_tokens = sum(len(o.prompt_token_ids) for o in finals if o is not None)
    completion_tokens = sum(len(c.token_ids) for o in finals if o is not None for c in o.outputs)
    result: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if num_cached:
        cached = sum(getattr(o, "num_cached_tokens", 0) or 0 for o in finals if o is not None)
        result["prompt_tokens_details"] = {"cached_tokens": cached}
    return result


def token_text(logprob: Any, token_id: int, tokenizer: Any) -> str:
    """The text of one token for logprobs: the engine's, which is what the token added to the output (so
    a choice's tokens join to its text); `token_id:N` where there is no tokenizer."""
    text = getattr(logprob, "decoded_token", None)
    if text is not None:
        return text
    if tokenizer is not None:
        return tokenizer.decode([token_id])
    return f"token_id:{token_id}"


def top_entries(entry: dict[int, Any], num: int) -> list[tuple[int, Any]]:
    """The `num` most likely (token id, Logprob) pairs of one position."""
    return sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:num]


def completion_logprobs(
    token_ids: list[int],
    logprobs: list[dict[int, Any] | None],
    num_top: int,
    text_offset: int,
    tokenizer: Any,
    texts: list[str] | None = None,
) -> dict[str, Any]:
    """The legacy completions shape: tokens, token_logprobs, top_logprobs, text_offset. An entry of None
    (an echoed prompt's first token) has no logprobs; `texts` overrides the tokens' texts."""
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for i, (token_id, entry) in enumerate(zip(token_ids, logprobs)):
        sampled = entry.get(token_id) if entry is not None else None
        text = texts[i] if texts is not None else token_text(sampled, token_id, tokenizer)
        tokens.append(text)
        token_logprobs.append(sampled.logprob if sampled is not None else None)
        if entry is None:
            tops.append(None)
        else:
            top = {token_text(lp, tid, tokenizer): lp.logprob for tid, lp in top_entries(entry, num_top)}
            if sampled is not None:
                top.setdefault(text, sampled.logprob)
            tops.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def prompt_logprobs_json(entries: list[dict[int, Any] | None] | None) -> list[dict[str, Any] | None] | None:
    """vLLM's `prompt_logprobs` field: per prompt token None or {token id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [
        None
        if e is None
        else {
            str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token} for t, lp in e.items()
        }
        for e in entries
    ]


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Any]], num_top: int, tokenizer: Any) -> dict[str, Any]:
    """The chat shape: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}; the tokens (and their
    bytes) join to the message's content."""
    content = []
    for token_id, entry in zip(token_ids, logprobs):
        sampled = entry.get(token_id)
        text = token_text(sampled, token_id, tokenizer)
        content.append(
            {
                "token": text,
                "logprob": sampled.logprob if sampled is not None else float("-inf"),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {
                        "token": (t := token_text(lp, tid, tokenizer)),
                        "logprob": lp.logprob,
                        "bytes": list(t.encode("utf-8")),
                    }
                    for tid, lp in top_entries(entry, num_top)
                ],
            }
        )
    return {"content": content}


class ChoiceTracker:
    """Remembers what was already streamed for each choice, to cut cumulative outputs into deltas."""

    def __init__(self) -> None:
        self.text_len: dict[int, int] = {}
        self.num_tokens: dict[int, int] = {}
        self.finished: set[int] = set()

    def delta(
        self, index: int, text: str, token_ids: list[int], finish_reason: str | None
    ) -> tuple[str, int, int, bool] | None:
        """(new text, first new token, end token, finishing now), or None when nothing changed."""
        if index in self.finished:
            return None
        start_text = self.text_len.get(index, 0)
        start_tok = self.num_tokens.get(index, 0)
        finishing = finish_reason is not None
        if len(token_ids) == start_tok and len(text) == start_text and not finishing:
            return None
        self.text_len[index] = len(text)
        self.num_tokens[index] = len(token_ids)
        if finishing:
            self.finished.add(index)
        return text[start_text:], start_tok, len(token_ids), finishing
