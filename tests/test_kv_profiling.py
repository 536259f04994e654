"""The KV pool's sizing arithmetic on CPU: what profile_free_gpu_memory leaves for the pool (over a fake CUDA
allocator) and what it reserves for the CUDA graphs' outputs, from the sizes the graphs are captured at."""

from __future__ import annotations

import types

import torch

from mini_infer.config import EngineConfig
from mini_infer.worker.cuda_graphs import decode_graph_sizes, graph_output_bytes, prefill_graph_sizes
from mini_infer.worker.kv_cache import profile_free_gpu_memory

GIB = 2**30


def test_graph_outputs_of_an_8b_eagle3_target():
    """Llama-3-8B (hidden 4096, bf16) under EAGLE-3, 512 decode rows, 8192-token steps: every decode size
    (1, 2, 4, 8, 16, ..., 504, 512) and prefill size (16..256, 512, 1024, ..., 8192) keeps its hidden states
    and 3 aux ones per token, 2.8 GB, 2.1 GB of it the aux states."""
    config = EngineConfig(model="m", max_num_seqs=512, max_num_batched_tokens=8192)
    decode, prefill = decode_graph_sizes(config.max_decode_rows), prefill_graph_sizes(config)
    assert decode[:5] == [1, 2, 4, 8, 16] and decode[-2:] == [504, 512] and len(decode) == 3 + 64
    assert prefill[:6] == [16, 32, 64, 128, 256, 512] and prefill[-2:] == [7680, 8192] and len(prefill) == 5 + 16
    tokens = (1 + 2 + 4) + 8 * sum(range(1, 65)) + (16 + 32 + 64 + 128 + 256) + 512 * sum(range(1, 17))
    assert tokens == 86775
    assert graph_output_bytes(config, 4 * 4096 * 2) == tokens * 4 * 4096 * 2 == 2_843_443_200
    assert graph_output_bytes(config, 3 * 4096 * 2) == 2_132_582_400
    assert graph_output_bytes(config, 2 * 4096 * 2, prefill=False) == (7 + 8 * sum(range(1, 64)) + 512) * 16384
    no_prefill = EngineConfig(model="m", max_num_seqs=512, cuda_graph_prefill=False)
    assert prefill_graph_sizes(no_prefill) == [] and graph_output_bytes(no_prefill, 10) == 16647 * 10


class FakeAllocator:
    """torch.cuda's memory counters for profile_free_gpu_memory: 80 GiB, 10 GiB of weights, 1 GiB the context's."""

    def __init__(self) -> None:
        self.allocated = self.peak = 10 * GIB

    def run_batch(self, lens: list[int]) -> int:
        """A pass peaking 3 GiB over what it leaves (a prefill) or 1 GiB (a decode batch): bytes per token out."""
        self.peak = max(self.peak, self.allocated + (3 if sum(lens) > len(lens) else 1) * GIB)
        return 4 * 4096 * 2

    def install(self, monkeypatch) -> None:
        for name in ("synchronize", "empty_cache"):
            monkeypatch.setattr(torch.cuda, name, lambda: None)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: setattr(self, "peak", self.allocated))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: self.peak)
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: self.allocated)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (80 * GIB - self.allocated - GIB, 80 * GIB))


def test_profiling_reserves_the_graph_outputs(monkeypatch):
    """The budget: gpu_memory_utilization of the GPU less what is in use, the profile pass's activation peak,
    and the graph pool's reserve: 1.5x its largest pass (with prefill graphs, the prefill pass) + 64 MiB +
    the outputs every graph keeps, as graph_outputs reckons them from the bytes per token the pass gave."""
    config = EngineConfig(model="m", max_num_seqs=8, max_num_batched_tokens=64)
    fake = FakeAllocator()
    fake.install(monkeypatch)
    kv_cache = types.SimpleNamespace(allocate=lambda num_blocks: None)
    asked = []

    def graph_outputs(bytes_per_token: int) -> int:
        asked.append(bytes_per_token)
        return graph_output_bytes(config, bytes_per_token)

    budget = profile_free_gpu_memory(config, kv_cache, 256, fake.run_batch, 8, graph_outputs)
    assert asked == [4 * 4096 * 2]
    outputs = ((1 + 2 + 4 + 8) + (16 + 32 + 64)) * 4 * 4096 * 2
    assert budget == int(80 * GIB * 0.9) - 11 * GIB - 3 * GIB - (int(1.5 * 3 * GIB) + 2**26 + outputs)
    eager = profile_free_gpu_memory(config, kv_cache, 256, fake.run_batch, None, graph_outputs)
    assert eager == int(80 * GIB * 0.9) - 11 * GIB - 3 * GIB and asked == [4 * 4096 * 2]
