"""Where a rank trains: its device, and the process group that joins the ranks.

Under torchrun (WORLD_SIZE > 1) every rank trains on `cuda:LOCAL_RANK` (or the CPU) and the
ranks form one process group: NCCL when the rank trains on a GPU, gloo on CPUs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from .config import Config

T = TypeVar("T")


def world_size() -> int:
    """Number of ranks torchrun started (1 for a plain `python -m training.train`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(cfg: Config, local_rank: int = 0) -> torch.device:
    """The device `cfg.device` (auto | cpu | cuda) means for the rank with `local_rank`."""
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but CUDA is not available")
    return torch.device("cuda", local_rank)


def select_device(cfg: Config) -> torch.device:
    """This rank's device, made the current CUDA device (so that nothing, ComfyUI's import
    included, touches another rank's GPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world_size() > 1 else 0
    device = resolve_device(cfg, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(cfg: Config) -> tuple[int, int, torch.device]:
    """(rank, world, device); under torchrun it initialises the process group: NCCL when this
    rank trains on a GPU, gloo on CPUs (`device: cpu` on a GPU machine included). CPU ranks
    share the machine's cores."""
    world = world_size()
    device = select_device(cfg)
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        dist.init_process_group(backend="nccl", device_id=device)
    else:
        dist.init_process_group(backend="gloo")
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_node))
    return dist.get_rank(), dist.get_world_size(), device


def shutdown(world: int) -> None:
    """Wait for every rank, then leave the process group (no-op for one process)."""
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def from_rank0(world: int, rank: int, compute: Callable[[], T]) -> T:
    """`compute()` run on rank 0 only; every rank gets its result, or its exception raised."""
    box: list = [None]
    if rank == 0:
        try:
            box[0] = compute()
        except Exception as e:
            box[0] = e
    if world > 1:
        dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], Exception):
        raise box[0]
    return box[0]


def any_rank(world: int, flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on at least one."""
    if world <= 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_same_step(world: int, step: int, device: torch.device) -> None:
    """RuntimeError unless every rank is at `step` (e.g. output_dir not shared, so they resumed
    from different checkpoints)."""
    if world <= 1:
        return
    steps = torch.tensor([step, -step], device=device)
    dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if int(steps[0]) != -int(steps[1]):
        raise RuntimeError(f"ranks resumed at different steps ({-int(steps[1])}..{int(steps[0])}): "
                           "output_dir must be on storage every rank sees")
