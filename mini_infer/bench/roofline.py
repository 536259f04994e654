"""Roofline arithmetic: how fast a workload could run if only HBM bandwidth and tensor peak limited it.

A decode step reads every weight once plus the KV of every running request, and does 2 FLOPs per
matmul weight per token plus the attention dot products; its ideal time is
max(bytes / HBM bandwidth, FLOPs / tensor peak). Prefill is counted as compute: FLOPs / peak.
Bandwidth and peak are measured on the spot (`measure_hbm_bandwidth`, `measure_tensor_peak`), so a
percentage of this ideal compares the engine with what this very GPU does on a plain copy and matmul.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama/Qwen-style decoder that decide its bytes and FLOPs.

    Mixture-of-experts models (num_experts > 0) have `num_sparse_layers` layers whose MLP is a router,
    `num_experts` experts of `moe_intermediate_size` (each token takes `experts_per_token`) and maybe
    a shared expert; their other layers keep a dense MLP of `intermediate_size`. A step reads only the
    experts its tokens were routed to: `experts_touched` counts them, summed over the sparse layers.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    num_sparse_layers: int = 0
    shared_expert_intermediate_size: int = 0

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """Reads a transformers PretrainedConfig (or a config.json dict)."""
        if isinstance(config, dict):
            get = config.get
        else:
            get = lambda key, default=None: getattr(config, key, default)
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        model_type = get("model_type", "") or ""
        layers = get("num_hidden_layers")
        moe: dict[str, int] = {}
        if model_type == "mixtral":
            moe = dict(
                num_experts=get("num_local_experts"),
                moe_intermediate_size=get("intermediate_size"),
                num_sparse_layers=layers,
            )
        elif model_type in ("qwen2_moe", "qwen3_moe") and get("num_experts"):
            dense = set(get("mlp_only_layers") or [])
            step = get("decoder_sparse_step") or 1
            moe = dict(
                num_experts=get("num_experts"),
                moe_intermediate_size=get("moe_intermediate_size"),
                num_sparse_layers=sum(1 for i in range(layers) if i not in dense and (i + 1) % step == 0),
                shared_expert_intermediate_size=get("shared_expert_intermediate_size") or 0,
            )
        if moe:
            moe["experts_per_token"] = get("num_experts_per_tok")
        return cls(
            num_layers=layers,
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads") or heads,
            head_dim=get("head_dim") or hidden // heads,
            intermediate_size=get("intermediate_size"),
            vocab_size=get("vocab_size"),
            tie_word_embeddings=bool(get("tie_word_embeddings", False)),
            attention_bias=bool(get("attention_bias", False)) or model_type in ("qwen2", "qwen2_moe"),
            qk_norm=model_type.startswith("qwen3"),
            **moe,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_params(self) -> int:
        """q, k, v and o projections of one layer."""
        return self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size

    @property
    def layer_linear_params(self) -> int:
        """Weights of one dense layer's matmuls: q, k, v, o projections and the SwiGLU gate, up, down."""
        return self.attention_params + 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_params(self) -> int:
        """One expert's gate, up and down projections."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def sparse_layer_fixed_params(self) -> int:
        """What a sparse layer's MLP reads whatever the routing: the router, the shared expert and its gate."""
        shared = 3 * self.hidden_size * self.shared_expert_intermediate_size
        return self.num_experts * self.hidden_size + shared + (self.hidden_size if shared else 0)

    @property
    def _dense_linear_params(self) -> int:
        """Matmul weights outside the routed experts, all layers."""
        dense_layers = self.num_layers - self.num_sparse_layers
        return (
            self.num_layers * self.attention_params
            + dense_layers * 3 * self.hidden_size * self.intermediate_size
            + self.num_sparse_layers * self.sparse_layer_fixed_params
        )

    @property
    def active_linear_params(self) -> int:
        """Matmul weights of all layers that one token multiplies (its experts only)."""
        return self._dense_linear_params + self.num_sparse_layers * self.experts_per_token * self.expert_params

    @property
    def layer_other_params(self) -> int:
        """Norm weights and biases: read every step but too few to matter for FLOPs."""
        norms = 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0)
        bias = self.q_size + 2 * self.kv_size if self.attention_bias else 0
        return norms + bias

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def all_experts_touched(self) -> int:
        return self.num_sparse_layers * self.num_experts

    @property
    def total_params(self) -> int:
        """Parameter count as stored: a tied lm_head shares the embedding matrix."""
        layers = self._dense_linear_params + self.all_experts_touched * self.expert_params
        layers += self.num_layers * self.layer_other_params
        head = 0 if self.tie_word_embeddings else self.lm_head_params
        return self.embedding_params + layers + self.hidden_size + head

    @property
    def params_read_per_step(self) -> int:
        """params_read with every expert touched."""
        return int(self.params_read(None))

    def params_read(self, experts_touched: float | None = None) -> float:
        """Weights a forward pass must stream from HBM: all layers (of a MoE model, the experts touched:
        every expert when None), the final norm and the lm_head.

        The embedding lookup gathers only a few rows, so an untied embedding table is not counted; a tied
        one is read in full as the lm_head.
        """
        touched = self.all_experts_touched if experts_touched is None else experts_touched
        layers = self._dense_linear_params + touched * self.expert_params + self.num_layers * self.layer_other_params
        return layers + self.hidden_size + self.lm_head_params

    @property
    def matmul_params(self) -> int:
        """Weights taking part in a matmul for each token that reaches the logits."""
        return self.active_linear_params + self.lm_head_params

    def expected_experts_touched(self, num_tokens: int) -> float:
        """Distinct experts that num_tokens tokens touch, summed over the sparse layers, if each token's
        top-k were a uniform random choice: E * (1 - (1 - k/E)^n) per layer. An estimate, for workloads
        whose routing was not measured (a dense model: 0)."""
        if not self.num_experts:
            return 0.0
        untouched = (1 - self.experts_per_token / self.num_experts) ** num_tokens
        return self.num_sparse_layers * self.num_experts * (1 - untouched)

    def weight_bytes(self, dtype_bytes: int, experts_touched: float | None = None) -> float:
        return self.params_read(experts_touched) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.kv_size * dtype_bytes

    def attention_flops(self, context_len: int) -> int:
        """One query token attending to `context_len` tokens: QK^T and PV, 2 FLOPs per multiply-add each."""
        return 4 * self.num_layers * self.q_size * context_len

    def decode_token_flops(self, context_len: int) -> int:
        """FLOPs to produce one token whose query attends to `context_len` tokens (itself included)."""
        return 2 * self.matmul_params + self.attention_flops(context_len)

    def prefill_flops(self, prompt_len: int) -> int:
        """FLOPs of a causal prefill; the lm_head runs on the last position only, as engines do."""
        layers = 2 * self.active_linear_params * prompt_len
        causal_pairs = prompt_len * (prompt_len + 1) // 2
        return layers + 2 * self.lm_head_params + 4 * self.num_layers * self.q_size * causal_pairs


