"""Collectives over the training workers; each works unchanged in a single process."""

from __future__ import annotations

import ray.train.torch
import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sum_over_workers(sums: torch.Tensor) -> list[float]:
    if _distributed():
        # float64 on the CPU works with gloo; NCCL needs the tensor on the GPU.
        sums = sums.to(ray.train.torch.get_device())
        dist.all_reduce(sums)
    return sums.cpu().tolist()


def every_worker(flag: bool) -> bool:
    """Whether the flag holds on every worker: ranks that must take the same steps agree on each one."""
    if not _distributed():
        return flag
    agreed = torch.tensor([int(flag)], device=ray.train.torch.get_device())
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
    return bool(agreed.item())


def merge_dicts(d: dict) -> dict:
    """The union of every worker's dict."""
    if not _distributed():
        return dict(d)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, d)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged
