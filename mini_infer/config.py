"""EngineConfig: every engine setting in one validated dataclass, with vLLM's names."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: the CLI builds its parsers from this module without loading torch
    import torch

    from mini_infer.kv_transfer.config import KVTransferConfig
    from mini_infer.spec_decode.config import SpeculativeConfig

_DTYPES = ("float32", "float16", "bfloat16")
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")  # "fp8" is e4m3 (vLLM's names); docs/quantization.md, "FP8 KV cache"


def _check_choice(name: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_positive(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class EngineConfig:
    """Settings of one engine. `LLM(model, **kwargs)` forwards its kwargs here."""

    model: str
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    cpu_kv_cache_gib: float = 1.0
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    enforce_eager: bool = False
    cuda_graph_prefill: bool = True  # also capture prefill chunks (by token count), not only decode batches
    load_format: str = "auto"
    kernel_backend: str = "auto"
    static_batching: bool = False
    async_scheduling: bool = True  # queue step N+1 before reading step N's tokens (see engine.py)
    max_logprobs: int = 20  # the most logprobs / prompt_logprobs a request may ask for
    max_seqs_per_request: int = 128  # the largest n (a server also counts n x prompts of one call)
    # vLLM's: {"method": "ngram" | "draft_model", "num_speculative_tokens": k, ...} (or its JSON)
    speculative_config: SpeculativeConfig | dict | str | None = None
    tensor_parallel_size: int = 1  # ranks that split every layer (docs/distributed.md)
    enable_expert_parallel: bool = False  # MoE: split the experts over those ranks instead of each expert
    distributed_executor_backend: str | None = None  # "mp" (processes on this host; the default) or "ray"
    # vLLM's: None (a quantized checkpoint's own scheme), "fp8" / "int8" (W8A8 online), "compressed-tensors"
    quantization: str | None = None
    # what preemption does with a request's KV: drop it and recompute later, or copy it to a host pool
    # of swap_space GiB and back (docs/preemption.md says which to pick when)
    preemption_mode: str = "recompute"
    swap_space: float = 4.0  # GiB of host memory per rank for swapped-out KV blocks (preemption_mode="swap")
    # "auto": K/V in the model dtype; "fp8" / "fp8_e4m3": e4m3 with per-tensor scales, twice the tokens
    kv_cache_dtype: str = "auto"
    # vLLM's: {"kv_connector": NAME, "kv_role": "kv_producer" | "kv_consumer" | "kv_both",
    # "kv_connector_extra_config": {...}} (or its JSON): prefill/decode disaggregation (docs/disaggregation.md)
    kv_transfer_config: KVTransferConfig | dict | str | None = None
    # multi-LoRA (docs/lora.md): PEFT adapters in max_loras device slots, of rank up to max_lora_rank
    enable_lora: bool = False
    max_loras: int = 1  # adapters one step can mix (device slots); more registered ones take turns
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty path or hub id, got {self.model!r}")
        _check_choice("dtype", self.dtype, ("auto", *_DTYPES))
        _check_choice("device", self.device, ("auto", "cuda", "cpu"))
        _check_choice("load_format", self.load_format, ("auto", "dummy"))
        _check_choice("kernel_backend", self.kernel_backend, ("auto", "torch", "triton"))
        _check_choice("kv_cache_dtype", self.kv_cache_dtype, KV_CACHE_DTYPES)
        from mini_infer.quantization import QUANTIZATION_METHODS

        _check_choice("quantization", self.quantization, (None, *QUANTIZATION_METHODS))
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        _check_positive("max_model_len", self.max_model_len, allow_none=True)
        _check_positive("max_num_seqs", self.max_num_seqs)
        _check_positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _check_positive("num_gpu_blocks_override", self.num_gpu_blocks_override, allow_none=True)
        _check_positive("max_seqs_per_request", self.max_seqs_per_request)
        _check_positive("tensor_parallel_size", self.tensor_parallel_size)
        _check_choice("distributed_executor_backend", self.distributed_executor_backend, (None, "mp", "ray"))
        from mini_infer.spec_decode.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.tensor_parallel_size > 1 and self.speculative_config is not None:
            raise ValueError("speculative_config is not supported with tensor_parallel_size > 1 yet")
        from mini_infer.kv_transfer.config import KVTransferConfig

        self.kv_transfer_config = KVTransferConfig.parse(self.kv_transfer_config)
        if self.tensor_parallel_size > 1 and self.kv_transfer_config is not None:
            raise ValueError("kv_transfer_config is not supported with tensor_parallel_size > 1 yet")
        if self.enable_expert_parallel and self.tensor_parallel_size == 1:
            raise ValueError("enable_expert_parallel needs tensor_parallel_size > 1 (experts are split over its ranks)")
        if not isinstance(self.max_logprobs, int) or isinstance(self.max_logprobs, bool) or self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be a non-negative integer, got {self.max_logprobs!r}")
        if not isinstance(self.block_size, int) or self.block_size < 1 or self.block_size % 16:
            raise ValueError(f"block_size must be a positive multiple of 16, got {self.block_size!r}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization!r}")
        if not self.cpu_kv_cache_gib > 0:
            raise ValueError(f"cpu_kv_cache_gib must be positive, got {self.cpu_kv_cache_gib!r}")
        _check_choice("preemption_mode", self.preemption_mode, ("recompute", "swap"))
        swap = self.swap_space
        if isinstance(swap, bool) or not isinstance(swap, (int, float)) or not 0 <= swap < float("inf"):
            raise ValueError(f"swap_space must be a non-negative number of GiB, got {self.swap_space!r}")
        _check_positive("max_loras", self.max_loras)
        _check_positive("max_lora_rank", self.max_lora_rank)
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise ValueError("enable_lora is not supported with tensor_parallel_size > 1 yet (docs/lora.md)")
        if self.enable_lora and self.speculative_config is not None:
            raise ValueError("enable_lora is not supported with speculative_config yet (docs/lora.md)")
        if self.device == "cuda" and not _cuda_available():
            raise ValueError("device='cuda' was asked for but torch sees no CUDA GPU")

    @property
    def resolved_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def resolved_kernel_backend(self) -> str:
        if self.kernel_backend == "auto":
            return "triton" if self.resolved_device.type == "cuda" else "torch"
        return self.kernel_backend

    def resolve_dtype(self, model_dtype: torch.dtype | None) -> torch.dtype:
        """'auto' takes the checkpoint's dtype, except float32 on CPU is kept and bf16/fp16 run on GPU."""
        import torch

        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.resolved_device.type == "cpu":
            return torch.float32
        return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.bfloat16

    def resolve_kv_cache_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The KV pool's element type: the model dtype, or float8_e4m3fn for "fp8" / "fp8_e4m3"."""
        import torch

        return model_dtype if self.kv_cache_dtype == "auto" else torch.float8_e4m3fn

    @property
    def max_decode_rows(self) -> int:
        """Decode rows a step can hold: one per sequence, 1 + k per sequence when speculating (CUDA graphs
        are captured up to this, 512 at most)."""
        k = self.speculative_config.num_speculative_tokens if self.speculative_config else 0
        return min(self.max_num_seqs * (1 + k), 512)

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> EngineConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names and v is not None})


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds one flag per EngineConfig field (`--max-model-len` for max_model_len)."""
    group = parser.add_argument_group("engine")
    for f in fields(EngineConfig):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        if f.type in ("bool", bool):
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=f"(default: {default})")
        else:
            kind = {"int": int, "float": float}.get(str(f.type).replace(" | None", ""), str)
            group.add_argument(flag, type=kind, default=None, help=f"(default: {default})")
    return parser
