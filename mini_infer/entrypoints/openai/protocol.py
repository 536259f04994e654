"""Request bodies of the OpenAI API (plus vLLM's extra sampling fields) and the error shape.

Only the request side is modelled: pydantic checks types strictly (`"stream": "yes"` and `"n": 2.5`
are 400s, as on OpenAI), SamplingParams and the engine check values (one place for the rules), and
responses are plain dicts built by the serving modules. A field this server does not implement is
refused with a 400 that names it, never silently ignored: it would change what the client gets.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mini_infer.sampling_params import SamplingParams, StructuredOutputsParams


class OpenAIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def internal_error(request_id: str | None = None) -> OpenAIError:
    """The 500 a client gets: no exception text, which the server log holds under the same request id."""
    where = f" (request {request_id}; the server log has the details)" if request_id else ""
    return OpenAIError(f"internal server error{where}", status=500, type="server_error")


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


# Fields of the OpenAI or vLLM APIs that mini-infer does not implement yet; sent with a value, they are a 400.
NOT_SUPPORTED = {
    "structured outputs": ("guided_whitespace_pattern",),
    "tool calling": ("functions", "function_call"),
    "beam search": ("use_beam_search", "length_penalty"),
    "this parameter": (
        "bad_words",
        "truncate_prompt_tokens",
        "logits_processors",
        "prediction",
        "audio",
        "web_search_options",
        "reasoning_effort",
        "verbosity",
        "continue_final_message",
        "documents",
        "mm_processor_kwargs",
        "return_tokens_as_token_ids",
        "kv_transfer_params",
        "vllm_xargs",
        "cache_salt",
        "add_special_tokens",
        "spaces_between_special_tokens",
    ),
}
# Fields that change nothing in the answer: accepted and ignored.
IGNORED = frozenset(
    {
        "user",
        "metadata",
        "store",
        "service_tier",
        "prompt_cache_key",
        "safety_identifier",
        "parallel_tool_calls",
        "request_id",
    }
)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _SamplingFields(BaseModel):
    """Fields shared by completions and chat."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's extras (the OpenAI client sends them through extra_body).
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    priority: int = 0
    # structured outputs (docs/structured_outputs.md): OpenAI's response_format, vLLM's fields
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # xgrammar is the only one; the name is checked, not used

    @model_validator(mode="after")
    def _refuse_what_is_not_implemented(self) -> _SamplingFields:
        given = {k for k, v in (self.model_extra or {}).items() if v is not None}
        for feature, names in NOT_SUPPORTED.items():
            for name in names:
                if name in given:
                    raise ValueError(f"{name}: {feature} is not supported by mini-infer yet")
        unknown = sorted(given - IGNORED - {n for names in NOT_SUPPORTED.values() for n in names})
        if unknown:
            raise ValueError(f"unrecognized request argument(s): {', '.join(unknown)}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        logit_bias = None
        if self.logit_bias:
            try:
                logit_bias = {int(k): v for k, v in self.logit_bias.items()}
            except ValueError:
                raise OpenAIError("logit_bias keys must be token ids", param="logit_bias") from None
        values = {
            "n": self.n,
            "temperature": 1.0 if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "top_k": -1 if self.top_k is None else self.top_k,
            "min_p": 0.0 if self.min_p is None else self.min_p,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty,
            "seed": self.seed,
            "max_tokens": max_tokens,
            "min_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "logprobs": logprobs,
            "prompt_logprobs": self.prompt_logprobs,
            "logit_bias": logit_bias,
            "allowed_token_ids": self.allowed_token_ids,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "structured_outputs": self._structured_outputs(),
        }
        try:
            return SamplingParams(**values)
        except (ValueError, TypeError) as exc:
            raise bad_value(exc, values) from exc

    def _structured_outputs(self) -> StructuredOutputsParams | None:
        """One StructuredOutputsParams from whichever of the request's fields asks for it (at most one)."""
        specs: dict[str, dict[str, Any]] = {}
        fmt = self.response_format
        if fmt is not None:
            kind = fmt.get("type")
            if kind == "json_object":
                specs["response_format"] = {"json_object": True}
            elif kind == "json_schema":
                schema = (fmt.get("json_schema") or {}).get("schema")
                if not isinstance(schema, dict):
                    raise OpenAIError("response_format: json_schema.schema must be an object", param="response_format")
                specs["response_format"] = {"json": schema}
            elif kind not in (None, "text"):
                raise OpenAIError(
                    f"response_format: type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                    param="response_format",
                )
        if self.structured_outputs is not None:
            specs["structured_outputs"] = dict(self.structured_outputs)
        for name in ("json", "regex", "choice", "grammar"):
            value = getattr(self, f"guided_{name}")
            if value is not None:
                specs[f"guided_{name}"] = {name: value}
        if self.guided_decoding_backend not in (None, "auto", "xgrammar"):
            raise OpenAIError("guided_decoding_backend: only xgrammar is available", param="guided_decoding_backend")
        if not specs:
            return None
        if len(specs) > 1:
            raise OpenAIError(f"at most one way to constrain the output per request; got {', '.join(specs)}")
        ((param, spec),) = specs.items()
        try:
            return StructuredOutputsParams(**spec)
        except (ValueError, TypeError) as exc:
            raise OpenAIError(str(exc), param=param) from exc

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage in every chunk (vLLM's stream_options.continuous_usage_stats)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


def bad_value(exc: Exception, fields: Any = ()) -> OpenAIError:
    """A 400 for a ValueError whose message starts with the field's name (as SamplingParams' do)."""
    message = str(exc)
    first_word = message.split(" ", 1)[0].rstrip(":")
    return OpenAIError(message, param=first_word if first_word in fields else None)


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise OpenAIError("suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise OpenAIError("best_of other than n is not supported", param="best_of")
        params = self._sampling_params(self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:  # the echoed prompt carries its tokens' logprobs too
            params.prompt_logprobs = max(params.prompt_logprobs or 0, self.logprobs)
        return params


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    modalities: list[str] | None = None

    def to_sampling_params(self) -> SamplingParams:
        if self.tools:
            raise OpenAIError("tools are not supported", param="tools")
        if self.tool_choice not in (None, "none", "auto"):
            raise OpenAIError("tool_choice is not supported (there are no tools)", param="tool_choice")
        if self.modalities not in (None, ["text"]):
            raise OpenAIError("only the text modality is supported", param="modalities")
        if self.top_logprobs is not None and not self.logprobs:
            raise OpenAIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling_params(max_tokens, logprobs)

    def conversation(self) -> list[dict[str, Any]]:
        """Messages as plain dicts for the chat template; text parts are joined, others refused."""
        out = []
        for message in self.messages:
            content = message.content
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text" or not isinstance(part.get("text", ""), str):
                        raise OpenAIError(f"content part type {part.get('type')!r} is not supported", param="messages")
                    texts.append(part.get("text", ""))
                content = "\n".join(texts)
            entry = {k: v for k, v in message.model_dump().items() if v is not None}
            entry["content"] = content or ""
            out.append(entry)
        return out