@dataclass(frozen=True)
class Hardware:
    """The two limits of the roofline, in bytes/s and FLOP/s."""

    hbm_bytes_per_s: float
    peak_flops: float


@dataclass(frozen=True)
class DecodeStepCost:
    bytes: int
    flops: int

    def ideal_seconds(self, hw: Hardware) -> float:
        return max(self.bytes / hw.hbm_bytes_per_s, self.flops / hw.peak_flops)


def decode_step_cost(
    shape: ModelShape,
    context_lens: Sequence[int],
    dtype_bytes: int,
    experts_touched: float | None = None,
    kv_dtype_bytes: int | None = None,
) -> DecodeStepCost:
    """One decode step of a batch: each request attends to its `context_len` tokens (its new one included).
    experts_touched: distinct experts the step's tokens were routed to, summed over the sparse layers, as
    measured; None takes the uniform-routing estimate for this batch size (ModelShape.expected_experts_touched).
    kv_dtype_bytes: bytes per element of the KV pool (1 for kv_cache_dtype="fp8"); None: dtype_bytes."""
    total_context = int(sum(context_lens))
    kv_bytes = total_context * shape.kv_bytes_per_token(kv_dtype_bytes or dtype_bytes)
    flops = 2 * shape.matmul_params * len(context_lens) + shape.attention_flops(total_context)
    if experts_touched is None:
        experts_touched = shape.expected_experts_touched(len(context_lens))
    return DecodeStepCost(bytes=shape.weight_bytes(dtype_bytes, experts_touched) + kv_bytes, flops=flops)


@dataclass
class IdealEstimate:
    """The roofline ideal of a workload, split into its parts."""

    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    prefill_flops: int
    decode_bytes: int
    decode_flops: int
    memory_bound_steps: int

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    def to_dict(self) -> dict[str, float | int]:
        return {**asdict(self), "seconds": self.seconds}


