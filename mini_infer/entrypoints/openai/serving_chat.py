"""POST /v1/chat/completions: messages go through the tokenizer's chat template, then the engine."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from mini_infer.async_engine import AsyncLLMEngine
from mini_infer.entrypoints.openai.protocol import ChatCompletionRequest, OpenAIError, now_s, random_id
from mini_infer.entrypoints.openai.serving_base import (
    ChoiceTracker,
    OpenAIServing,
    chat_logprobs,
    prompt_logprobs_json,
    run_until_disconnected,
    sse,
    stream_errors,
    usage,
)
from mini_infer.outputs import RequestOutput

if TYPE_CHECKING:
    from mini_infer.entrypoints.openai.serving_lora import ServingLoRAs


class OpenAIServingChat(OpenAIServing):
    def __init__(
        self,
        engine: AsyncLLMEngine,
        served_model_names: list[str],
        chat_template: str | None = None,
        loras: ServingLoRAs | None = None,
    ) -> None:
        super().__init__(engine, served_model_names, loras)
        self.chat_template = chat_template

    def render_prompt(self, request: ChatCompletionRequest) -> tuple[str, list[int]]:
        """The templated conversation and its token ids (the template already holds any special tokens).
        Blocking work: the caller runs it off the event loop and the engine thread."""
        tokenizer = self.require_tokenizer("it cannot apply a chat template")
        if self.chat_template is None and not getattr(tokenizer, "chat_template", None):
            raise OpenAIError(
                "this model's tokenizer has no chat template; start the server with "
                "--chat-template FILE, or use /v1/completions"
            )
        try:
            text = tokenizer.apply_chat_template(
                request.conversation(),
                tokenize=False,
                add_generation_prompt=request.add_generation_prompt,
                chat_template=self.chat_template,
                **(request.chat_template_kwargs or {}),
            )
        except OpenAIError:
            raise
        except Exception as exc:  # noqa: BLE001 - template errors come from user content
            raise OpenAIError(f"the chat template failed on these messages: {exc}", param="messages") from exc
        if not isinstance(text, str):
            raise OpenAIError(
                "chat_template_kwargs must not change what the template returns", param="chat_template_kwargs"
            )
        return self.engine.engine.tokenize(text, add_special_tokens=False)

    async def create_chat_completion(self, request: ChatCompletionRequest, raw_request: Request) -> Any:
        model = self.check_model(request.model)
        params = request.to_sampling_params()
        self.check_fan_out(1, params.n)
        text, prompt_ids = await self.engine.run_blocking(self.render_prompt, request)
        request_id = random_id("chatcmpl")
        created = now_s()
        streams = await self.start_requests(
            request_id,
            [{"prompt": text, "prompt_token_ids": prompt_ids}],
            params,
            request.priority,
            self.lora_request(model),
        )
        if request.stream:
            chunks = self._stream(request, streams, request_id, created, model)
            return StreamingResponse(stream_errors(request_id, chunks), media_type="text/event-stream")
        finals = await run_until_disconnected(raw_request, self.collect(streams))
        return self._full_response(request, finals[0], request_id, created, model)

    def _logprobs(self, request: ChatCompletionRequest, token_ids: list[int], logprobs: Any) -> Any:
        if not request.logprobs or logprobs is None:
            return None
        return chat_logprobs(token_ids, logprobs, request.top_logprobs or 0, self.tokenizer)

    def _full_response(
        self, request: ChatCompletionRequest, final: RequestOutput | None, request_id: str, created: int, model: str
    ) -> dict[str, Any]:
        choices = []
        for c in final.outputs if final is not None else []:
            choices.append(
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self._logprobs(request, c.token_ids, c.logprobs),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        body = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage([final]),
        }
        if request.prompt_logprobs is not None and final is not None:
            body["prompt_logprobs"] = prompt_logprobs_json(final.prompt_logprobs)
        return body

    async def _stream(
        self, request: ChatCompletionRequest, streams: list, request_id: str, created: int, model: str
    ) -> AsyncIterator[str]:
        final: RequestOutput | None = None

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            body = {
                "id": request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
            }
            if request.include_usage:
                body["usage"] = usage([final]) if request.continuous_usage and final is not None else None
            return body

        tracker = ChoiceTracker()
        for index in range(request.n):
            yield sse(
                chunk(
                    [
                        {
                            "index": index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
            )
        async for _, output in self.merge(streams):
            final = output
            for c in output.outputs:
                delta = tracker.delta(c.index, c.text, c.token_ids, c.finish_reason)
                if delta is None:
                    continue
                text, start, end, finishing = delta
                logprobs = None
                if request.logprobs and c.logprobs is not None:
                    logprobs = self._logprobs(request, c.token_ids[start:end], c.logprobs[start:end])
                body = chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"content": text},
                            "logprobs": logprobs,
                            "finish_reason": c.finish_reason if finishing else None,
                            "stop_reason": c.stop_reason if finishing else None,
                        }
                    ]
                )
                if request.prompt_logprobs is not None and start == 0:
                    body["prompt_logprobs"] = prompt_logprobs_json(output.prompt_logprobs)
                yield sse(body)
        if request.include_usage:
            body = chunk([])
            body["usage"] = usage([final])
            yield sse(body)
