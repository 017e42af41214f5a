"""Where the example pipelines look for a dataset: one finder for every pipeline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, List, Optional

__all__ = ["REPO_ROOT", "DATA_DIR_ENV", "default_data_dirs", "find_data_dir"]

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR_ENV = "M3CO_DATA_DIR"


def default_data_dirs(name: str) -> List[Path]:
    """Where dataset ``name`` is looked for: ``$M3CO_DATA_DIR/NAME``, then ``../shared/data/NAME``
    beside the repository (and one level further up, for a git worktree nested in a folder)."""
    dirs = []
    if os.environ.get(DATA_DIR_ENV):
        dirs.append(Path(os.environ[DATA_DIR_ENV]) / name)
    dirs += [REPO_ROOT.parent / "shared" / "data" / name, REPO_ROOT.parent.parent / "shared" / "data" / name]
    return dirs


def find_data_dir(name: str, data_dir: Optional[Path], *, holds_data: Callable[[Path], bool], how_to_get: str) -> Path:
    """``data_dir`` when given, else the first of :func:`default_data_dirs` that ``holds_data``.

    Raises:
        SystemExit: no folder holds the data; the message lists where it looked and ``how_to_get`` it.
    """
    if data_dir is not None:
        return Path(data_dir)
    candidates = default_data_dirs(name)
    for path in candidates:
        if holds_data(path):
            return path
    raise SystemExit(f"No {name} data found (looked in {', '.join(str(p) for p in candidates)}).\n{how_to_get}")
