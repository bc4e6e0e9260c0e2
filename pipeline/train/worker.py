"""Where a training worker runs and how it feeds the model: its device and rank, what train.amp means on its GPUs
(choose_amp), and its batches on the device."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import ray.train
import ray.train.torch
import torch
from torch.utils.data import DataLoader

from pipeline.hardware import gpu_half_precision
from pipeline.train import distributed
from pipeline.train.config import Config
from pipeline.train.preemption import PreemptionClock

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Worker:
    """Where this worker runs and how it feeds the model."""

    device: torch.device
    rank: int
    world: int
    amp_dtype: torch.dtype | None
    channels_last: bool
    amp_line: str | None = None  # what train.amp chose and why, where that needs saying
    skipped: dict = field(default_factory=lambda: {"train": {}, "val": {}})  # split -> {key: why it failed}

    @classmethod
    def current(cls, cfg: Config) -> Worker:
        ctx = ray.train.get_context()
        device = ray.train.torch.get_device()
        on_gpu = device.type == "cuda"
        if not on_gpu:
            # Ray pins each CPU worker to one thread; give each worker its share of the node's cores instead.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
        # Every rank takes the choice of the least capable GPU: ranks that scaled their losses differently would
        # skip different steps and drift apart.
        mine = tuple(torch.cuda.get_device_capability(device)) if on_gpu else None
        capability = min(distributed.merge_dicts({ctx.get_world_rank(): mine}).values()) if on_gpu else None
        amp, why = choose_amp(cfg.train.amp, capability)
        said = cfg.train.amp == "auto" or cfg.train.amp not in ("off", amp)
        return cls(device, ctx.get_world_rank(), ctx.get_world_size(), AMP_DTYPES.get(amp),
                   cfg.train.channels_last and on_gpu, f"train.amp {cfg.train.amp}: {amp} ({why})" if said else None)

    def autocast(self):
        return torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()

    def batches(self, loader: DataLoader, split: str, clock: PreemptionClock | None = None, start: int = 0,
                rng_state=None, limit: int | None = None):
        """(position, images, targets, keys, look) on the device, position counting the loader's batches from
        `start` up to `limit`; files that did not decode are recorded under `split` and left out. With a `clock`
        (training steps), the ranks agree on each step: one whose batch failed whole on any rank is skipped by all
        of them, since DDP's collectives need every rank, and `look` says whether any rank's clock wants them all
        to look for a preemption notice after it. `rng_state` is set once the loader has drawn its seed, as it had
        been when that state was saved."""
        batches = iter(loader)
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        for position, (images, targets, keys, skipped) in enumerate(batches, start=start + 1):
            if limit is not None and position > limit:
                return
            self.skipped[split].update((key, why) for key, (why, _) in skipped.items())
            ok, look = (images is not None, False) if clock is None else distributed.agree(
                images is not None, clock.wants(position))
            if not ok:
                continue
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield position, images, targets.to(self.device, non_blocking=True), keys, look


def choose_amp(requested: str, capability: tuple[int, int] | None) -> tuple[str, str]:
    """What train.amp means on workers whose GPUs have this compute capability (None: CPU workers), and why:
    "off", "bf16" or "fp16" (which trains with a GradScaler). CPU workers train in fp32; `auto` takes bf16 where
    the GPU computes it natively, else fp16 (hardware.gpu_half_precision); bf16 and fp16 stay as set."""
    if capability is None:
        return "off", "CPU workers train in fp32"
    if requested == "auto":
        return gpu_half_precision(capability)
    return requested, "as set"
