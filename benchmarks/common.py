"""What the benchmark scripts share: memory measurement, quartiles, the machine's description, atomic result files."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import subprocess
import tempfile
from pathlib import Path


def memory_baseline(device) -> int:
    """The memory held now, the reference of :func:`extra_peak_bytes` (CUDA: its peak counter is reset).

    CPU: the process's peak resident set (``ru_maxrss``), so call it once the inputs exist and a
    warm-up ran; CUDA: the bytes allocated by tensors.
    """
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def extra_peak_bytes(device, baseline: int) -> int:
    """Peak memory since :func:`memory_baseline` returned ``baseline``, above it."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - baseline)
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline)


def quartiles(xs: list) -> tuple:
    """(first quartile, median, third quartile), interpolated between the sorted values."""
    import statistics

    if len(xs) < 2:
        return (xs[0],) * 3
    return tuple(statistics.quantiles(xs, n=4, method="inclusive"))


def load_results(path: Path) -> dict:
    if path.exists():
        return json.loads(path.read_text())
    return {"meta": {}, "results": []}


@contextlib.contextmanager
def atomic_path(path: Path):
    """A temporary path beside ``path`` to write; once the block ends it replaces ``path``.

    The temporary file is synced to disk and made readable by all (``0o644``, where ``mkstemp``
    gives ``0o600``) before ``os.replace``; if anything raises, it is removed and ``path`` is left
    as it was. Its name starts with a dot, so that globs over the results skip it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def save_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=1))


def memory_total() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""
