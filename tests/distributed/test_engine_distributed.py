"""``--distributed`` in the example pipelines (examples/training/) under torchrun, on generated data.

Two gloo processes train rosmap.py on a small generated dataset of ROSMAP's layout and must match
one process on the same global batches (the objective is deterministic: no mixing plans), and an
M3Co run (per-rank mixing plans) with checkpoints must finish with rank 0 alone reporting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]

import training  # noqa: E402

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="needs torch.distributed with gloo"
)


@pytest.fixture(scope="module")
def rosmap_like(tmp_path_factory) -> Path:
    """MOGONET-layout CSVs with ROSMAP's 3 x 200 features and 2 classes, 40 training / 20 test rows."""
    folder = tmp_path_factory.mktemp("rosmap_like")
    rng = np.random.default_rng(0)
    for part, n in (("tr", 40), ("te", 20)):
        y = rng.integers(0, 2, n)
        np.savetxt(folder / f"labels_{part}.csv", y.astype(float), fmt="%.1f")
        for view in (1, 2, 3):
            np.savetxt(folder / f"{view}_{part}.csv", rng.normal(size=(n, 200)) + 0.5 * y[:, None], fmt="%.5f", delimiter=",")
    return folder


@pytest.mark.parametrize("batch_size", [4, None])
def test_split_batches_give_every_rank_a_share_of_every_global_batch(batch_size):
    def sampler(rank, **options):
        s = training.EpochBatchSampler(10, batch_size, seed=3, rank=rank, world_size=3, split_batches=True, **options)
        s.set_epoch(2)
        return s

    single = training.EpochBatchSampler(10, batch_size, seed=3)
    single.set_epoch(2)
    shares = [list(sampler(r).batches()) for r in range(3)]
    assert {len(s) for s in shares} == {len(single)} and all(len(sampler(r)) == len(single) for r in range(3))
    for step, whole in enumerate(single.batches()):
        parts = [shares[r][step] for r in range(3)]
        assert torch.equal(torch.cat(parts), whole)  # rank order is the single-process order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if batch_size == 4:  # global batches 4, 4, 2: the last leaves rank 2 without a row
        assert [len(b) for b in shares[2]] == [1, 1, 0]
        trimmed = [sampler(r, nonempty_shares=True) for r in range(3)]
        assert all(len(s) == 2 and len(list(s)) == 2 for s in trimmed)


def run(args, *, processes: int = 0, cwd: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    launcher = [sys.executable]
    if processes:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(launcher + [str(ROOT / "examples" / "rosmap.py")] + args, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_two_processes_train_like_one_on_the_same_global_batches(rosmap_like, tmp_path):
    # Global batches of 11 rows (32 = 11 + 11 + 10: ranks hold 6/5 or 5/5), two micro-batches per
    # optimiser step, a gathered MultiSClip term and scaled cross-entropies.
    common = ["--data-dir", str(rosmap_like), "--seeds", "0", "--epochs", "2", "--method", "only-multisclip"]
    common += ["--batch-size", "11", "--accumulate", "2", "--test-every", "1", "--no-progress", "--threads", "1"]
    run(common + ["--output-dir", str(tmp_path / "one")], cwd=tmp_path)
    two = run(common + ["--distributed", "--output-dir", str(tmp_path / "two")], processes=2, cwd=tmp_path)
    assert two.stdout.count("wrote ") == 1  # rank 0 alone reports

    one_seed = json.loads((tmp_path / "one" / "seeds" / "seed0.json").read_text())
    two_seed = json.loads((tmp_path / "two" / "seeds" / "seed0.json").read_text())
    assert two_seed["processes"] == 2 and one_seed["processes"] == 1
    for key in ("train_loss", "val_loss", "test_loss", "val_acc", "test_acc"):
        ones, twos = np.array(one_seed["history"][key]), np.array(two_seed["history"][key])
        # float32 sums in another order; Adam's normalised steps amplify such differences a little
        # with every update, so the first epoch is compared tightly and the rest loosely.
        np.testing.assert_allclose(twos[0], ones[0], rtol=1e-5, err_msg=key)
        np.testing.assert_allclose(twos, ones, rtol=2e-3, err_msg=key)
    one, two_results = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two_results["protocols"]["final"]["acc"] == one["protocols"]["final"]["acc"]


@pytest.mark.slow
def test_m3co_with_checkpoints_under_torchrun(rosmap_like, tmp_path):
    out = tmp_path / "m3co"
    args = ["--data-dir", str(rosmap_like), "--seeds", "0", "--epochs", "2", "--method", "only-m3co", "--holdout", "0", "--test-every", "1"]
    args += ["--checkpoint-every", "1", "--no-progress", "--distributed", "--output-dir", str(out)]
    result = run(args, processes=2, cwd=tmp_path)
    assert result.stdout.count("wrote ") == 1
    record = json.loads((out / "seeds" / "seed0.json").read_text())
    assert record["processes"] == 2 and len(record["history"]["train_loss"]) == 2
    assert all(np.isfinite(record["history"]["train_loss"]))
    checkpoint = torch.load(out / "checkpoints" / "seed0.pt", weights_only=False)
    assert checkpoint["epoch"] == 1 and len(checkpoint["rank_states"]) == 2
    # each rank draws its own mixing plans: their generators differ
    states = [s["objective"]["generator"] for s in checkpoint["rank_states"]]
    assert not torch.equal(states[0], states[1])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "curves.png", "results.json", "results.md", "seeds"]
