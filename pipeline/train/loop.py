"""The per-worker training loop that Ray Train runs on every worker (data-parallel, DDP).

`train_loop_per_worker` reads top to bottom: build the model, optimizer and loaders, restore the latest
checkpoint, then each epoch train on this worker's shard, evaluate its share of val, sum the counts over all
workers, and report, rank 0 with a checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.console import timestamp
from pipeline.formats import checkpoint
from pipeline.formats.model_spec import ModelSpec
from pipeline.hardware import gpu_half_precision
from pipeline.models import build_model, configure_trainable, head_from_imagenet, set_train_mode
from pipeline.train import distributed, shards, shared_storage
from pipeline.train.config import Config
from pipeline.train.dataset import EpochSampler, ImageDataset, ShardStream, collate_skipping
from pipeline.train.description import TrainingJob
from pipeline.train.progress import Reporter
from pipeline.train.splits import SPLITS, TrainingData
from pipeline.train.transforms import decode_sizes, eval_transform, train_transform

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
GRID = 16  # val images the prediction grid shows


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
            self.skipped[split].update(skipped)
            ok, look = (images is not None, False) if clock is None else distributed.agree(
                images is not None, clock.wants(position))
            if not ok:
                continue
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield position, images, targets.to(self.device, non_blocking=True), keys, look


class PreemptionClock:
    """When this worker wants the workers to look for a preemption notice after the coming step: once `every`
    seconds will have passed since they last looked by that step's end, judged by the last step's length (so a step
    longer than that is always followed by a look), after the epoch's last step, and after the run's first step,
    whose length is not known yet. The wish rides on the step's all-reduce that the ranks make anyway
    (distributed.agree): they look together when any of them wishes. `clock`: seconds, monotonic."""

    def __init__(self, every: float, clock=time.perf_counter):
        self.every, self.clock = every, clock
        self.looked_at = self.fetched_at = clock()
        self.step_seconds = math.inf  # the last step's, its batch's loading included
        self.last_step, self.in_epoch = 0, False

    def start_epoch(self, last_step: int) -> None:
        """An epoch whose last step is `last_step` begins: the time until its first batch is no step's."""
        self.last_step, self.in_epoch = last_step, False

    def wants(self, step: int) -> bool:
        now = self.clock()
        if self.in_epoch:
            self.step_seconds = now - self.fetched_at
        self.fetched_at, self.in_epoch = now, True
        return step == self.last_step or now - self.looked_at + self.step_seconds >= self.every

    def looked(self) -> None:
        self.looked_at = self.clock()


def choose_amp(requested: str, capability: tuple[int, int] | None) -> tuple[str, str]:
    """What train.amp means on workers whose GPUs have this compute capability (None: CPU workers), and why:
    "off", "bf16" or "fp16" (which trains with a GradScaler). CPU workers train in fp32; `auto` takes bf16 where
    the GPU computes it natively, else fp16 (hardware.gpu_half_precision); bf16 and fp16 stay as set."""
    if capability is None:
        return "off", "CPU workers train in fp32"
    if requested == "auto":
        return gpu_half_precision(capability)
    return requested, "as set"


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


def new_model(cfg: Config, classes: list[str]) -> tuple[nn.Module, ModelSpec]:
    """The model a run trains: the backbone, a new head for `classes`, and which parts of it train."""
    rows = head_from_imagenet(classes, cfg.model.head_from_imagenet) if cfg.model.head_from_imagenet else None
    model, spec = build_model(cfg.model.arch, len(classes), cfg.model.weights, rows)
    configure_trainable(model, spec.head, cfg.model.mode, cfg.model.trainable)
    return model, spec


