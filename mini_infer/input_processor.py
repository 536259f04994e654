"""InputProcessor: a prompt and its SamplingParams in, a validated request out (or a ValueError).

Tokenizes (thread-safe, so a server runs it off the engine thread), checks everything that needs
the model (SamplingParams checks the rest), resolves max_tokens, and makes the request's n sequences.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from transformers import PretrainedConfig

from mini_infer.config import EngineConfig
from mini_infer.detokenizer import Detokenizer
from mini_infer.lora.request import LoRARequest
from mini_infer.output_processor import RequestState, SeqOutput
from mini_infer.sampling_params import SamplingParams
from mini_infer.sequence import Sequence

PromptType = str | list[int] | dict


class InputProcessor:
    def __init__(
        self,
        config: EngineConfig,
        model_config: PretrainedConfig,
        detokenizer: Detokenizer | None,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        fits: Callable[[int], bool],
    ) -> None:
        """fits(num_tokens): whether a sequence that long fits the KV pool at all."""
        self.config, self.vocab_size = config, model_config.vocab_size
        self.detokenizer, self.max_model_len, self.eos_token_ids, self.fits = (
            detokenizer,
            max_model_len,
            eos_token_ids,
            fits,
        )

    def tokenize(self, prompt: PromptType, add_special_tokens: bool = True) -> tuple[str | None, list[int]]:
        """(text, token ids) of a prompt. A text too long to fit max_model_len whatever its tokens is refused
        before it is tokenized."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list | tuple) or not all(type(t) is int for t in ids):
                    raise ValueError("prompt_token_ids must be a list of integers")
                return prompt.get("prompt"), list(ids)
            if "prompt" not in prompt:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if self.detokenizer is None:
                raise ValueError("this engine has no tokenizer: pass prompts as token ids")
            # Normalization may merge characters, hence the margin of 4.
            if len(prompt) > 4 * self.max_model_len * self.detokenizer.max_token_chars:
                raise ValueError(
                    f"the prompt has {len(prompt)} characters, more tokens than max_model_len "
                    f"({self.max_model_len}) holds"
                )
            tokenizer = self.detokenizer.tokenizer
            return prompt, tokenizer.encode(prompt, add_special_tokens=add_special_tokens) if prompt else []
        if isinstance(prompt, list | tuple) and all(type(t) is int for t in prompt):
            return None, list(prompt)
        raise ValueError(f"a prompt must be a string, a list of token ids or a dict, got {type(prompt).__name__}")

    def check_params(self, params: SamplingParams) -> None:
        """The checks of a request's parameters that need the model."""
        vocab, config = self.vocab_size, self.config
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

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        priority: int,
        lora_request: LoRARequest | None = None,
    ) -> RequestState:
        self.check_params(params)
        text, ids = self.tokenize(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        room = self.max_model_len - len(ids)
        if room < 1:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but max_model_len is {self.max_model_len}: "
                "it must be shorter to leave room for generated tokens"
            )
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab_size}), got one of {max(ids)}")
        max_tokens = params.max_tokens if params.max_tokens is not None else room
        if max_tokens > room:
            raise ValueError(
                f"max_tokens={max_tokens} cannot fit: the prompt has {len(ids)} tokens and "
                f"max_model_len is {self.max_model_len}, leaving room for {room}"
            )
        if not self.fits(len(ids) + max_tokens):
            raise ValueError(
                f"{len(ids)} prompt tokens + {max_tokens} max_tokens need more KV blocks than the "
                f"pool has (block size {self.config.block_size})"
            )
        params = dataclasses.replace(params, max_tokens=max_tokens, eos_token_ids=self.eos_token_ids)
        seqs = [Sequence(request_id, i, ids, params, priority, lora_request=lora_request) for i in range(params.n)]
        return RequestState(
            request_id,
            text,
            ids,
            [SeqOutput(s) for s in seqs],
            time.monotonic(),
            final_only=params.output_kind == "final_only",
        )
