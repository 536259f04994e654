"""The GPU scripts in benchmarks/ still import and parse their arguments (they only run on a GPU).

One subprocess runs every script's `--help` in turn: torch is imported once, and this session's
Triton, set up for its interpreter by test_kernels.py, is left alone.
"""

from __future__ import annotations

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
