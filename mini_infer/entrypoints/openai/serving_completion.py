"""POST /v1/completions: prompts as text, lists of text, token ids or lists of token ids."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from mini_infer.entrypoints.openai.protocol import CompletionRequest, OpenAIError, now_s, random_id
from mini_infer.entrypoints.openai.serving_base import (
    SSE_DONE,
    ChoiceTracker,
    OpenAIServing,
    completion_logprobs,
    run_until_disconnected,
    sse,
    usage,
)
from mini_infer.outputs import RequestOutput


def split_prompts(prompt: str | list) -> list[str | list[int]]:
    """One entry per engine request: a string, or a list of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise OpenAIError("prompt must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [prompt]
    return list(prompt)


class OpenAIServingCompletion(OpenAIServing):
    async def create_completion(self, request: CompletionRequest, raw_request: Request) -> Any:
        model = self.check_model(request.model)
        params = request.to_sampling_params()
        prompts = split_prompts(request.prompt)
        if any(isinstance(p, str) for p in prompts):
            self.require_tokenizer("prompts must be token ids")
        request_id = random_id("cmpl")
        created = now_s()
        streams = await self.start_requests(request_id, prompts, params, request.priority)
        if request.stream:
            return StreamingResponse(self._stream(request, streams, prompts, request_id, created, model),
                                     media_type="text/event-stream")
        finals = await run_until_disconnected(raw_request, self.collect(streams))
        return self._full_response(request, finals, prompts, request_id, created, model)

    def _echo_text(self, prompt: str | list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        return self.tokenizer.decode(prompt) if self.tokenizer is not None else ""

    def _full_response(self, request: CompletionRequest, finals: list[RequestOutput | None],
                       prompts: list, request_id: str, created: int, model: str) -> dict[str, Any]:
        choices = []
        for i, final in enumerate(finals):
            if final is None:
                continue
            prefix = self._echo_text(prompts[i]) if request.echo else ""
            for c in final.outputs:
                logprobs = None
                if request.logprobs is not None and c.logprobs is not None:
                    logprobs = completion_logprobs(c.token_ids, c.logprobs, request.logprobs, len(prefix),
                                                   self.tokenizer)
                choices.append({"index": i * request.n + c.index, "text": prefix + c.text,
                                "logprobs": logprobs, "finish_reason": c.finish_reason,
                                "stop_reason": c.stop_reason})
        choices.sort(key=lambda c: c["index"])
        return {"id": request_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage(finals)}

    async def _stream(self, request: CompletionRequest, streams: list, prompts: list, request_id: str,
                      created: int, model: str) -> AsyncIterator[str]:
        tracker = ChoiceTracker()
        finals: list[RequestOutput | None] = [None] * len(streams)
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        try:
            async for i, output in self.merge(streams):
                finals[i] = output
                for c in output.outputs:
                    index = i * request.n + c.index
                    delta = tracker.delta(index, c.text, c.token_ids, c.finish_reason)
                    if delta is None:
                        continue
                    text, start, end, finishing = delta
                    if request.echo and index not in echoed:
                        echoed.add(index)
                        text = self._echo_text(prompts[i]) + text
                    logprobs = None
                    if request.logprobs is not None and c.logprobs is not None:
                        offset = offsets.get(index, 0)
                        logprobs = completion_logprobs(c.token_ids[start:end], c.logprobs[start:end],
                                                       request.logprobs, offset, self.tokenizer)
                        offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
                    chunk = {"id": request_id, "object": "text_completion", "created": created,
                             "model": model,
                             "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                          "finish_reason": c.finish_reason if finishing else None,
                                          "stop_reason": c.stop_reason if finishing else None}]}
                    if request.include_usage:
                        chunk["usage"] = None
                    yield sse(chunk)
            if request.include_usage:
                yield sse({"id": request_id, "object": "text_completion", "created": created,
                           "model": model, "choices": [], "usage": usage(finals)})
        except OpenAIError as exc:
            yield sse(exc.body())
        except Exception as exc:  # noqa: BLE001 - the status is already sent; report in the stream
            yield sse(OpenAIError(f"internal error: {exc!r}", status=500, type="server_error").body())
        yield SSE_DONE
