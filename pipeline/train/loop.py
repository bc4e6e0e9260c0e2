"""The per-worker training loop that Ray Train runs on every worker (data-parallel, DDP).

`train_loop_per_worker` reads top to bottom: set up the model, optimizer and loaders, restore the latest
checkpoint, then each epoch train on this worker's shard, evaluate its share of val, sum the counts over all
workers, and report, rank 0 with a checkpoint. Where a worker runs is pipeline.train.worker, the checkpoints'
state pipeline.train.run_state, when to look for a preemption notice pipeline.train.preemption.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch import nn
from torch.utils.data import DataLoader

from pipeline.confusion import confusion_matrix
from pipeline.formats.calibration import HeldOut, calibration_share
from pipeline.formats.model_spec import ModelSpec
from pipeline.models import build_model, configure_trainable, head_from_imagenet, set_train_mode
from pipeline.train import distributed, shared_storage
from pipeline.train.config import Config
from pipeline.train.dataset import Share, split_loader
from pipeline.train.description import TrainingJob
from pipeline.train.preemption import PreemptionClock
from pipeline.train.progress import Reporter
from pipeline.train.run_state import RunState, Trainee, checkpoint_state, report, restore
from pipeline.train.splits import SPLITS, TrainingData
from pipeline.train.transforms import decode_sizes, eval_transform, train_transform
from pipeline.train.worker import Worker

GRID = 16  # val images the prediction grid shows


@dataclass(frozen=True)
class WorkerRun:
    """What every epoch of a worker's run uses, set up once (set_up)."""

    job: TrainingJob
    worker: Worker
    reporter: Reporter
    trainee: Trainee
    model: nn.Module  # DDP's wrapper of trainee.model: what trains and evaluates
    criterion: nn.Module
    progress: RunState  # where the run stands, updated as it goes


@dataclass(frozen=True)
class Epoch:
    """The steps of epoch `index` that this run trains: after the `done` steps of a mid-epoch checkpoint, which
    also holds this rank's sums and random state at that point (`resumed`), up to `last_step`; with the learning
    rate of the epoch and the perf_counter() at its start."""

    index: int
    done: int
    last_step: int
    resumed: dict | None
    lr: float
    started: float


def train_loop_per_worker(config: dict) -> None:
    job: TrainingJob = config["job"]
    cfg = job.config
    shared_storage.check_marker(job.storage_marker, cfg.storage.path)
    worker = Worker.current(cfg)
    data: TrainingData = ray.get(job.data)  # Arrow and NumPy, shared with the node's object store
    run = set_up(job, worker, data.classes)
    progress, reporter = run.progress, run.reporter
    (train_loader, train_order), (val_loader, _) = (loader(cfg, data, split, run.trainee.spec, worker)
                                                    for split in SPLITS)
    nodes = len(set(distributed.merge_dicts({worker.rank: ray.get_runtime_context().get_node_id()}).values()))
    clock = PreemptionClock(cfg.train.preemption_check_seconds)
    for index in range(progress.epoch, cfg.train.epochs):
        train_order.set_epoch(index)  # a new shuffle, and so a new shard, every epoch
        # Seeding per epoch (loader workers are re-forked each epoch) makes a resumed run match an unbroken one.
        torch.manual_seed(cfg.train.seed * 1_000_000 + index * 1000 + worker.rank)
        resumed = progress.ranks.get(worker.rank) if index == progress.epoch else None
        done = progress.step if resumed else 0
        train_order.skip = done * cfg.train.batch_size
        last_step = min(done + len(train_loader), cfg.train.max_steps_per_epoch or math.inf)
        epoch = Epoch(index, done, last_step, resumed, run.trainee.optimizer.param_groups[0]["lr"],
                      time.perf_counter())
        reporter.start_epoch(index, last_step - done)
        clock.start_epoch(last_step)
        train_sums, first_step_at = train_one_epoch(run, train_loader, epoch, clock)
        trained_at = time.perf_counter()
        run.trainee.scheduler.step()
        val_sums, confusion, examples, held = evaluate(run, val_loader)

        train_sums, val_sums = distributed.sum_over_workers(train_sums), distributed.sum_over_workers(val_sums)
        val = val_over_workers(confusion, examples, held, cfg, worker.rank)
        skipped = {split: distributed.merge_dicts(keys) for split, keys in worker.skipped.items()}
        metrics = epoch_metrics(epoch, train_sums, val_sums, trained_at, worker.world, nodes)
        if index == progress.epoch and first_step_at is not None:
            metrics["startup_seconds"] = first_step_at - job.started_at  # command start to first training step
        unreadable = too_many_unreadable(skipped, data, cfg.data.max_unreadable)
        if unreadable:  # the same on every rank: they all stop, without a checkpoint of a run that saw no data
            reporter.stop(unreadable)
            return
        new_skips = progress.end_epoch(metrics, skipped)
        for key in sorted(new_skips):
            reporter.line(f"warning: skipped {key}: {new_skips[key]}")
        reporter.line(epoch_line(metrics, reporter.epochs))
        report(metrics, checkpoint_state(run.trainee, cfg, progress, val), worker)
        reporter.end_epoch(metrics)