def train_loop_per_worker(config: dict) -> None:
    job: TrainingJob = config["job"]
    cfg = Config.model_validate(job.config)
    shared_storage.check_marker(job.storage_marker, cfg.storage.path)
    worker = Worker.current(cfg)
    data: TrainingData = ray.get(job.data)  # Arrow and NumPy, shared with the node's object store
    torch.manual_seed(cfg.train.seed)  # the same new head on every worker
    model, spec = new_model(cfg, data.classes)
    if worker.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.train.step_size, gamma=cfg.train.gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=worker.amp_dtype is torch.float16)
    criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=cfg.train.label_smoothing)
    reporter = Reporter(job.events, worker.rank, worker.world, cfg.train.epochs)
    if worker.amp_line:
        reporter.line(worker.amp_line)
    progress = restore(model, optimizer, scheduler, scaler, worker, reporter)
    (train_loader, train_order), (val_loader, _) = (loader(cfg, data, split, spec, worker) for split in SPLITS)
    nodes = len(set(distributed.merge_dicts({worker.rank: ray.get_runtime_context().get_node_id()}).values()))
    limit = cfg.train.max_steps_per_epoch

    clock = PreemptionClock(cfg.train.preemption_check_seconds)
    for epoch in range(progress.epoch, cfg.train.epochs):
        train_order.set_epoch(epoch)  # a new shuffle, and so a new shard, every epoch
        # Seeding per epoch (loader workers are re-forked each epoch) makes a resumed run match an unbroken one.
        torch.manual_seed(cfg.train.seed * 1_000_000 + epoch * 1000 + worker.rank)
        mid_epoch = progress.ranks.get(worker.rank) if epoch == progress.epoch else None
        done = progress.step if mid_epoch else 0
        train_order.skip = done * cfg.train.batch_size
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        last_step = min(done + len(train_loader), limit or math.inf)
        reporter.start_epoch(epoch, last_step - done)

        def on_preemption_check(step: int, sums: torch.Tensor) -> None:
            """On the first preemption notice, a just-in-time checkpoint: this epoch's steps so far, resumable
            from the next one. All ranks ask together: get_preemption_info is a collective."""
            if progress.noticed or ray.train.get_preemption_info() is None:
                return
            ranks = distributed.merge_dicts({worker.rank: {"sums": sums.tolist(), "rng": torch.get_rng_state()}})
            progress.noticed = True  # in this checkpoint, and the next ones: a restart is the preemption's
            saved = RunState(**{**vars(progress), "epoch": epoch, "step": step, "ranks": ranks})
            reporter.line(f"preemption notice: saving a checkpoint at epoch {epoch + 1} step {step}")
            report({"epoch": epoch, "step": step, "val_acc": -1.0},  # never the best
                   checkpoint_state(job, data.classes, spec, model, optimizer, scheduler, scaler, saved, None), worker)

        clock.start_epoch(last_step)
        train_sums, first_step_at = train_one_epoch(ddp_model, criterion, optimizer, scaler, train_loader, worker,
                                                    reporter, mid_epoch, clock, on_preemption_check, done, last_step)
        train_seconds = time.perf_counter() - start
        scheduler.step()
        val_sums, confusion, examples = evaluate(ddp_model, criterion, val_loader, worker, len(data.classes), limit)

        train_sums, val_sums = distributed.sum_over_workers(train_sums), distributed.sum_over_workers(val_sums)
        confusion = distributed.sum_over_workers(confusion)
        examples = [e for part in distributed.merge_dicts({worker.rank: examples}).values() for e in part]
        skipped = {split: distributed.merge_dicts(keys) for split, keys in worker.skipped.items()}
        metrics = epoch_metrics(epoch, train_sums, val_sums, lr, train_seconds, time.perf_counter() - start, worker)
        metrics["nodes"] = nodes
        if epoch == progress.epoch and first_step_at is not None:
            metrics["startup_seconds"] = first_step_at - job.started_at  # command start to first training step
        new_skips = {key: why for split in skipped for key, why in skipped[split].items()
                     if key not in progress.skipped.get(split, {})}
        unreadable = too_many_unreadable(skipped, data, cfg.data.max_unreadable)
        if unreadable:  # the same on every rank: they all stop, without a checkpoint of a run that saw no data
            reporter.stop(unreadable)
            return
        progress.skipped = skipped
        if metrics["val_acc"] >= progress.best_val_acc:  # ties go to the later epoch, as Ray's CheckpointConfig does
            progress.best_val_acc, progress.best_epoch = metrics["val_acc"], epoch + 1
        progress.history.append(metrics)
        progress.epoch, progress.step, progress.ranks = epoch + 1, 0, {}
        for key in sorted(new_skips):
            reporter.line(f"warning: skipped {key}: {new_skips[key]}")
        reporter.line(epoch_line(metrics, reporter.epochs))
        val = {"confusion": [[int(n) for n in row] for row in np.reshape(confusion, (len(data.classes), -1))],
               "examples": examples}
        report(metrics, checkpoint_state(job, data.classes, spec, model, optimizer, scheduler, scaler, progress, val),
               worker)
        reporter.end_epoch(metrics)


