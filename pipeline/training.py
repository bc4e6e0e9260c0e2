"""The per-worker training loop that Ray Train runs on every worker (data-parallel, DDP).

Each epoch: train on this worker's shard, evaluate this worker's share of val, sum the counts over
all workers, then rank 0 writes a checkpoint and every worker calls `ray.train.report`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from pipeline import checkpoint
from pipeline.config import Config
from pipeline.data import ImageDataset, Split, collate_skipping
from pipeline.models import build_model, configure_trainable, normalization, set_train_mode
from pipeline.transforms import CROP_SIZE, RESIZE_SIZE, eval_transform, train_transform


def train_loop_per_worker(job: dict) -> None:
    cfg = Config.model_validate(job["config"])
    classes = job["classes"]
    train_split, val_split = Split(**job["train"]), Split(**job["val"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(cfg.train.seed)  # the same new head on every worker
    if not on_gpu:
        # Ray pins each CPU worker to one thread; give each worker its share of the node's cores instead.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))

    model, head = build_model(cfg.model.arch, len(classes), cfg.model.weights)
    configure_trainable(model, head, cfg.model.mode, cfg.model.trainable)
    channels_last = cfg.train.channels_last and on_gpu
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    ddp_model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, momentum=cfg.train.momentum
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.train.step_size, gamma=cfg.train.gamma)
    criterion = nn.CrossEntropyLoss(reduction="sum")
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp) if on_gpu else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype is torch.float16)

    state = _restore(model, optimizer, scheduler, scaler)
    mean, std = normalization(cfg.model.arch)
    train_set = ImageDataset(cfg.data.root, train_split, train_transform(mean, std))
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=cfg.train.seed)
    # Val is split without padding, so every val image is counted exactly once across workers.
    val_set = ImageDataset(cfg.data.root, val_split, eval_transform(mean, std), indices=range(rank, len(val_split), world))
    loader_args = dict(
        batch_size=cfg.train.batch_size,
        num_workers=cfg.train.num_data_workers,
        collate_fn=collate_skipping,
        pin_memory=on_gpu,
    )
    train_loader = DataLoader(train_set, sampler=sampler, drop_last=False, **loader_args)
    val_loader = DataLoader(val_set, shuffle=False, **loader_args)

    def autocast():
        return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()

    def batches(loader):
        """Batches on the device; files that did not decode are recorded and left out."""
        for images, targets, indices, skipped in loader:
            state["skipped"].update(skipped)
            if images is None:
                continue
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, targets.to(device, non_blocking=True), indices

    start_epoch = state["epoch"]
    for epoch in range(start_epoch, cfg.train.epochs):
        sampler.set_epoch(epoch)  # a new shuffle, and so a new shard, every epoch
        # Seeding per epoch (loader workers are re-forked each epoch) makes a resumed run match an unbroken one.
        torch.manual_seed(cfg.train.seed * 1_000_000 + epoch * 1000 + rank)
        lr = optimizer.param_groups[0]["lr"]
        start = time.perf_counter()
        set_train_mode(ddp_model)
        train_sums = torch.zeros(3, dtype=torch.float64)  # loss, correct, count
        startup_seconds = None
        for images, targets, _ in batches(train_loader):
            if startup_seconds is None and epoch == start_epoch:
                startup_seconds = time.time() - job["started_at"]  # command start to first training step
            with autocast():
                logits = ddp_model(images)
                loss = criterion(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss / len(targets)).backward()
            scaler.step(optimizer)
            scaler.update()
            train_sums += torch.tensor([loss.item(), (logits.argmax(1) == targets).sum().item(), len(targets)])
        train_seconds = time.perf_counter() - start
        scheduler.step()

        ddp_model.eval()
        val_sums = torch.zeros(3, dtype=torch.float64)
        predictions = {}
        with torch.no_grad():
            for images, targets, indices in batches(val_loader):
                with autocast():
                    logits = ddp_model(images)
                preds = logits.argmax(1)
                val_sums += torch.tensor([criterion(logits.float(), targets).item(), (preds == targets).sum().item(), len(targets)])
                predictions.update(zip(indices.tolist(), preds.tolist()))

        train_sums, val_sums = _sum_over_workers(train_sums), _sum_over_workers(val_sums)
        predictions, skipped = _gather_dicts(predictions), _gather_dicts(state["skipped"])
        new_skips = sorted(set(skipped) - set(state["skipped_reported"]))
        state["skipped"] = skipped
        state["skipped_reported"] = sorted(skipped)
        epoch_seconds = time.perf_counter() - start
        metrics = {
            "epoch": epoch + 1,
            "train_loss": train_sums[0] / max(train_sums[2], 1),
            "train_acc": train_sums[1] / max(train_sums[2], 1),
            "val_loss": val_sums[0] / max(val_sums[2], 1),
            "val_acc": val_sums[1] / max(val_sums[2], 1),
            "lr": lr,
            "epoch_seconds": epoch_seconds,
            "images_per_s": train_sums[2] / train_seconds,
            "train_images": int(train_sums[2]),
            "val_images": int(val_sums[2]),
            "world_size": world,
        }
        if startup_seconds is not None:
            metrics["startup_seconds"] = startup_seconds
        # Ties go to the later epoch, as Ray's CheckpointConfig keeps the later of equal-scored checkpoints.
        if metrics["val_acc"] >= state["best_val_acc"]:
            state["best_val_acc"], state["best_epoch"] = metrics["val_acc"], epoch + 1
        state["history"].append(metrics)
        state["epoch"] = epoch + 1

        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                for path in new_skips:
                    print(f"warning: skipped {path}: {skipped[path]}", flush=True)
                print(_progress_line(metrics, cfg.train.epochs), flush=True)
                checkpoint.save(
                    {
                        "model": {
                            "arch": cfg.model.arch,
                            "head": head,
                            "mean": list(mean),
                            "std": list(std),
                            "resize_size": RESIZE_SIZE,
                            "input_size": CROP_SIZE,
                        },
                        "classes": classes,
                        "model_state": model.state_dict(),
                        "config": job["config"],
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "val_predictions": [predictions.get(i, -1) for i in range(len(val_split))],
                        **{k: state[k] for k in ("epoch", "best_val_acc", "best_epoch", "history", "skipped")},
                    },
                    tmp,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)


def _restore(model, optimizer, scheduler, scaler) -> dict:
    """Continue from the latest checkpoint after a worker failure or a re-run of the same job."""
    state = {"epoch": 0, "best_val_acc": 0.0, "best_epoch": 0, "history": [], "skipped": {}, "skipped_reported": []}
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return state
    with ckpt.as_directory() as directory:
        saved = checkpoint.load(directory)
    model.load_state_dict(saved["model_state"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    for key in ("epoch", "best_val_acc", "best_epoch", "history", "skipped"):
        state[key] = saved[key]
    state["skipped_reported"] = sorted(saved["skipped"])
    if ray.train.get_context().get_world_rank() == 0:
        print(f"resuming after epoch {state['epoch']} (best val acc {state['best_val_acc']:.4f})", flush=True)
    return state


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _sum_over_workers(sums: torch.Tensor) -> list[float]:
    if _distributed():
        # float64 on the CPU works with gloo; NCCL needs the tensor on the GPU.
        device = ray.train.torch.get_device()
        sums = sums.to(device)
        dist.all_reduce(sums)
    return sums.cpu().tolist()


def _gather_dicts(d: dict) -> dict:
    if not _distributed():
        return dict(d)
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, d)
    merged = {}
    for part in parts:
        merged.update(part)
    return merged


def _progress_line(m: dict, epochs: int) -> str:
    return (
        f"epoch {m['epoch']}/{epochs}  train loss {m['train_loss']:.4f} acc {m['train_acc']:.4f}  "
        f"val loss {m['val_loss']:.4f} acc {m['val_acc']:.4f}  lr {m['lr']:.2g}  "
        f"{m['epoch_seconds']:.1f}s  {m['images_per_s']:.1f} img/s"
    )