def new_model(cfg: Config, classes: list[str]) -> tuple[nn.Module, ModelSpec]:
    """The model a run trains: the backbone, a new head for `classes`, and which parts of it train."""
    rows = head_from_imagenet(classes, cfg.model.head_from_imagenet) if cfg.model.head_from_imagenet else None
    model, spec = build_model(cfg.model.arch, len(classes), cfg.model.weights, rows)
    configure_trainable(model, spec.head, cfg.model.mode, cfg.model.trainable)
    return model, spec


def set_up(job: TrainingJob, worker: Worker, classes: list[str]) -> WorkerRun:
    """The model with its optimizer, schedule and loss, on this worker's device and wrapped for DDP, restored from
    the latest checkpoint where there is one."""
    train = job.config.train
    torch.manual_seed(train.seed)  # the same new head on every worker
    model, spec = new_model(job.config, classes)
    if worker.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=train.lr,
                                momentum=train.momentum)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=train.step_size, gamma=train.gamma)
    scaler = torch.amp.GradScaler("cuda", enabled=worker.amp_dtype is torch.float16)
    trainee = Trainee(model, spec, classes, optimizer, scheduler, scaler)
    criterion = nn.CrossEntropyLoss(reduction="sum", label_smoothing=train.label_smoothing)
    reporter = Reporter(job.events, worker.rank, worker.world, train.epochs)
    if worker.amp_line:
        reporter.line(worker.amp_line)
    return WorkerRun(job, worker, reporter, trainee, ddp_model, criterion, restore(trainee, worker, reporter))


def loader(cfg: Config, data: TrainingData, split: str, spec: ModelSpec, worker: Worker):
    """(DataLoader, what orders its epochs) over this worker's share of a split: train reshuffled every epoch and
    padded so that every rank takes the same steps, val unpadded, so every val image is counted exactly once."""
    train = split == "train"
    transform = train_transform(spec) if train else eval_transform(spec)
    draft = None if cfg.data.exact_decode else decode_sizes(spec)[0 if train else 1]
    share = Share(worker.rank, worker.world, cfg.train.batch_size, cfg.train.seed, cfg.data.shuffle_buffer,
                  shuffle=train)
    return split_loader(data, split, transform, draft, share, num_workers=cfg.train.num_data_workers,
                        pin_memory=worker.device.type == "cuda")


def train_one_epoch(run: WorkerRun, loader: DataLoader, epoch: Epoch,
                    clock: PreemptionClock) -> tuple[torch.Tensor, float | None]:
    """Sums of (loss, correct, count) over this worker's shard, and the time.time() of its first step. From a
    mid-epoch checkpoint it goes on after its steps, with its sums and random state. When the `clock` says so, the
    ranks look for a preemption notice together (checkpoint_if_preempted); training goes on until the node goes."""
    worker, trainee = run.worker, run.trainee
    set_train_mode(run.model)
    # The sums stay on the device, read once at the epoch's end: reading them each step (.item()) would make the
    # host wait for each step's kernels before it could queue the next step's.
    sums = torch.tensor(epoch.resumed["sums"] if epoch.resumed else [0.0, 0.0, 0.0], dtype=torch.float64,
                        device=worker.device)
    trained = 0  # images of this epoch trained since it (re)started, counted on the host
    batches = worker.batches(loader, "train", clock, start=epoch.done,
                             rng_state=epoch.resumed and epoch.resumed["rng"], limit=epoch.last_step)
    first_step_at = None
    for step, images, targets, _, look in batches:
        first_step_at = first_step_at or time.time()
        with worker.autocast():
            logits = run.model(images)
            loss = run.criterion(logits.float(), targets)
        trainee.optimizer.zero_grad(set_to_none=True)
        trainee.scaler.scale(loss / len(targets)).backward()
        trainee.scaler.step(trainee.optimizer)
        trainee.scaler.update()
        sums[0] += loss.detach()
        sums[1] += (logits.argmax(1) == targets).sum()
        sums[2] += len(targets)
        trained += len(targets)
        run.reporter.step(step - epoch.done, trained)
        # Only the batch of this step has been loaded yet: the random state resumes exactly at the next one.
        if look:
            checkpoint_if_preempted(run, epoch.index, step, sums)
            clock.looked()
    return sums, first_step_at


