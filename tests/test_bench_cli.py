"""The benchmark commands end to end on a tiny CPU model, the workload protocol, and static batching."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import pytest

from mini_infer import LLMEngine, SamplingParams
from mini_infer.bench.throughput import make_plan, make_workload, static_step_bound
from mini_infer.cli import main as cli_main
from mini_infer.config import EngineConfig


def test_workload_follows_nano_vllm_draw_order():
    # nano-vllm bench.py: seed(0); per prompt randint(100, 1024) ids of randint(0, 10000); then outputs.
    random.seed(0)
    prompts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(256)]
    outputs = [random.randint(100, 1024) for _ in range(256)]
    workload = make_workload(256, vocab_size=151936, seed=0)
    assert workload.prompts == prompts
    assert workload.output_lens == outputs
    small_vocab = make_workload(256, vocab_size=512, seed=0)
    assert small_vocab.output_lens == outputs
    assert [len(p) for p in small_vocab.prompts] == [len(p) for p in prompts]
    assert max(max(p) for p in small_vocab.prompts) < 512


def test_fixed_lengths():
    workload = make_workload(3, vocab_size=512, input_len=7, output_len=5)
    assert [len(p) for p in workload.prompts] == [7, 7, 7]
    assert workload.output_lens == [5, 5, 5]
    assert workload.prompt_tokens == 21 and workload.output_tokens == 15


def _plan_args(**kw) -> argparse.Namespace:
    base = dict(backend="mini-infer", static_batching=None, compare=[], hf_num_prompts=None)
    return argparse.Namespace(**{**base, **kw})


def test_plan_runs_mini_infer_again_on_the_hf_subset():
    main, plans = make_plan(_plan_args(compare=["static", "hf"], hf_num_prompts=16), 256)
    assert main == "mini-infer"
    assert [(p.label, p.num_requests, p.static_batching) for p in plans] == [
        ("mini-infer", 256, False),
        ("mini-infer@16", 16, False),
        ("mini-infer-static", 256, True),
        ("hf@16", 16, False),
    ]


def test_plan_sync_and_eager_prefill_variants():
    _, plans = make_plan(_plan_args(compare=["sync", "eager-prefill"]), 64)
    assert [(p.label, p.sync, p.eager_prefill) for p in plans] == [
        ("mini-infer", False, False),
        ("mini-infer-eager-prefill", False, True),
        ("mini-infer-sync", True, False),
    ]


def _read(path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def throughput_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def throughput_record(throughput_dir, stories_path) -> dict:
    out = throughput_dir / "throughput.json"
    rc = cli_main(
        [
            "bench",
            "throughput",
            "--model",
            stories_path,
            "--num-prompts",
            "4",
            "--input-len",
            "20",
            "--output-len",
            "6",
            "--compare",
            "static",
            "--output-json",
            str(out),
            "--step-log",
            str(out.with_name("steps.json")),
        ]
    )
    assert rc == 0
    return _read(out)


@pytest.fixture(scope="module")
def latency_record(tmp_path_factory, stories_path) -> dict:
    out = tmp_path_factory.mktemp("bench") / "latency.json"
    rc = cli_main(
        [
            "bench",
            "latency",
            "--model",
            stories_path,
            "--batch-sizes",
            "1,3",
            "--input-len",
            "10",
            "--output-len",
            "5",
            "--output-json",
            str(out),
        ]
    )
    assert rc == 0
    return _read(out)


def test_throughput_cli_end_to_end(throughput_record):
    record = throughput_record
    assert record["errors"] == {}
    runs = {r["backend"]: r for r in record["runs"]}
    assert set(runs) == {"mini-infer", "mini-infer-static"}
    for run in runs.values():
        assert run["num_requests"] == 4 and run["output_tokens"] == 24 and run["prompt_tokens"] == 80
        assert run["output_tok_per_s"] > 0 and run["total_tok_per_s"] > run["output_tok_per_s"]
        assert 0 < run["kv_slot_utilisation"] <= 1
        assert run["roofline_fraction"] is None  # no roofline without a GPU
    assert runs["mini-infer-static"]["extra"]["static_batching"] is True
    assert "mini-infer / mini-infer-static" in record["ratios"]
    assert record["environment"]["command"]


def test_static_step_bound():
    """Waves [4, 10], [2, 8], [6] take 10 + 8 + 6 steps; continuous needs max(ceil(30 / 2), 10)."""
    assert static_step_bound([4, 10, 2, 8, 6], 2) == {"static_steps": 24, "continuous_steps": 15, "max_speedup": 1.6}
    assert static_step_bound([5, 5], 4)["max_speedup"] == 1.0  # one wave, as long as its longest


def test_throughput_record_has_the_static_bound(throughput_record):
    assert throughput_record["static_step_bound"] == {"static_steps": 6, "continuous_steps": 6, "max_speedup": 1.0}


def test_step_log_lists_what_each_step_ran(throughput_record, throughput_dir):
    """The main run's steps: 4 prompts of 20 tokens prefilled, then 6 tokens each (the first sampled
    by the prefill step); no GPU timing on CPU."""
    log = _read(throughput_dir / "steps.json")
    assert log["backend"] == "mini-infer"
    steps = log["steps"]
    assert [s[2:] for s in steps] == [[0, 80]] + [[4, 0]] * 5  # step() calls that only read back log nothing
    assert all(s[0] > 0 and s[1] is None for s in steps)


def test_throughput_against_transformers_on_a_preset(tmp_path, stories_path):
    # the tiny-llama preset with random weights; the tokenizer is given so nothing is looked up online
    out = tmp_path / "hf.json"
    rc = cli_main(
        [
            "bench",
            "throughput",
            "--model",
            "tiny-llama",
            "--load-format",
            "dummy",
            "--tokenizer",
            stories_path,
            "--num-prompts",
            "3",
            "--input-len",
            "12",
            "--output-len",
            "4",
            "--compare",
            "hf,hf-static",
            "--hf-num-prompts",
            "2",
            "--output-json",
            str(out),
        ]
    )
    record = _read(out)
    assert rc == 0, record["errors"]
    runs = {r["backend"]: r for r in record["runs"]}
    assert set(runs) == {"mini-infer", "mini-infer@2", "hf@2", "hf-static@2"}
    assert runs["hf@2"]["output_tokens"] == runs["hf-static@2"]["output_tokens"] == 8
    assert set(record["ratios"]) == {"mini-infer@2 / hf@2", "mini-infer@2 / hf-static@2"}


def test_latency_cli_end_to_end(latency_record):
    rows = {r["batch_size"]: r for r in latency_record["results"]}
    assert set(rows) == {1, 3}
    for batch, row in rows.items():
        assert row["num_decode_steps"] == 4  # token 1 comes from the prefill step
        assert row["decode_tok_per_s"] == pytest.approx(batch / (row["mean_step_ms"] / 1e3))
        assert row["achieved_gb_per_s"] > 0 and row["hbm_fraction"] is None


def test_plots_from_results(tmp_path, latency_record, throughput_record):
    pytest.importorskip("matplotlib")
    from mini_infer.bench.plots import plot_latency, plot_throughput

    pngs = (plot_latency(latency_record, tmp_path / "l.png"), plot_throughput([throughput_record], tmp_path / "t.png"))
    for png in pngs:
        assert png.read_bytes()[:4] == b"\x89PNG"


def _run_steps(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> tuple[dict, list[int]]:
    """Greedy run of all prompts; returns tokens per request and the number running after each step."""
    for i, (p, n) in enumerate(zip(prompts, max_tokens)):
        engine.add_request(
            str(i), {"prompt_token_ids": p}, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        )
    tokens, running = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens[out.request_id] = out.outputs[0].token_ids
        running.append(engine.stats.num_running)
    return tokens, running


def test_static_batching_gives_identical_tokens(stories_path):
    workload = make_workload(
        6, vocab_size=512, seed=3, min_input_len=5, max_input_len=30, min_output_len=2, max_output_len=12
    )
    prompts, lens = workload.prompts, workload.output_lens
    runs = {}
    for static in (False, True):
        engine = LLMEngine(
            EngineConfig(model=stories_path, max_num_seqs=2, static_batching=static, enable_prefix_caching=False)
        )
        runs[static] = _run_steps(engine, prompts, lens)
    (cont_tokens, cont_running), (static_tokens, static_running) = runs[False], runs[True]
    assert static_tokens == cont_tokens
    assert all(len(cont_tokens[str(i)]) == n for i, n in enumerate(lens))
    # static: the batch only refills once it has emptied; continuous refills as soon as a slot frees.
    for before, after in zip(static_running, static_running[1:]):
        assert after <= before or before == 0
    assert len(static_running) > len(cont_running)


def test_report_tables(tmp_path, latency_record, throughput_record):
    from mini_infer.bench.report import report

    (tmp_path / "latency.json").write_text(json.dumps(latency_record))
    (tmp_path / "throughput.json").write_text(json.dumps(throughput_record))
    text = report(tmp_path)
    assert "| 3 |" in text and "| mini-infer-static | 4 |" in text
    assert "ratio mini-infer / mini-infer-static" in text
    assert "Targets" not in text and "targets" not in text  # CPU runs: the H100 targets do not apply


def test_transformers_stopped_at_its_time_limit_gives_a_lower_bound(tmp_path, stories_path):
    """A zero time limit stops transformers before any request finishes: its row counts every requested
    token over the elapsed time (an upper bound on its tok/s), and the ratio's key says lower bound."""
    out = tmp_path / "hf_limit.json"
    rc = cli_main(
        [
            "bench",
            "throughput",
            "--model",
            "tiny-llama",
            "--load-format",
            "dummy",
            "--tokenizer",
            stories_path,
            "--num-prompts",
            "2",
            "--input-len",
            "12",
            "--output-len",
            "4",
            "--compare",
            "hf",
            "--hf-time-limit",
            "0",
            "--output-json",
            str(out),
        ]
    )
    record = _read(out)
    assert rc == 0, record["errors"]
    hf = {r["backend"]: r for r in record["runs"]}["hf"]
    assert hf["extra"]["stopped_at_time_limit"] == 0
    assert hf["extra"]["finished_requests"] == 0 and hf["output_tokens"] == 8
    [(name, value)] = record["ratios"].items()
    assert name == "mini-infer / hf (lower bound: transformers stopped at its time limit)" and value > 0


def test_negative_time_limit_is_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["bench", "throughput", "--model", "tiny-llama", "--hf-time-limit", "-1"])
    assert exit_info.value.code == 2
    assert "cannot be negative" in capsys.readouterr().err


def test_latency_counts_an_fp8_pools_kv_bytes(tmp_path, stories_path, latency_record):
    """--kv-cache-dtype fp8: the roofline's KV term is the pool's one byte per element, not the model dtype's."""
    out = tmp_path / "latency_fp8.json"
    args = ["bench", "latency", "--model", stories_path, "--batch-sizes", "1", "--input-len", "10"]
    assert cli_main([*args, "--output-len", "5", "--kv-cache-dtype", "fp8", "--output-json", str(out)]) == 0
    fp8 = _read(out)
    assert fp8["kv_bytes_per_token"] * latency_record["dtype_bytes"] == latency_record["kv_bytes_per_token"]
    step = {r["batch_size"]: r for r in latency_record["results"]}[1]
    assert fp8["results"][0]["mean_bytes_per_step"] < step["mean_bytes_per_step"]
