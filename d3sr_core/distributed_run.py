"""The CLI's ranks: one process, or one per device under torchrun (`torchrun --nproc_per_node N
-m d3sr_core ...`). A single process is a world of size 1 and runs the same code; the
collectives are then plain local computations.

The collectives carry only a few counts per image and the failure messages at the end, so
they always use gloo on CPU tensors, whatever device a rank computes on: no NCCL setup, and the
same transport the CPU tests exercise.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Ranks:
    """This process's place in the job: `rank` of `world` processes, `local_rank` on its machine."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Ranks:
        """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK; absent (a plain run): rank 0 of 1."""
        def read(name: str, default: int) -> int:
            text = os.environ.get(name, "")
            try:
                return int(text) if text else default
            except ValueError:
                raise ValueError(f"environment variable {name}={text!r} is not an integer; "
                                 "start the CLI with torchrun or unset it") from None
        world = read("WORLD_SIZE", 1)
        rank, local_rank = read("RANK", 0), read("LOCAL_RANK", 0)
        if world < 1 or not 0 <= rank < world or local_rank < 0:
            raise ValueError(f"RANK={rank} / WORLD_SIZE={world} / LOCAL_RANK={local_rank} do not "
                             "describe a valid job; start the CLI with torchrun or unset them")
        return cls(rank, world, local_rank)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, timeout_minutes: float = 60.0) -> None:
        """Join the process group (gloo) when there is more than one rank."""
        if self.world > 1:
            import torch.distributed as dist
            dist.init_process_group("gloo", rank=self.rank, world_size=self.world,
                                    timeout=datetime.timedelta(minutes=timeout_minutes))

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    def all_sum(self, values: list[int]) -> list[int]:
        """Element-wise sum of `values` over all ranks (every rank must call it, same length)."""
        if self.world == 1:
            return list(values)
        import torch
        import torch.distributed as dist
        t = torch.tensor(values, dtype=torch.int64)
        dist.all_reduce(t)
        return [int(v) for v in t.tolist()]

    def gather(self, obj: T) -> list[T]:
        """`obj` from every rank, in rank order, on every rank (picklable objects)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of `items`: item i goes to rank i % world (each item exactly once)."""
        return items[self.rank::self.world]

    def prefix(self) -> str:
        """'[rank r] ' for messages a rank prints itself when there are several; '' otherwise."""
        return f"[rank {self.rank}] " if self.world > 1 else ""


def pick_device(ranks: Ranks, cpu: bool) -> bool:
    """Make cuda:LOCAL_RANK this process's current device (so ComfyUI loads onto it) unless `cpu`
    or CUDA is absent. Returns True when the rank runs on the CPU. ValueError when LOCAL_RANK
    names a GPU this machine does not have."""
    import torch
    if cpu or not torch.cuda.is_available():
        return True
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise ValueError(f"LOCAL_RANK {ranks.local_rank} has no GPU (this machine has {count}); "
                         f"use --nproc_per_node {count} or fewer, or --cpu")
    torch.cuda.set_device(ranks.local_rank)
    return False