def checkpoint_if_preempted(run: WorkerRun, epoch: int, step: int, sums: torch.Tensor) -> None:
    """On the first preemption notice, a just-in-time checkpoint: this epoch's steps so far, resumable from the
    next one. All ranks ask together: get_preemption_info is a collective."""
    progress = run.progress
    if progress.noticed or ray.train.get_preemption_info() is None:
        return
    ranks = distributed.merge_dicts({run.worker.rank: {"sums": sums.tolist(), "rng": torch.get_rng_state()}})
    progress.noticed = True  # in this checkpoint, and the next ones: a restart is the preemption's
    saved = RunState(**{**vars(progress), "epoch": epoch, "step": step, "ranks": ranks})
    run.reporter.line(f"preemption notice: saving a checkpoint at epoch {epoch + 1} step {step}")
    report({"epoch": epoch, "step": step, "val_acc": -1.0},  # never the best
           checkpoint_state(run.trainee, run.job.config, saved, None), run.worker)


@torch.no_grad()
def evaluate(run: WorkerRun, loader: DataLoader) -> tuple[torch.Tensor, np.ndarray, list, HeldOut]:
    """Over this worker's share of val (up to train.max_steps_per_epoch batches): for the images outside the
    calibration share, sums of (loss, correct, count), the confusion matrix, and a few (key, true, predicted)
    examples for the prediction grid (misclassified ones first, then correct ones of every class); for those in
    it, their top-1 scores (HeldOut), which never choose the best epoch."""
    worker, classes, cfg = run.worker, run.trainee.classes, run.job.config
    run.model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=worker.device)  # on the device, as in train_one_epoch
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    held = HeldOut.empty(classes)
    wrong, right, per_class = [], {}, -(-GRID // len(classes))
    for _, images, targets, keys, _ in worker.batches(loader, "val", limit=cfg.train.max_steps_per_epoch):
        with worker.autocast():
            logits = run.model(images).float()
        kept = ~calibration_share(keys, cfg.data.calibration_fraction, cfg.train.seed)
        scores, preds = logits.softmax(1).max(1)
        truth, predicted, scores = targets.cpu().numpy(), preds.cpu().numpy(), scores.cpu().numpy()
        held = held.add(predicted[~kept], scores[~kept], truth[~kept])
        mask = torch.from_numpy(kept).to(worker.device)
        sums[0] += run.criterion(logits[mask], targets[mask])
        sums[1] += (preds[mask] == targets[mask]).sum()
        sums[2] += int(kept.sum())
        confusion += confusion_matrix(truth[kept], predicted[kept], len(classes))
        for key, true, pred in zip(np.array(keys)[kept].tolist(), truth[kept].tolist(), predicted[kept].tolist()):
            shown, room = (wrong, GRID // 2) if true != pred else (right.setdefault(true, []), per_class)
            if len(shown) < room:
                shown.append((key, true, pred))
    return sums, confusion, wrong + [e for examples in right.values() for e in examples], held


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


def val_over_workers(confusion: np.ndarray, examples: list, held: HeldOut, cfg: Config, rank: int) -> dict:
    """What a checkpoint keeps of the epoch's val, over all workers: the confusion matrix, the grid's examples,
    and the calibration share's held-out histograms (calibration.HeldOut.as_dict, with the share's fraction and
    seed), which `imgjobs label --target-precision` sets its thresholds from."""
    val = {"confusion": distributed.sum_over_workers(torch.from_numpy(confusion)),
           "examples": [e for part in distributed.merge_dicts({rank: examples}).values() for e in part],
           "calibration": None}
    if cfg.data.calibration_fraction:
        right, wrong = (np.array(distributed.sum_over_workers(torch.from_numpy(h)), dtype=np.int64)
                        for h in (held.right, held.wrong))
        val["calibration"] = HeldOut(held.classes, right, wrong).as_dict() | {
            "fraction": cfg.data.calibration_fraction, "seed": cfg.train.seed, "images": int(right.sum() + wrong.sum())}
    return val


def epoch_metrics(epoch: Epoch, train: list[float], val: list[float], trained_at: float, world: int,
                  nodes: int) -> dict:
    """An epoch's metrics from the sums over all workers; `trained_at`: the perf_counter() when training ended."""
    return {
        "epoch": epoch.index + 1,
        "train_loss": train[0] / max(train[2], 1),
        "train_acc": train[1] / max(train[2], 1),
        "val_loss": val[0] / max(val[2], 1),
        "val_acc": val[1] / max(val[2], 1),
        "lr": epoch.lr,
        "epoch_seconds": time.perf_counter() - epoch.started,
        "images_per_s": train[2] / (trained_at - epoch.started),
        "train_images": int(train[2]),
        "val_images": int(val[2]),
        "world_size": world,
        "nodes": nodes,
    }


def epoch_line(m: dict, epochs: int) -> str:
    return (
        f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
        f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}  lr {m['lr']:.2g}  "
        f"{m['epoch_seconds']:.1f}s  {m['images_per_s']:.1f} img/s"
    )