def ideal_workload_time(
    shape: ModelShape,
    hw: Hardware,
    requests: Sequence[tuple[int, int]],
    max_num_seqs: int,
    dtype_bytes: int,
) -> IdealEstimate:
    """Ideal time of (prompt_len, output_len) requests run the way continuous batching runs them.

    Approximation: requests are admitted in order whenever fewer than `max_num_seqs` are running;
    admission prefills the prompt (FLOPs / peak, never overlapped) and yields the first output token;
    then all running requests decode together, one token each per step, and a request leaves the batch
    after its last token. KV capacity is assumed sufficient. A decode step for a request that has
    generated g tokens attends to prompt_len + g tokens.
    """
    if max_num_seqs < 1:
        raise ValueError("max_num_seqs must be >= 1")
    waiting = deque(requests)
    prompt_lens: list[int] = []
    generated: list[int] = []
    targets: list[int] = []
    prefill_flops = 0
    decode_seconds = 0.0
    decode_bytes = decode_flops = steps = memory_bound = 0
    kv_per_token = shape.kv_bytes_per_token(dtype_bytes)
    attention_per_token = shape.attention_flops(1)
    matmul_flops = 2 * shape.matmul_params
    while waiting or prompt_lens:
        while waiting and len(prompt_lens) < max_num_seqs:
            prompt_len, output_len = waiting.popleft()
            prefill_flops += shape.prefill_flops(prompt_len)
            if output_len > 1:
                prompt_lens.append(prompt_len)
                generated.append(1)
                targets.append(output_len)
        if not prompt_lens:
            continue
        total_context = sum(prompt_lens) + sum(generated)
        # a MoE model's experts as uniform routing would touch them at this batch size
        weight_bytes = shape.weight_bytes(dtype_bytes, shape.expected_experts_touched(len(prompt_lens)))
        step_bytes = weight_bytes + total_context * kv_per_token
        step_flops = matmul_flops * len(prompt_lens) + attention_per_token * total_context
        memory_seconds = step_bytes / hw.hbm_bytes_per_s
        compute_seconds = step_flops / hw.peak_flops
        decode_seconds += max(memory_seconds, compute_seconds)
        memory_bound += memory_seconds >= compute_seconds
        decode_bytes += step_bytes
        decode_flops += step_flops
        steps += 1
        keep = [i for i in range(len(prompt_lens)) if generated[i] + 1 < targets[i]]
        prompt_lens = [prompt_lens[i] for i in keep]
        generated = [generated[i] + 1 for i in keep]
        targets = [targets[i] for i in keep]
    return IdealEstimate(
        prefill_seconds=prefill_flops / hw.peak_flops,
        decode_seconds=decode_seconds,
        decode_steps=steps,
        prefill_flops=prefill_flops,
        decode_bytes=decode_bytes,
        decode_flops=decode_flops,
        memory_bound_steps=memory_bound,
    )


def _cuda_seconds(fn, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000.0


def _copy_seconds(numel: int, iters: int, device: str) -> float:
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    return _cuda_seconds(lambda: dst.copy_(src), iters)


def measure_hbm_bandwidth(size_bytes: int = 1 << 30, iters: int = 20, device: str = "cuda") -> float:
    """Bytes/s of a large device-to-device copy, counting the read and the write."""
    numel = size_bytes // 4
    seconds = _copy_seconds(numel, iters, device)
    torch.cuda.empty_cache()
    return 2 * numel * 4 * iters / seconds


def _matmul_seconds(n: int, iters: int, device: str) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    out = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    return _cuda_seconds(lambda: torch.matmul(a, b, out=out), iters)


def measure_tensor_peak(n: int = 8192, iters: int = 20, device: str = "cuda") -> float:
    """FLOP/s of an n x n x n bf16 matmul on random data (dense tensor-core peak as this GPU reaches it)."""
    seconds = _matmul_seconds(n, iters, device)
    torch.cuda.empty_cache()
    return 2 * n**3 * iters / seconds


def measure_hardware() -> Hardware | None:
    """Both roofline limits of the current CUDA device, or None where there is no GPU."""
    if not torch.cuda.is_available():
        return None
    t0 = time.perf_counter()
    hw = Hardware(hbm_bytes_per_s=measure_hbm_bandwidth(), peak_flops=measure_tensor_peak())
    print(
        f"[roofline] measured HBM {hw.hbm_bytes_per_s / 1e9:.0f} GB/s, bf16 peak {hw.peak_flops / 1e12:.0f} "
        f"TFLOP/s on {torch.cuda.get_device_name()} ({time.perf_counter() - t0:.1f}s)",
        flush=True,
    )
    return hw


def dtype_nbytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
