"""mini-infer: a compact, fast LLM inference and serving engine.

The public names load on first use (PEP 562), so `mini-infer --help` and other light imports of the
package do not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "LLM": "mini_infer.llm",
    "LLMEngine": "mini_infer.engine",
    "EngineConfig": "mini_infer.config",
    "EngineStats": "mini_infer.engine",
    "SamplingParams": "mini_infer.sampling_params",
    "StructuredOutputsParams": "mini_infer.sampling_params",
    "LoRARequest": "mini_infer.lora.request",
    "RequestOutput": "mini_infer.outputs",
    "CompletionOutput": "mini_infer.outputs",
    "Logprob": "mini_infer.outputs",
}
__all__ = [
    "LLM",
    "LLMEngine",
    "EngineConfig",
    "EngineStats",
    "SamplingParams",
    "StructuredOutputsParams",
    "LoRARequest",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from mini_infer.config import EngineConfig
    from mini_infer.engine import EngineStats, LLMEngine
    from mini_infer.llm import LLM
    from mini_infer.lora.request import LoRARequest
    from mini_infer.outputs import CompletionOutput, Logprob, RequestOutput
    from mini_infer.sampling_params import SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mini_infer' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
