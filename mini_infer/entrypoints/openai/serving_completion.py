"""POST /v1/completions: prompts as text, lists of text, token ids or lists of token ids."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from mini_infer.entrypoints.openai.protocol import CompletionRequest, OpenAIError, now_s, random_id
from mini_infer.entrypoints.openai.serving_base import (
    ChoiceTracker,
    OpenAIServing,
    completion_logprobs,
    prompt_logprobs_json,
    run_until_disconnected,
    sse,
    stream_errors,
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
        streams = await self.start_requests(request_id, prompts, params, request.priority, self.lora_request(model))
        if request.stream:
            chunks = self._stream(request, streams, prompts, request_id, created, model)
            return StreamingResponse(stream_errors(request_id, chunks), media_type="text/event-stream")
        finals = await run_until_disconnected(raw_request, self.collect(streams))
        return self._full_response(request, finals, prompts, request_id, created, model)

    def _echo(
        self, request: CompletionRequest, prompt: str | list[int], output: RequestOutput
    ) -> tuple[str, dict[str, Any] | None]:
        """The echoed prompt's text and, with logprobs, its tokens' logprobs (the first has none). With
        logprobs the text is the join of the prompt's token texts, so the tokens join to the choice's text."""
        if request.logprobs is None or output.prompt_logprobs is None:
            if isinstance(prompt, str):
                return prompt, None
            return (self.tokenizer.decode(prompt) if self.tokenizer is not None else ""), None
        ids = output.prompt_token_ids
        detokenizer = self.engine.detokenizer
        texts = detokenizer.token_texts(ids) if detokenizer is not None else [f"token_id:{t}" for t in ids]
        logprobs = completion_logprobs(ids, output.prompt_logprobs, request.logprobs, 0, self.tokenizer, texts)
        return "".join(texts), logprobs

    def _choice_logprobs(
        self, request: CompletionRequest, c: Any, start: int, end: int, offset: int, echoed: dict[str, Any] | None
    ) -> dict[str, Any] | None:
        if request.logprobs is None or c.logprobs is None:
            return None
        logprobs = completion_logprobs(
            c.token_ids[start:end], c.logprobs[start:end], request.logprobs, offset, self.tokenizer
        )
        if echoed is not None:
            logprobs = {k: echoed[k] + logprobs[k] for k in logprobs}
        return logprobs

    def _full_response(
        self,
        request: CompletionRequest,
        finals: list[RequestOutput | None],
        prompts: list,
        request_id: str,
        created: int,
        model: str,
    ) -> dict[str, Any]:
        choices = []
        for i, final in enumerate(finals):
            if final is None:
                continue
            prefix, echoed = self._echo(request, prompts[i], final) if request.echo else ("", None)
            for c in final.outputs:
                choice = {
                    "index": i * request.n + c.index,
                    "text": prefix + c.text,
                    "logprobs": self._choice_logprobs(request, c, 0, len(c.token_ids), len(prefix), echoed),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                if request.prompt_logprobs is not None:
                    choice["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs)
                choices.append(choice)
        choices.sort(key=lambda c: c["index"])
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage(finals),
        }

    async def _stream(
        self, request: CompletionRequest, streams: list, prompts: list, request_id: str, created: int, model: str
    ) -> AsyncIterator[str]:
        tracker = ChoiceTracker()
        finals: list[RequestOutput | None] = [None] * len(streams)
        echoed: set[int] = set()
        offsets: dict[int, int] = {}
        async for i, output in self.merge(streams):
            finals[i] = output
            for c in output.outputs:
                index = i * request.n + c.index
                delta = tracker.delta(index, c.text, c.token_ids, c.finish_reason)
                if delta is None:
                    continue
                text, start, end, finishing = delta
                prompt_part, offset = None, offsets.get(index, 0)
                if request.echo and index not in echoed:
                    echoed.add(index)
                    prefix, prompt_part = self._echo(request, prompts[i], output)
                    text, offset = prefix + text, offset + len(prefix)
                logprobs = self._choice_logprobs(request, c, start, end, offset, prompt_part)
                if logprobs is not None:
                    new_tokens = logprobs["tokens"][len(prompt_part["tokens"]) if prompt_part else 0 :]
                    offsets[index] = offset + sum(len(t) for t in new_tokens)
                choice = {
                    "index": index,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason if finishing else None,
                    "stop_reason": c.stop_reason if finishing else None,
                }
                if request.prompt_logprobs is not None and start == 0:
                    choice["prompt_logprobs"] = prompt_logprobs_json(output.prompt_logprobs)
                chunk = {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [choice],
                }
                if request.include_usage:
                    chunk["usage"] = usage(finals) if request.continuous_usage else None
                yield sse(chunk)
        if request.include_usage:
            yield sse(
                {
                    "id": request_id,
                    "object": "text_completion",
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage(finals),
                }
            )