def loader(cfg: Config, data: TrainingData, split: str, spec: ModelSpec, worker: Worker):
    """(DataLoader, what orders its epochs) over this worker's share of a split: train reshuffled every epoch and
    padded so that every rank takes the same steps, val unpadded, so every val image is counted exactly once. A
    split of archives is streamed (ShardStream), one of loose files read file by file (EpochSampler)."""
    train = split == "train"
    transform = train_transform(spec) if train else eval_transform(spec)
    draft = None if cfg.data.exact_decode else decode_sizes(spec)[0 if train else 1]
    samples = getattr(data, split)
    args = dict(batch_size=cfg.train.batch_size, num_workers=cfg.train.num_data_workers,
                collate_fn=collate_skipping, pin_memory=worker.device.type == "cuda")
    if samples.archives:
        stream = ShardStream(data.root, samples, transform, draft, data.classes, worker.rank, worker.world,
                             cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle_buffer, shuffle=train,
                             split_dir=shards.split_dir(data.root, split))
        return DataLoader(stream, **args), stream
    order = EpochSampler(len(samples), worker.rank, worker.world, cfg.train.seed, shuffle=train)
    return DataLoader(ImageDataset(data.root, samples, transform, draft), sampler=order, **args), order


def train_one_epoch(model, criterion, optimizer, scaler, loader, worker: Worker, reporter: Reporter,
                    mid_epoch: dict | None, clock: PreemptionClock, on_preemption_check, done: int,
                    last_step: int) -> tuple[torch.Tensor, float | None]:
    """Sums of (loss, correct, count) over this worker's shard, and the time.time() of its first step. From a
    mid-epoch checkpoint it goes on after its `done` steps, with its sums and random state, to `last_step`. When
    the `clock` says so, it calls `on_preemption_check`, which saves a checkpoint on the first notice of a node's
    preemption; training goes on until the node goes."""
    set_train_mode(model)
    # The sums stay on the device, read once at the epoch's end: reading them each step (.item()) would make the
    # host wait for each step's kernels before it could queue the next step's.
    sums = torch.tensor(mid_epoch["sums"] if mid_epoch else [0.0, 0.0, 0.0], dtype=torch.float64,
                        device=worker.device)
    trained = 0  # images of this epoch trained since it (re)started, counted on the host
    batches = worker.batches(loader, "train", clock, start=done, rng_state=mid_epoch and mid_epoch["rng"],
                             limit=last_step)
    first_step_at = None
    for step, images, targets, _, look in batches:
        first_step_at = first_step_at or time.time()
        with worker.autocast():
            logits = model(images)
            loss = criterion(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss / len(targets)).backward()
        scaler.step(optimizer)
        scaler.update()
        sums[0] += loss.detach()
        sums[1] += (logits.argmax(1) == targets).sum()
        sums[2] += len(targets)
        trained += len(targets)
        reporter.step(step - done, trained)
        # Only the batch of this step has been loaded yet: the random state resumes exactly at the next one.
        if look:
            on_preemption_check(step, sums)
            clock.looked()
    return sums, first_step_at


