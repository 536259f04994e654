"""A new user's first hour: hub ids, one-line CLI errors, help, the demo model, bench defaults, the docs.

Each test is one of issue 22's findings, written so that it fails on the code the issue was filed on.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hf_cache import add_to_hf_cache

from mini_infer import LLM, SamplingParams
from mini_infer.cli import main as cli_main
from mini_infer.model_loader import resolve_model_path

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty local hub cache, offline: nothing is fetched, whatever the machine's network."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# -- 1. a hub id is a hub id ---------------------------------------------------------------------------


def test_a_hub_id_loads_from_the_local_hub_cache(offline_hub, stories_path):
    add_to_hf_cache(offline_hub, "mini-infer-tests/stories260K", Path(stories_path))
    params = SamplingParams(temperature=0, max_tokens=12)
    from_hub = LLM("mini-infer-tests/stories260K").generate("Once upon a time", params, use_tqdm=False)
    from_dir = LLM(stories_path).generate("Once upon a time", params, use_tqdm=False)
    assert from_hub[0].outputs[0].token_ids == from_dir[0].outputs[0].token_ids
    assert from_hub[0].outputs[0].text.strip()


def test_an_org_name_is_never_a_preset(offline_hub):
    """`Qwen/Qwen3-0.6B` used to resolve to the qwen3-0.6b preset on every machine, so it never loaded."""
    for load_format in ("auto", "dummy"):
        with pytest.raises(ValueError, match="as a hub id: the hub cannot be reached"):
            resolve_model_path("Qwen/Qwen3-0.6B", load_format)


def test_a_preset_needs_load_format_dummy():
    assert resolve_model_path("qwen3-0.6b", "dummy").name == "qwen3-0.6b.json"
    with pytest.raises(ValueError, match="preset with no weights: add --load-format dummy"):
        resolve_model_path("qwen3-0.6b")


# -- 4. every CLI mistake: one line naming what to change, exit status 2 ----------------------------------


def _broken_config(tmp_path: Path, stories_path: str) -> str:
    dst = tmp_path / "truncated"
    shutil.copytree(stories_path, dst)
    text = (dst / "config.json").read_text()
    (dst / "config.json").write_text(text[: len(text) // 2])
    return str(dst)


MISTAKES = [
    # (argv, what the one line must name)
    (["generate", "--max-token", "5"], "did you mean --max-tokens"),
    (["generate", "--model", "/nonexistent/model-dir"], "no such folder"),
    (["generate", "--model", "qwen3-0.6b"], "--load-format dummy"),
    (["generate", "--model", "STORIES", "--max-tokens", "-3"], "max_tokens"),
    (["generate", "--model", "STORIES", "--chat"], "no chat template: leave out --chat"),
    (["generate", "--model", "TRUNCATED"], "config.json is not valid JSON"),
    (["generate", "--model", "STORIES", "--dtype", "float64"], "dtype must be one of"),
    (["bench", "throughput", "--model", "STORIES", "--input-len", "600", "--output-len", "8"], "--input-len"),
    (["bench", "throughput", "--model", "STORIES", "--num-prompt", "2"], "did you mean --num-prompts"),
    (["bench", "latency", "--model", "STORIES", "--batch-sizes", "x"], "--batch-sizes"),
]


@pytest.mark.parametrize("argv,names", MISTAKES, ids=[" ".join(a[:3]) for a, _ in MISTAKES])
def test_cli_mistakes_are_one_line_and_exit_2(argv, names, capsys, tmp_path, stories_path, offline_hub):
    paths = {
        "STORIES": stories_path,
        "TRUNCATED": _broken_config(tmp_path, stories_path) if "TRUNCATED" in argv else "",
    }
    argv = [paths.get(a, a) for a in argv]
    try:
        rc = cli_main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("[")]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert names in lines[0]
    assert "Traceback" not in err and "Repo id must be" not in err


def test_bench_throughput_defaults_fit_the_model(tmp_path, capsys, stories_path):
    """The default workload (prompts up to 1024 tokens) failed on stories260K (max_model_len 512) with a
    traceback and an empty table; unset lengths now scale to the model and the run says so."""
    out = tmp_path / "t.json"
    rc = cli_main(
        [
            "bench",
            "throughput",
            "--model",
            stories_path,
            "--num-prompts",
            "2",
            "--output-json",
            str(out),
            "--disable-tqdm",
        ]
    )
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["errors"] == {} and record["runs"][0]["output_tokens"] > 0
    assert record["workload"]["input_len"] == [25, 256] and record["workload"]["output_len"] == [25, 256]
    assert "the default lengths are scaled to fit" in capsys.readouterr().out


# -- 5. the small things ---------------------------------------------------------------------------------


def test_help_shows_defaults_and_needs_no_torch():
    """`mini-infer --help` took 6 s: it imported torch and transformers before parsing."""
    code = (
        "import sys; from mini_infer.cli import build_parser; p = build_parser(); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'; "
        "sub = p._subparsers._group_actions[0].choices; print(sub['generate'].format_help()); "
        "print(sub['bench']._subparsers._group_actions[0].choices['throughput'].format_help())"
    )
    text = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    squashed = " ".join(text.split())
    for shown in (
        "tokens to generate at most (default: 128)",
        "(default: Once upon a time)",
        "(default: 256)",
        "requests in the run (default: 256)",
        "0 is greedy (default: 0.6)",
    ):
        assert shown in squashed


def test_generate_echoes_the_prompt(capsys, stories_path):
    assert cli_main(["generate", "--model", stories_path, "--prompt", "Lily and Tom", "--max-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Lily and Tom") and len(out) > len("Lily and Tom")
    # prompt and continuation join as the tokenizer decodes the whole sequence (SentencePiece's space kept)
    from mini_infer import LLM, SamplingParams

    llm = LLM(stories_path)
    done = llm.generate("Lily and Tom", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)[0]
    whole = llm.get_tokenizer().decode(done.prompt_token_ids + done.outputs[0].token_ids, skip_special_tokens=True)
    assert out.rstrip("\n") == whole and whole.startswith("Lily and Tom ")


def test_the_demo_model_prints_printable_text_and_says_it_is_random(capsys):
    """The demo's byte-level vocabulary let random weights print 121 U+FFFD characters."""
    assert cli_main(["generate", "--max-tokens", "40", "--temperature", "1.0", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    text = captured.out.removeprefix("Once upon a time")
    assert text.strip() and "\ufffd" not in text
    assert all(c.isprintable() or c == "\n" for c in text)
    assert "random" in captured.err


def test_bench_writes_a_result_file_by_default_and_says_where(tmp_path, capsys, stories_path):
    rc = cli_main(
        [
            "bench",
            "latency",
            "--model",
            stories_path,
            "--batch-sizes",
            "2",
            "--input-len",
            "8",
            "--output-len",
            "4",
            "--result-dir",
            str(tmp_path / "results"),
            "--disable-tqdm",
        ]
    )
    assert rc == 0
    files = list((tmp_path / "results").glob("latency-stories260K-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["results"]
    assert f"results written to {files[0]}" in capsys.readouterr().out


def test_report_shows_h100_targets_only_for_gpu_runs(tmp_path):
    from mini_infer.bench.report import report

    record = {
        "benchmark": "latency",
        "model": "llama-3-8b",
        "input_len": 8,
        "output_len": 4,
        "hardware": None,
        "environment": {"device": "cpu", "torch": "x", "triton": "x", "transformers": "x"},
        "results": [
            {
                "batch_size": 1,
                "mean_step_ms": 1.0,
                "decode_tok_per_s": 1000.0,
                "per_sequence_tok_per_s": 1000.0,
                "achieved_gb_per_s": 1.0,
                "hbm_fraction": None,
                "roofline_fraction": None,
            }
        ],
    }
    (tmp_path / "latency.json").write_text(json.dumps(record))
    text = report(tmp_path)
    assert "issue 4" not in text and "Targets" not in text
    record["hardware"] = {"hbm_gb_per_s": 3000.0, "bf16_peak_tflops": 800.0}
    record["results"][0]["hbm_fraction"] = 0.8
    (tmp_path / "latency.json").write_text(json.dumps(record))
    text = report(tmp_path)
    assert "issue" not in text and "H100 targets" in text and "80.0%" in text


def test_docs_agree_with_the_code():
    kernels_md = (REPO / "docs" / "kernels.md").read_text()
    pyproject = (REPO / "pyproject.toml").read_text()
    floor = re.search(r'"triton>=([\d.]+)"', pyproject).group(1)
    needed = re.search(r"interpreter tests need Triton ([\d.]+)", " ".join(kernels_md.split())).group(1)
    assert floor == needed
    collected = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py"],
        capture_output=True,
        text=True,
        cwd=REPO,
    ).stdout
    found = re.search(r"test_kernels.py: (\d+)|(\d+) tests? collected", collected)  # with -qq or -q
    count = int(found.group(1) or found.group(2))
    assert f"# {count} tests" in kernels_md
    serving_md = " ".join((REPO / "docs" / "serving.md").read_text().split())
    assert "without CUDA graphs, which is where" not in serving_md  # mixed steps replay prefill graphs
