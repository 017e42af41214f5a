"""What the benchmark scripts share: memory measurement, quartiles, the machine's description, atomic result files."""

from __future__ import annotations

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


def write_text(path: Path, text: str) -> None:
    """Write ``path`` atomically (a temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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
