"""Prometheus metrics under vLLM's names, with the prefix `mini_infer:` instead of `vllm:`.

Engine-wide numbers (running, waiting, KV usage, token and cache counters) are read from the
engine's latest `EngineStats` when /metrics is scraped; per-request latencies go into histograms
as the async engine reports them. Each server owns its registry, so several can live in one process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "mini_infer:"

# vLLM's buckets: TTFT and ITL are short, end-to-end latency spans minutes.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)
_ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def buckets_1_2_5(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's token-count buckets)."""
    buckets, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return buckets
            buckets.append(m * scale)
        scale *= 10


class _EngineStatsCollector(Collector):
    """Turns the latest EngineStats into gauges and counters at scrape time."""

    def __init__(self, read_stats: Callable[[], Any], model_name: str) -> None:
        self._read_stats = read_stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._read_stats()
        if stats is None:
            return
        total_blocks = getattr(stats, "num_kv_blocks_total", 0) or 0
        used_blocks = getattr(stats, "num_kv_blocks_used", 0) or 0
        gauges = {
            "num_requests_running": ("Number of requests in model execution batches.", stats.num_running),
            "num_requests_waiting": ("Number of requests waiting to be processed.", stats.num_waiting),
            "kv_cache_usage_perc": (
                "KV-cache usage. 1 means 100 percent usage.",
                used_blocks / total_blocks if total_blocks else 0.0,
            ),
        }
        host_total = getattr(stats, "num_host_blocks_total", 0) or 0
        if host_total:  # swap preemption: vLLM v0's names for the swapped queue and the CPU block pool
            gauges["num_requests_swapped"] = ("Number of requests swapped to CPU.", stats.num_swapped)
            gauges["cpu_cache_usage_perc"] = (
                "CPU KV-cache (swap space) usage. 1 means 100 percent usage.",
                stats.num_host_blocks_used / host_total,
            )
        for name, (doc, value) in gauges.items():
            family = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], float(value))
            yield family
        counters = {
            "prompt_tokens": ("Number of prefill tokens processed.", "prompt_tokens"),
            "generation_tokens": ("Number of generation tokens processed.", "generation_tokens"),
            "num_preemptions": ("Cumulative number of preemptions from the engine.", "num_preemptions"),
            "num_swap_outs": ("Cumulative number of preemptions that swapped KV to CPU.", "num_swap_outs"),
            "num_swap_ins": ("Cumulative number of swapped requests brought back.", "num_swap_ins"),
            "kv_transfer_loaded_tokens": (
                "Prompt tokens whose KV a KV connector loaded instead of computing.",
                "kv_transfer_loaded_tokens",
            ),
            "kv_transfer_saved_tokens": (
                "Prompt tokens whose KV a KV connector saved for other engines.",
                "kv_transfer_saved_tokens",
            ),
            "prefix_cache_queries": ("Prefix cache queries, in tokens.", "prefix_cache_queries"),
            "prefix_cache_hits": ("Prefix cache hits, in tokens.", "prefix_cache_hits"),
        }
        if getattr(stats, "spec_num_accepted_per_pos", None):  # only while speculating, as in vLLM
            counters["spec_decode_num_draft_tokens"] = ("Number of draft tokens.", "spec_num_draft_tokens")
            counters["spec_decode_num_accepted_tokens"] = ("Number of accepted tokens.", "spec_num_accepted_tokens")
        for name, (doc, attr) in counters.items():
            family = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            family.add_metric([self._model_name], float(getattr(stats, attr, 0) or 0))
            yield family
        per_pos = getattr(stats, "spec_num_accepted_per_pos", None)
        if per_pos:
            family = CounterMetricFamily(
                PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                "Accepted tokens per draft position.",
                labels=["model_name", "position"],
            )
            for position, count in enumerate(per_pos):
                family.add_metric([self._model_name, str(position)], float(count))
            yield family


class ServerMetrics:
    """The server's registry; also the async engine's RequestMetricsObserver."""

    def __init__(self, model_name: str, read_stats: Callable[[], Any], max_model_len: int = 2**16) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_name = model_name
        self.registry.register(_EngineStatsCollector(read_stats, model_name))
        self.request_success = Counter(
            PREFIX + "request_success",
            "Count of finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            ["model_name"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ["model_name"],
            buckets=_ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e_request_latency = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Histogram of end-to-end request latency in seconds.",
            ["model_name"],
            buckets=_E2E_BUCKETS,
            registry=self.registry,
        )
        self.iteration_tokens = Histogram(
            PREFIX + "iteration_tokens_total",
            "Histogram of number of tokens per engine_step.",
            ["model_name"],
            buckets=_ITERATION_TOKEN_BUCKETS,
            registry=self.registry,
        )
        token_buckets = buckets_1_2_5(max_model_len)
        self.request_prompt_tokens = Histogram(
            PREFIX + "request_prompt_tokens",
            "Number of prefill tokens processed.",
            ["model_name"],
            buckets=token_buckets,
            registry=self.registry,
        )
        self.request_generation_tokens = Histogram(
            PREFIX + "request_generation_tokens",
            "Number of generation tokens processed.",
            ["model_name"],
            buckets=token_buckets,
            registry=self.registry,
        )
        phases = {
            "queue": "Histogram of time spent in WAITING phase for request.",
            "prefill": "Histogram of time spent in PREFILL phase for request.",
            "decode": "Histogram of time spent in DECODE phase for request.",
            "inference": "Histogram of time spent in RUNNING phase for request.",
        }
        self.phase_time = {
            phase: Histogram(
                PREFIX + f"request_{phase}_time_seconds",
                doc,
                ["model_name"],
                buckets=_E2E_BUCKETS,
                registry=self.registry,
            )
            for phase, doc in phases.items()
        }

    def observe_first_token(self, seconds: float) -> None:
        self.time_to_first_token.labels(self.model_name).observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        self.inter_token_latency.labels(self.model_name).observe(seconds)

    def observe_finished(self, finished_reason: str, e2e_seconds: float, output: Any = None) -> None:
        self.request_success.labels(self.model_name, finished_reason).inc()
        self.e2e_request_latency.labels(self.model_name).observe(e2e_seconds)
        if output is None:
            return
        self.request_prompt_tokens.labels(self.model_name).observe(len(output.prompt_token_ids))
        self.request_generation_tokens.labels(self.model_name).observe(sum(len(c.token_ids) for c in output.outputs))
        m = output.metrics
        if m is None or m.first_scheduled_time is None or m.finished_time is None:
            return
        first_token = m.first_token_time if m.first_token_time is not None else m.finished_time
        phases = {
            "queue": m.first_scheduled_time - m.arrival_time,
            "prefill": first_token - m.first_scheduled_time,
            "decode": m.finished_time - first_token,
            "inference": m.finished_time - m.first_scheduled_time,
        }
        for phase, seconds in phases.items():
            self.phase_time[phase].labels(self.model_name).observe(max(seconds, 0.0))

    def observe_iteration(self, num_tokens: int) -> None:
        self.iteration_tokens.labels(self.model_name).observe(num_tokens)
