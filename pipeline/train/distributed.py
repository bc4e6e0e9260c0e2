"""Collectives over the training workers; each works unchanged in a single process."""

from __future__ import annotations

import ray.train.torch
import torch
import torch.distributed as dist


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sum_over_workers(sums: torch.Tensor) -> list:
    if _distributed():
        # float64 on the CPU works with gloo; NCCL needs the tensor on the GPU.
        sums = sums.to(ray.train.torch.get_device())
        dist.all_reduce(sums)
    return sums.cpu().tolist()


def agree(every: bool, any_: bool = False) -> tuple[bool, bool]:
    """Whether `every` holds on every worker, and whether `any_` holds on any, in one all-reduce: ranks that must
    take the same steps agree on each one. The flags travel between the hosts (gloo): through NCCL they would go to
    the GPU and back, and reading them would make the host wait for every kernel queued before them, once a step."""
    if not _distributed():
        return every, any_
    agreed = torch.tensor([int(every), -int(any_)])
    dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=_host_group())
    return bool(agreed[0]), bool(agreed[1])


_host_groups = {}  # the default group -> a gloo group of the same ranks


def _host_group():
    """A gloo group of all ranks for tensors on the host: the default group itself where it is gloo (CPU
    workers). Made on first use, which every rank reaches at the same point (creating a group is a collective)."""
    world = dist.group.WORLD
    if dist.get_backend(world) == "gloo":
        return None
    if world not in _host_groups:
        _host_groups[world] = dist.new_group(backend="gloo")
    return _host_groups[world]


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
