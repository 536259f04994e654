"""The server's LoRA adapters: names the `model` field may take beside the base model's, and vLLM's
run-time `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.

Each name gets its own engine id (1, 2, ...), never reused, so a reloaded adapter never meets the
prefix-cache blocks of the one it replaced (the cache key includes the id).
"""

from __future__ import annotations

import itertools

from pydantic import BaseModel, ConfigDict

from mini_infer.async_engine import AsyncLLMEngine, EngineDeadError
from mini_infer.entrypoints.openai.protocol import OpenAIError
from mini_infer.lora.request import LoRARequest


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_int_id: int | None = None


def parse_lora_modules(specs: list[str]) -> list[tuple[str, str]]:
    """`--lora-modules name=path ...` -> [(name, path)]; ValueError naming a malformed entry."""
    modules = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes name=path entries, got {spec!r}")
        modules.append((name, path))
    return modules


class ServingLoRAs:
    def __init__(self, engine: AsyncLLMEngine, served_model_names: list[str]) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.by_name: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)

    def get(self, name: str | None) -> LoRARequest | None:
        return self.by_name.get(name) if name is not None else None

    def _new_request(self, name: str, path: str) -> LoRARequest:
        if name in self.by_name or name in self.served_model_names:
            raise OpenAIError(f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        try:
            return LoRARequest(name, next(self._ids), path)
        except ValueError as exc:
            raise OpenAIError(str(exc), param="lora_name" if "name" in str(exc) else "lora_path") from exc

    def register_at_startup(self, name: str, path: str) -> None:
        """An adapter of --lora-modules, added before the engine loop starts (ValueError if it cannot load)."""
        request = self._new_request(name, path)
        self.engine.engine.add_lora(request)
        self.by_name[name] = request

    async def load(self, body: LoadLoRAAdapterRequest) -> str:
        request = self._new_request(body.lora_name, body.lora_path)
        try:
            await self.engine.add_lora(request)
        except EngineDeadError as exc:
            raise OpenAIError(str(exc), status=503, type="server_error") from exc
        except ValueError as exc:
            raise OpenAIError(str(exc), param="lora_path") from exc
        self.by_name[body.lora_name] = request
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    async def unload(self, body: UnloadLoRAAdapterRequest) -> str:
        request = self.by_name.get(body.lora_name)
        if request is None or body.lora_int_id not in (None, request.lora_int_id):
            raise OpenAIError(
                f"The lora adapter '{body.lora_name}' cannot be found.",
                status=404,
                type="not_found_error",
                param="lora_name",
            )
        try:
            await self.engine.remove_lora(request.lora_int_id)
        except EngineDeadError as exc:
            raise OpenAIError(str(exc), status=503, type="server_error") from exc
        except ValueError as exc:
            raise OpenAIError(str(exc), param="lora_name") from exc
        del self.by_name[body.lora_name]
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
