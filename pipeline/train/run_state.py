"""A run's place in its checkpoints: what a checkpoint carries besides the weights (RunState), the state each
epoch's report saves (checkpoint_state, report), and the resume from the latest one (restore). The file itself is
pipeline.formats.checkpoint."""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field

import ray.train
import torch
from torch import nn

from pipeline.console import timestamp
from pipeline.formats import checkpoint
from pipeline.formats.model_spec import ModelSpec
from pipeline.train.config import Config
from pipeline.train.progress import Reporter
from pipeline.train.worker import Worker


@dataclass
class RunState:
    """What a checkpoint carries besides the weights and the optimizer: where the run is, and what it saw. A
    checkpoint saved on a preemption notice is mid-epoch: `step` steps of epoch `epoch` done, and each rank's
    sums and random state at that point in `ranks`."""

    epoch: int = 0
    best_val_acc: float = 0.0
    best_epoch: int = 0
    history: list = field(default_factory=list)
    skipped: dict = field(default_factory=lambda: {"train": {}, "val": {}})  # split -> {key: reason}
    step: int = 0
    ranks: dict = field(default_factory=dict)  # rank -> {"sums": [loss, correct, count], "rng": torch state}
    interruptions: list = field(default_factory=list)  # {reason, epoch, step, at} where the run resumed
    noticed: bool = False  # a preemption notice came since the run last resumed

    def end_epoch(self, metrics: dict, skipped: dict) -> dict:
        """Record a finished epoch's metrics and the files skipped so far (split -> {key: reason}); the ones it
        skipped first, {key: reason}."""
        new = {key: why for split in skipped for key, why in skipped[split].items()
               if key not in self.skipped.get(split, {})}
        self.skipped = skipped
        if metrics["val_acc"] >= self.best_val_acc:  # ties go to the later epoch, as Ray's CheckpointConfig does
            self.best_val_acc, self.best_epoch = metrics["val_acc"], metrics["epoch"]
        self.history.append(metrics)
        self.epoch, self.step, self.ranks = metrics["epoch"], 0, {}
        return new


@dataclass(frozen=True)
class Trainee:
    """What a worker trains, whose states a checkpoint holds: the model as built (DDP's wrapper shares its
    weights), the spec and classes it is saved with, the optimizer, the learning rate schedule and the GradScaler."""

    model: nn.Module
    spec: ModelSpec
    classes: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


def checkpoint_state(trainee: Trainee, config: Config, progress: RunState, val: dict | None) -> dict:
    """Everything needed to resume the run or to label with the model (see pipeline.formats.checkpoint). `val`: the
    epoch's val confusion matrix and grid examples (none in a mid-epoch checkpoint); nothing that grows with the
    data."""
    return {
        "model": trainee.spec,
        "classes": trainee.classes,
        "model_state": trainee.model.state_dict(),
        "config": config.model_dump(mode="json"),
        "optimizer": trainee.optimizer.state_dict(),
        "scheduler": trainee.scheduler.state_dict(),
        "scaler": trainee.scaler.state_dict(),
        "val": val,
        **vars(progress),
    }


def report(metrics: dict, state: dict, worker: Worker) -> None:
    """Every worker reports the metrics; rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if worker.rank == 0:
            checkpoint.save(state, tmp)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def restore(trainee: Trainee, worker: Worker, reporter: Reporter) -> RunState:
    """Continue from the latest checkpoint after a worker failure or a re-run of the same job."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return RunState()
    with ckpt.as_directory() as directory:
        saved = checkpoint.load(directory)
    trainee.model.load_state_dict(saved["model_state"])
    trainee.optimizer.load_state_dict(saved["optimizer"])
    trainee.scheduler.load_state_dict(saved["scheduler"])
    load_scaler(trainee.scaler, saved.get("scaler"))
    progress = RunState(**{key: saved[key] for key in RunState.__dataclass_fields__ if key in saved})
    worker.skipped = {split: dict(keys) for split, keys in progress.skipped.items()}
    reason = "preemption" if progress.noticed else "failure"
    progress.interruptions.append({"reason": reason, "epoch": progress.epoch + 1, "step": progress.step,
                                   "at": timestamp(time.time())})
    progress.noticed = False
    where = f"epoch {progress.epoch + 1} step {progress.step}" if progress.step else f"epoch {progress.epoch}"
    reporter.line(f"resuming after {where} ({reason}; best val acc {progress.best_val_acc:.4f})")
    return progress


def load_scaler(scaler: torch.amp.GradScaler, state: dict | None) -> None:
    """The saved GradScaler state, where it applies. A run may resume on another kind of device or with another
    train.amp: a disabled scaler (CPU workers, bf16, no AMP) saves {}, which an enabled one refuses to load, so an
    enabled one starts from its initial scale then, as a new fp16 run does; a disabled one ignores any state."""
    if state:
        scaler.load_state_dict(state)