@torch.no_grad()
def evaluate(model, criterion, loader, worker: Worker, classes: int,
             limit: int | None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Sums of (loss, correct, count) over this worker's share of val, its confusion counts (true × predicted,
    flat), and a few (key, true, predicted) examples for the prediction grid: misclassified ones first, then
    correct ones of every class."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=worker.device)  # on the device, as in train_one_epoch
    confusion = torch.zeros(classes * classes, dtype=torch.float64, device=worker.device)
    wrong, right, per_class = [], {}, -(-GRID // classes)
    for _, images, targets, keys, _ in worker.batches(loader, "val", limit=limit):
        with worker.autocast():
            logits = model(images)
        preds = logits.argmax(1)
        sums[0] += criterion(logits.float(), targets)
        sums[1] += (preds == targets).sum()
        sums[2] += len(targets)
        confusion += torch.bincount(targets * classes + preds, minlength=classes * classes)
        for key, true, pred in zip(keys, targets.tolist(), preds.tolist()):
            shown, room = (wrong, GRID // 2) if true != pred else (right.setdefault(true, []), per_class)
            if len(shown) < room:
                shown.append((key, true, pred))
    return sums, confusion, wrong + [e for examples in right.values() for e in examples]


def too_many_unreadable(skipped: dict, data: TrainingData, max_share: float) -> str | None:
    """Why the run must stop when more than `max_share` of a split's files failed (a dead mount, wrong
    credentials): a run that goes on would report the accuracy of no data. None while it may go on."""
    for split in SPLITS:
        size, failed = len(getattr(data, split)), skipped[split]
        if size and len(failed) > max_share * size:
            first = min(failed)
            return (f"{len(failed)} of {size} {split} files could not be read or decoded, more than "
                    f"data.max_unreadable={max_share:g} of them (first: {first}: {failed[first]}); check that "
                    "the workers can read data.root, or raise data.max_unreadable")
    return None


def epoch_metrics(epoch: int, train: list[float], val: list[float], lr: float, train_seconds: float,
                  epoch_seconds: float, worker: Worker) -> dict:
    return {
        "epoch": epoch + 1,
        "train_loss": train[0] / max(train[2], 1),
        "train_acc": train[1] / max(train[2], 1),
        "val_loss": val[0] / max(val[2], 1),
        "val_acc": val[1] / max(val[2], 1),
        "lr": lr,
        "epoch_seconds": epoch_seconds,
        "images_per_s": train[2] / train_seconds,
        "train_images": int(train[2]),
        "val_images": int(val[2]),
        "world_size": worker.world,
    }


def checkpoint_state(job: TrainingJob, classes: list[str], spec: ModelSpec, model, optimizer, scheduler, scaler,
                     progress: RunState, val: dict | None) -> dict:
    """Everything needed to resume the run or to label with the model (see pipeline.formats.checkpoint). `val`: the
    epoch's val confusion matrix and grid examples (none in a mid-epoch checkpoint); nothing that grows with the
    data."""
    return {
        "model": spec,
        "classes": classes,
        "model_state": model.state_dict(),
        "config": job.config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
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


def restore(model, optimizer, scheduler, scaler, worker: Worker, reporter: Reporter) -> RunState:
    """Continue from the latest checkpoint after a worker failure or a re-run of the same job."""
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return RunState()
    with ckpt.as_directory() as directory:
        saved = checkpoint.load(directory)
    model.load_state_dict(saved["model_state"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    load_scaler(scaler, saved.get("scaler"))
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


def epoch_line(m: dict, epochs: int) -> str:
    return (
        f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
        f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}  lr {m['lr']:.2g}  "
        f"{m['epoch_seconds']:.1f}s  {m['images_per_s']:.1f} img/s"
    )
