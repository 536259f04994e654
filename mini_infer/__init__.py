"""mini-infer: a compact, fast LLM inference and serving engine."""

from mini_infer.config import EngineConfig
from mini_infer.engine import EngineStats, LLMEngine
from mini_infer.llm import LLM
from mini_infer.outputs import CompletionOutput, Logprob, RequestOutput
from mini_infer.sampling_params import SamplingParams

__all__ = [
    "LLM", "LLMEngine", "EngineConfig", "EngineStats", "SamplingParams", "RequestOutput",
    "CompletionOutput", "Logprob",
]
__version__ = "0.1.0"
