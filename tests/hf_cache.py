"""A local Hugging Face hub cache entry made from a fixture folder, for tests that load a hub id offline."""

from __future__ import annotations

import shutil
from pathlib import Path

COMMIT = "0" * 40  # the snapshot's name; any 40 hex digits


def add_to_hf_cache(cache_dir: Path, repo_id: str, source: Path) -> Path:
    """Lays `source`'s files out as the hub client caches `repo_id` at its main revision
    (models--ORG--NAME/refs/main and snapshots/COMMIT/...), and returns the snapshot folder."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file():
            shutil.copy(f, snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot
