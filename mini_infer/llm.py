"""LLM: the offline API, shaped like vLLM's so that scripts can switch with an import."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as Seq

from tqdm.auto import tqdm

from mini_infer.config import EngineConfig
from mini_infer.engine import LLMEngine, PromptType
from mini_infer.lora.request import LoRARequest
from mini_infer.outputs import RequestOutput
from mini_infer.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **kwargs) -> None:
        self.llm_engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        priority: Seq[int] | None = None,
        lora_request: LoRARequest | Seq[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Runs all prompts to completion; outputs come back in the order of the prompts. lora_request: one
        adapter for every prompt, or a list with one per prompt (None: the base model)."""
        if isinstance(prompts, str | dict) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} lora requests for {len(prompts)} prompts")
        engine = self.llm_engine
        params = [dataclasses.replace(p, output_kind="final_only") for p in params]
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for rid, prompt, p, prio, lora in zip(ids, prompts, params, priorities, loras):
                engine.add_request(rid, prompt, p, prio, lora_request=lora)
        except ValueError:
            engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(prompts), desc="Generating", disable=not use_tqdm, unit="req") as bar:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[rid] for rid in ids]

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self.llm_engine.add_lora(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self.llm_engine.remove_lora(lora_id)

    def list_loras(self) -> set[int]:
        return self.llm_engine.list_loras()

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Formats each conversation with the tokenizer's chat template, then generates."""
        tokenizer = self.get_tokenizer()
        if tokenizer is None or not (chat_template or tokenizer.chat_template):
            raise ValueError(
                f"{self.llm_engine.config.model} has no chat template: use generate() with a plain "
                "prompt, pass chat_template=, or load a chat model"
            )
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {
                "prompt_token_ids": list(
                    tokenizer.apply_chat_template(
                        conv,
                        chat_template=chat_template,
                        add_generation_prompt=add_generation_prompt,
                        tokenize=True,
                        return_dict=False,
                    )
                )
            }
            for conv in conversations
        ]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
