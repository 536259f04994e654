"""LoRARequest: which adapter a request runs with (vLLM's name and fields)."""

from __future__ import annotations

from dataclasses import dataclass

import xxhash


@dataclass(frozen=True)
class LoRARequest:
    """An adapter: a name (the server's `model` field), a positive integer id that identifies it in the
    engine, and the PEFT folder it loads from (`adapter_config.json` + `adapter_model.safetensors`)."""

    lora_name: str
    lora_int_id: int
    lora_path: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise ValueError(f"lora_path must be the adapter's folder, got {self.lora_path!r}")

    @property
    def cache_root(self) -> int:
        """The prefix cache's chain starts here for this adapter's sequences: its KV differs from the base
        model's and every other adapter's for the same tokens, so no block is shared across them."""
        return xxhash.xxh3_64_intdigest(f"lora\0{self.lora_int_id}\0{self.lora_name}\0{self.lora_path}".encode())
