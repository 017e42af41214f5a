"""examples/ddp_demo.py trains under torchrun with two gloo processes and only rank 0 reports."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.mark.slow
def test_ddp_demo_runs_under_torchrun(tmp_path):
    out = tmp_path / "results" / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(ROOT / "examples" / "ddp_demo.py")]
    command += ["--epochs", "3", "--train-size", "90", "--test-size", "64", "--batch-size", "16", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    epoch_lines = [line for line in result.stdout.splitlines() if line.startswith("epoch")]
    assert len(epoch_lines) == 3, result.stdout  # one line per epoch: rank 0 alone prints
    report = json.loads(out.read_text())
    assert report["world_size"] == 2 and report["global_batch"] == 32
    assert [r["phase"] for r in report["history"]] == ["m3co", "multisclip", "multisclip"]
    for record in report["history"]:
        assert all(math.isfinite(record[k]) for k in ("train_loss", "contrastive_per_batch", "test_accuracy"))
        assert 0.0 <= record["test_accuracy"] <= 1.0
    assert [p.name for p in out.parent.iterdir()] == ["ddp.json"]  # no temporary file left behind
