"""The little the train worker needs from torch.distributed, safe to call outside torchrun.

Under ``torchrun`` the process group exists once the trainer arguments are
built (accelerate initialises it: NCCL on GPUs, gloo on CPUs); before that,
and in a single process, every helper degrades to the obvious local answer.
"""

from __future__ import annotations

import os
from typing import Any, TypeVar

T = TypeVar("T")


def _dist() -> Any | None:
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    dist = _dist()
    return dist.get_rank() if dist else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist else env_world_size()


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    dist = _dist()
    if dist:
        dist.barrier()


def all_gather(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    dist = _dist()
    if not dist:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    dist = _dist()
    if not dist:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[no-any-return]


def any_rank(flag: bool, device: Any = None) -> bool:
    """True on every rank when ``flag`` is true on at least one (all-reduce MAX)."""
    dist = _dist()
    if not dist:
        return flag
    import torch

    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())
