"""Programmatic dependent launch: off where it cannot run, and on a Hopper GPU the same bits as without it,
kernel by kernel inside a CUDA graph and through the engine."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from mini_infer.kernels import pdl  # noqa: E402
from mini_infer.kernels.activation import silu_and_mul_triton  # noqa: E402
from mini_infer.kernels.decode_attention import DecodeConfig, decode_attention_triton  # noqa: E402
from mini_infer.kernels.rmsnorm import fused_add_rms_norm_triton, rms_norm_triton  # noqa: E402
from mini_infer.kernels.skinny_mm import skinny_mm  # noqa: E402

HOPPER = torch.cuda.is_available() and pdl.pdl_supported(torch.cuda.current_device())
needs_pdl = pytest.mark.skipif(not HOPPER, reason="PDL needs a CUDA GPU of compute capability 9+")


@pytest.fixture
def pdl_setting(monkeypatch):
    """Sets MINI_INFER_PDL for what follows (on: every kernel that can take it); the decision is cached per
    device, so the cache is cleared around."""

    def set_pdl(on: bool) -> None:
        monkeypatch.setenv(pdl.PDL_ENV, ",".join(pdl.KERNELS) if on else "0")
        pdl._launch_options.cache_clear()

    yield set_pdl
    pdl._launch_options.cache_clear()


def test_pdl_is_off_on_a_cpu_and_when_switched_off(pdl_setting):
    assert pdl.pdl_launch(torch.zeros(1), "norm") == {"USE_PDL": False}
    pdl_setting(False)
    if torch.cuda.is_available():
        assert pdl.pdl_launch(torch.zeros(1, device="cuda"), "norm") == {"USE_PDL": False}


def test_an_unknown_kernel_name_in_the_setting_is_an_error(monkeypatch):
    monkeypatch.setenv(pdl.PDL_ENV, "norm,gemm")
    with pytest.raises(ValueError, match="unknown kernels"):
        pdl._kernels_from_env()
    monkeypatch.setenv(pdl.PDL_ENV, "norm, skinny")
    assert pdl._kernels_from_env() == {"norm", "skinny"}


def _chain(x, residual, norm_w, w_gate_up, w_down, q, k_cache, v_cache, seq_lens, tables):
    """A decode layer's kernels back to back, as a graph replays them: norms, products, SiLU, attention."""
    h = rms_norm_triton(x, norm_w, 1e-6)
    gate_up = skinny_mm(h, w_gate_up)
    down = skinny_mm(silu_and_mul_triton(gate_up), w_down)
    h2 = fused_add_rms_norm_triton(down, residual, norm_w, 1e-6)
    attn = decode_attention_triton(q, k_cache, v_cache, seq_lens, tables, 0.125, DecodeConfig(num_splits=4))
    return h2, attn


@needs_pdl
def test_kernels_give_the_same_bits_with_pdl_inside_a_graph(pdl_setting):
    g = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g, dtype=torch.bfloat16)

    hidden, inter, heads, kv_heads, head_dim, page = 512, 1024, 8, 2, 64, 16
    args = (
        randn(2, hidden),
        randn(2, hidden),
        randn(hidden),
        randn(2 * inter, hidden) / hidden**0.5,
        randn(hidden, inter) / inter**0.5,
        randn(2, heads, head_dim),
        randn(16, page, kv_heads, head_dim),
        randn(16, page, kv_heads, head_dim),
        torch.tensor([37, 200], device="cuda", dtype=torch.int32),
        torch.arange(32, device="cuda", dtype=torch.int32).reshape(2, 16) % 16,
    )
    results = []
    for on in (False, True):
        pdl_setting(on)
        residual = args[1].clone()
        run_args = (args[0], residual, *args[2:])
        _chain(*run_args)  # compile outside the capture
        residual.copy_(args[1])
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _chain(*run_args)
        residual.copy_(args[1])
        graph.replay()
        torch.cuda.synchronize()
        results.append([t.clone() for t in (*out, residual)])
    for off, on in zip(*results, strict=True):
        assert torch.equal(off, on)


@needs_pdl
def test_engine_tokens_are_the_same_with_pdl(pdl_setting, qwen3_path):
    from mini_infer import LLM, SamplingParams

    prompts = [[1, 2, 3, 4, 5], [7, 8, 9]]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tokens = []
    for on in (False, True):
        pdl_setting(on)
        llm = LLM(qwen3_path, dtype="bfloat16", max_model_len=256, gpu_memory_utilization=0.3)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        tokens.append([o.outputs[0].token_ids for o in outs])
        del llm
        torch.cuda.empty_cache()
    assert tokens[0] == tokens[1]
