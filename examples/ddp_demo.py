"""DDP demo: M3CoLoss over the global batch of every process, on generated two-modality data.

Each process holds a shard of every batch (DistributedSampler); ``M3CoLoss(gather_distributed=True)``
contrasts the local rows against the rows of all processes, so the contrastive term sees the
global batch. Metrics are summed over processes; only rank 0 prints and writes results.

    torchrun --nproc_per_node 2 examples/ddp_demo.py            # gloo on CPU, NCCL on GPUs
    python examples/ddp_demo.py                                  # one process, same code
    torchrun --standalone --nproc_per_node 2 examples/ddp_demo.py --epochs 5 --out results.json
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from m3co_loss import M3CoLoss

import demo
from training.cli import int_at_least, path_argument
from training.io import atomic_write_json


def make_data(n: int, generator: torch.Generator) -> TensorDataset:
    views, y = demo.make_views(n, generator)  # the single-process demo's data
    return TensorDataset(*views, y)


class TwoModalityModel(nn.Module):
    """Encoders, unimodal heads and a fusion head. The mixed inputs go through the same forward
    call as the clean ones: DDP expects one forward per backward."""

    def __init__(self, dims, width: int = 64, classes: int = 6) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(nn.Sequential(nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width)) for d in dims)
        self.heads = nn.ModuleList(nn.Linear(width, classes) for _ in dims)
        self.fusion = nn.Sequential(nn.Linear(width * len(dims), width), nn.ReLU(), nn.Linear(width, classes))

    def forward(self, xs, mixed=None):
        z = [enc(x) for enc, x in zip(self.encoders, xs)]
        z_mixed = [enc(x) for enc, x in zip(self.encoders, mixed)] if mixed is not None else None
        return z, z_mixed, [h(e) for h, e in zip(self.heads, z)], self.fusion(torch.cat(z, 1))


def sum_over_ranks(values, device) -> list:
    """Sum a list of numbers over all processes (identity on one process)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def evaluate(model, data, device, rank: int, world: int) -> float:
    """Fusion-head accuracy on ``data``; each rank scores every world-th sample (no padding, no duplicates)."""
    x_clear, x_noisy, y = (t[rank::world].to(device) for t in data.tensors)
    model.eval()
    with torch.no_grad():
        _, _, _, fused = model([x_clear, x_noisy])
    model.train()
    correct, count = sum_over_ranks([(fused.argmax(1) == y).sum().item(), len(y)], device)
    return correct / count


def build_parser() -> argparse.ArgumentParser:
    positive_int = int_at_least(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=positive_int, default=30)
    parser.add_argument("--batch-size", type=positive_int, default=32, help="rows per process (global batch = this x processes)")
    parser.add_argument("--train-size", type=positive_int, default=400)
    parser.add_argument("--test-size", type=positive_int, default=2000)
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--loss-backend", choices=("auto", "dense", "tiled"), default="auto")
    parser.add_argument("--out", type=path_argument("file"), help="write the final metrics to this JSON file (rank 0, atomically)")
    return parser


def main() -> None:
    args = build_parser().parse_args()

    distributed = "RANK" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    # Every rank generates the same data; the samplers pick its shard.
    g = torch.Generator().manual_seed(args.seed)
    train_set, test_set = make_data(args.train_size, g), make_data(args.test_size, g)
    # drop_last=True: without it DistributedSampler pads the epoch with repeated samples so that
    # every rank gets the same count, and the repeats would enter the contrastive loss as extra
    # (duplicate) negatives. Dropping at most world - 1 samples per epoch keeps the loss exact.
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler)

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = TwoModalityModel([40, 60]).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if distributed else model
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-3, weight_decay=1e-4)
    # A different mixing stream per rank; the loss gathers embeddings over all ranks.
    criterion = M3CoLoss(
        total_steps=args.epochs, gather_distributed=True, backend=args.loss_backend, generator=torch.Generator().manual_seed(args.seed + 1000 * rank)
    )

    start = time.perf_counter()
    history = []
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        phase = criterion.phase()
        loss_sum = contrastive_sum = 0.0
        rows = 0
        for x_clear, x_noisy, y in loader:
            xs, y = [x_clear.to(device), x_noisy.to(device)], y.to(device)
            plan = criterion.sample(len(y), 2, device=device)
            mixed = [plan.mix(x, m) for m, x in enumerate(xs)] if plan is not None else None  # the paper mixes raw inputs
            z, z_mixed, unimodal, fused = ddp(xs, mixed)
            contrastive = criterion(z, mixed=z_mixed, plan=plan)
            # Every rank holds the same number of rows (drop_last above), so DDP's gradient
            # average of these per-rank means is the gradient of the global-batch mean.
            loss = F.cross_entropy(fused, y) + sum(F.cross_entropy(logits, y) for logits in unimodal) + contrastive
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * len(y)
            # contrastive is W / N_global x the local sum: its average over ranks is the global loss.
            contrastive_sum += contrastive.item()
            rows += len(y)
        criterion.step()
        # batches: summed over ranks too, so that total_contrastive / batches averages over ranks and batches.
        total_loss, total_contrastive, total_rows, batches = sum_over_ranks([loss_sum, contrastive_sum, rows, len(loader)], device)
        record = {
            "epoch": epoch + 1,
            "phase": phase,
            "train_loss": total_loss / total_rows,
            "contrastive_per_batch": total_contrastive / batches,
            "test_accuracy": evaluate(model, test_set, device, rank, world),
        }
        history.append(record)
        if rank == 0:
            print(
                f"epoch {record['epoch']:3d} [{phase:10s}] train loss {record['train_loss']:.4f} "
                f"contrastive {record['contrastive_per_batch']:.4f} test accuracy {record['test_accuracy']:.3f}",
                flush=True,
            )

    if rank == 0:
        elapsed = time.perf_counter() - start
        print(f"{world} process(es), global batch {args.batch_size * world}, {args.epochs} epochs, {elapsed:.1f} s")
        if args.out:
            final = history[-1]
            if not all(math.isfinite(final[k]) for k in ("train_loss", "contrastive_per_batch", "test_accuracy")):
                raise RuntimeError(f"non-finite metrics: {final}")
            atomic_write_json(args.out, {"world_size": world, "global_batch": args.batch_size * world, "seconds": elapsed, "history": history})
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
