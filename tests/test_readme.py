"""Every fenced code block in README.md runs as written, from the repository root, against the fixtures.

Blocks are ```bash, ```python or ```text (not run). In a bash block each `&&`-joined command runs in bash,
except two that cannot run inside this suite: a `pip install ...` (this suite runs in what was installed;
the test checks that what the command installs is installed: the pinned version, the editable project and
each requirement of the named extras), and the bare `pytest` of the test command (it would run this suite
inside itself; the test checks that it is exactly the command .ci/run runs). The hub id example
`Qwen/Qwen3-0.6B` cannot download here, so its commands run with the hub client offline and a local hub
cache that holds that id, made from the tiny-random-qwen3 fixture (which has a chat template): the command
loads it as a hub id, from the cache, not as a preset.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from conftest import QWEN3, SHARED_MODELS
from hf_cache import add_to_hf_cache
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, re.S | re.M)
DEFAULT_MODELS = "../shared/models"


def _code(lang: str) -> list[str]:
    return [code.replace(DEFAULT_MODELS, str(SHARED_MODELS)) for block_lang, code in BLOCKS if block_lang == lang]


def _commands(code: str) -> list[str]:
    lines = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [cmd.strip() for line in lines for cmd in line.split("&&")]


BASH = [cmd for code in _code("bash") for cmd in _commands(code)]


def test_readme_blocks_are_bash_python_or_text():
    assert BLOCKS and {lang for lang, _ in BLOCKS} <= {"bash", "python", "text"}
    assert len(BASH) >= 5 and _code("python")


def _check_installed(cmd: str) -> None:
    """What `pip install ARGS` would install is installed: NAME==VERSION pins, and `-e ".[EXTRAS]"` (this
    project, editable, with every requirement of those extras)."""
    args = shlex.split(cmd)[2:]
    for arg in args:
        if arg == "-e":
            continue
        if arg.startswith("."):
            extras = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", arg).group(1) or ""
            assert metadata.distribution("mini-infer").read_text("direct_url.json"), "mini-infer is not installed"
            for text in metadata.requires("mini-infer") or []:
                req = Requirement(text)
                wanted = req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras.split(","))
                if wanted:
                    version = metadata.version(req.name)
                    assert req.specifier.contains(version, prereleases=True), f"{req} but {version} is installed"
        else:
            req = Requirement(arg)
            version = metadata.version(req.name)
            assert req.specifier.contains(version.split("+")[0], prereleases=True), f"{req} but {version}"


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    cache = tmp_path_factory.mktemp("hub")
    add_to_hf_cache(cache, "Qwen/Qwen3-0.6B", QWEN3)
    path = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    return {**os.environ, "PATH": path, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("cmd", BASH)
def test_readme_command(cmd, env):
    if cmd.startswith("pip install"):
        _check_installed(cmd)
        return
    if cmd == "pytest":  # the suite itself: the README's test command must be the one .ci/run runs
        ci_run = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
        readme = next(line for code in _code("bash") for line in code.splitlines() if line.endswith("&& pytest"))
        assert readme == ci_run
        return
    done = subprocess.run(["bash", "-c", cmd], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{cmd}\n{done.stderr[-3000:]}"
    assert done.stdout.strip(), f"{cmd} printed nothing"


def test_readme_python(monkeypatch):
    monkeypatch.chdir(REPO)
    out = io.StringIO()
    for code in _code("python"):
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().strip()
