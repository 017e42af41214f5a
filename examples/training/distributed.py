"""The process group of distributed training (``--distributed`` under ``torchrun``)."""

from __future__ import annotations

import os
from typing import Any, List, Tuple

import torch

from m3co_loss import distributed as dist_utils

__all__ = ["is_main_process", "init_distributed", "shutdown_distributed", "rank_device", "gather_objects"]


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the only process that writes files."""
    return dist_utils.rank() == 0


def init_distributed(device: str = "cpu") -> Tuple[int, int]:
    """Join the process group that ``torchrun`` describes in the environment; returns (rank, world size).

    gloo for CPU devices, NCCL for CUDA devices (each rank then uses ``cuda:LOCAL_RANK``).
    """
    if dist_utils.is_initialized():
        return dist_utils.rank(), dist_utils.world_size()
    if not torch.distributed.is_available():
        raise RuntimeError("--distributed needs a torch build with torch.distributed")
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"--distributed runs under torchrun, which sets {', '.join(missing)} "
            "(e.g. torchrun --nproc_per_node 2 examples/rosmap.py --distributed ...)"
        )
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(rank_device(device))
        torch.distributed.init_process_group("nccl")
    else:
        torch.distributed.init_process_group("gloo")
    return dist_utils.rank(), dist_utils.world_size()


def shutdown_distributed() -> None:
    """Leave the process group, if one was joined."""
    if dist_utils.is_initialized():
        torch.distributed.destroy_process_group()


def rank_device(device: str) -> torch.device:
    """This rank's device: ``cuda`` without an index means ``cuda:LOCAL_RANK``."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def gather_objects(obj: Any, world_size: int) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order; every rank must call it."""
    if world_size == 1:
        return [obj]
    out: List[Any] = [None] * world_size
    torch.distributed.all_gather_object(out, obj)
    return out
