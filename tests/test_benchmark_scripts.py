"""The GPU scripts in benchmarks/ still import and parse their arguments (they only run on a GPU).

One subprocess runs every script's `--help` in turn: torch is imported once, and this session's
Triton, set up for its interpreter by test_kernels.py, is left alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
HELPERS = {"graph_timer.py"}  # imported by the scripts, not run

DRIVER = """
import contextlib, io, runpy, sys
failures = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        failures.append(f"{path}: --help did not exit")
    except SystemExit as exit:
        if exit.code not in (0, None) or "usage:" not in out.getvalue():
            failures.append(f"{path}: exit {exit.code!r}, printed {out.getvalue()[:200]!r}")
    except Exception as error:
        failures.append(f"{path}: {type(error).__name__}: {error}")
print("\\n".join(failures))
sys.exit(1 if failures else 0)
"""


def test_every_benchmark_script_parses_help():
    scripts = sorted(str(p) for p in BENCHMARKS.glob("*.py") if p.name not in HELPERS)
    assert len(scripts) >= 5
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, *scripts], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]


def test_kv_cache_dtype_smoke(tmp_path):
    """benchmarks/kv_cache_dtype.py --smoke (CPU, tiny-llama in bfloat16): the fp8 pool it reports holds
    float8 and twice the tokens of the bfloat16 one in the same memory, and both decode."""
    out = tmp_path / "kv"
    script = BENCHMARKS / "kv_cache_dtype.py"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(script), "--smoke", "--output", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads(out.with_suffix(".json").read_text())
    auto, fp8 = record["dtypes"]
    assert (auto["pool_dtype"], fp8["pool_dtype"]) == ("bfloat16", "float8_e4m3fn")
    assert (
        fp8["kv_capacity_tokens"] == 2 * auto["kv_capacity_tokens"]
        and fp8["kv_bytes_per_token"] * 2 == auto["kv_bytes_per_token"]
    )
    assert not auto["capacity_capped_by_max_num_seqs"] and not fp8["capacity_capped_by_max_num_seqs"]
    assert [r["batch_size"] for r in fp8["results"]] == [1, 2] and all(r["mean_step_ms"] > 0 for r in fp8["results"])
    assert "| fp8 | float8_e4m3fn |" in out.with_suffix(".md").read_text()


def test_disagg_benchmark_smoke(tmp_path):
    """benchmarks/disagg.py on CPU: one server, then prefill + decode servers behind the proxy, each loaded
    by the same streaming client; every request completes and the decode server loaded prompt KV."""
    out = tmp_path / "disagg.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "disagg.py"), "--smoke", "--output-json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    single, disagg = json.loads(out.read_text())["runs"]
    assert single["mode"] == "single" and disagg["mode"] == "disagg"
    assert single["completed"] == disagg["completed"] == single["num_prompts"] == 6
    assert single["total_output_tokens"] == disagg["total_output_tokens"] == 6 * 8
    # the long prompt's 5 blocks and one of each short prompt's (and of the warm-up's) were loaded
    assert disagg["kv_transfer_loaded_tokens"] == (5 + 5 + 1) * 16
    assert "| disagg |" in result.stdout


def run_benchmark(script: str, *args: str) -> subprocess.CompletedProcess:
    """benchmarks/<script> with args in a subprocess (the repo root importable); fails the test if it fails."""
    path = os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


def test_lora_throughput_smoke(tmp_path):
    """benchmarks/lora_throughput.py --smoke (CPU, tiny-llama): every run makes the same tokens, with
    adapters written as PEFT folders on the fly and mixed in each batch."""
    out = tmp_path / "lora.json"
    run_benchmark("lora_throughput.py", "--smoke", "--output-json", str(out))
    record = json.loads(out.read_text())
    assert record["smoke"] is True
    rows = record["rows"]
    assert [r["num_adapters"] for r in rows] == [0, 0, 1, 2]
    assert {r["output_tokens"] for r in rows} == {4 * 4}
    assert rows[0]["vs_base"] == 1.0 and all(r["tok_s"] > 0 for r in rows)
    assert out.with_suffix(".md").read_text().count("\n| ") == 5


def test_lora_kernels_smoke(tmp_path):
    """benchmarks/lora_kernels.py --smoke (CPU, the interpreter, tiny shapes): every projection timed, its
    configs written to the table under the device's name and the timings to the results."""
    out, table = tmp_path / "lora_kernels.json", tmp_path / "lora_configs.json"
    result = run_benchmark("lora_kernels.py", "--smoke", "--output-json", str(out), "--table", str(table))
    record = json.loads(out.read_text())
    assert [r["proj"] for r in record["results"]] == ["qkv", "o", "gate_up", "down"]
    assert all(isinstance(us, float) for r in record["results"] for us in r["tuned_us"] + r["default_us"])
    assert all(err < 1e-2 for r in record["results"] for err in r["max_abs_error_vs_reference"])
    configs = json.loads(table.read_text())["configs"]["cpu"]["bfloat16"]
    rank = record["rank"]
    shrink_keys = {f"{len(r['slices']) * rank}x{r['k']}" for r in record["results"]}
    expand_keys = {f"{r['n']}x{len(r['slices']) * rank}" for r in record["results"]}  # o and down: one shape
    assert set(configs["shrink"]["16"]) == shrink_keys and set(configs["expand"]["16"]) == expand_keys
    assert "| layer (4 projections) | 16 | 2 |" in result.stdout


def test_quant_decode_act_quant_ab_smoke(tmp_path):
    """benchmarks/quant_decode.py --smoke --act-quant fused,unfused (CPU, tiny-llama): one fp8 engine with
    the norms and SiLU-and-mul emitting 8-bit values (2 layers x 3 ops), one without, both decoding."""
    out = tmp_path / "qd"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(BENCHMARKS.parent), os.environ.get("PYTHONPATH")])),
    }
    args = ["--smoke", "--quantizations", "fp8", "--act-quant", "fused,unfused", "--output", str(out)]
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "quant_decode.py"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    fused, unfused = json.loads(out.with_suffix(".json").read_text())["schemes"]
    assert (fused["act_quant"], fused["fused_ops"]) == ("fused", 6)
    assert (unfused["act_quant"], unfused["fused_ops"]) == ("unfused", 0)
    for scheme in (fused, unfused):
        assert [r["batch_size"] for r in scheme["results"]] == [1, 2] and all(
            r["mean_step_ms"] > 0 for r in scheme["results"]
        )
    assert "| fp8 | fused (6) |" in out.with_suffix(".md").read_text()
