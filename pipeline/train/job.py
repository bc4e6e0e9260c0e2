"""`imgjobs train`: check the model, run Ray Train, then write the run's outputs.

torch, torchvision and Ray Train load on a thread while Ray starts (train, check_model), so they are imported
where they are used, not here."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import ray

import pipeline
from pipeline import storage
from pipeline.cluster import init_ray, use_gpus
from pipeline.console import Console, timestamp
from pipeline.errors import UsageError
from pipeline.formats import checkpoint
from pipeline.ray_internals import worker_exceptions
from pipeline.train import rerun, shared_storage
from pipeline.train.config import Config
from pipeline.train.description import TrainingJob
from pipeline.train.progress import relay
from pipeline.train.splits import TrainingData


class TrainingFailed(Exception):
    """Ray Train gave up after its failure budget."""


def train(cfg: Config, dataset: TrainingData, started_at: float, fresh: bool = False,
          console: Console | None = None) -> dict:
    """Run the job on a checked config and data folder (config.load_config, data.scan_image_folder) and return
    the summary it writes to <storage.path>/<name>/summary.json. A rerun of the name resumes it when its config
    allows (rerun.prepare); `fresh` starts over."""
    console = console or Console()
    # Workers may start in another directory: data.root becomes absolute once, here, in the config the workers get
    # and the run records (config.json, checkpoints, summary.json); storage.path is recorded as given.
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": storage.absolute(cfg.data.root)})})
    storage_path = storage.absolute(cfg.storage.path)
    run_dir = storage.join(storage_path, cfg.name)
    # The model is built once to check it on a thread while Ray starts on this one (it must: Ray's processes end
    # with the thread that started them). Each takes seconds of imports and start-up, and on 2 CPUs they overlap.
    with ThreadPoolExecutor(1) as pool:
        checking = pool.submit(check_model, cfg, dataset.classes)
        connected = init_ray(training=True)
        try:
            checking.result()
            tracker = start_run(cfg, dataset, run_dir, fresh, console)
        except UsageError:  # found once Ray started: the Ray it started stops again; a mistake leaves nothing behind
            if connected:
                ray.shutdown()
            raise
    use_gpu = use_gpus(cfg.scaling.use_gpu, console.line, cfg.name)
    kind = "GPU" if use_gpu else "CPU"
    up = ray.cluster_resources().get(kind, 0)
    if up < cfg.scaling.num_workers:  # Ray Train asks for them and waits; the autoscaler adds nodes
        console.line(f"{cfg.name}: waiting for {cfg.scaling.num_workers} {kind}(s) for the training workers, "
                     f"{up:g} up now")
    job = TrainingJob(cfg, ray.put(dataset), started_at, shared_storage.write_marker(run_dir, cfg.storage.path))
    try:
        with relay(console, on_epoch=tracker.epoch if tracker else lambda metrics: None) as (events, stopped):
            result = fit(replace(job, events=events), storage_path, use_gpu)
        if stopped:
            raise TrainingFailed(stopped[0])
    except BaseException:
        if tracker:
            tracker.failed()
        raise
    summary = summarise(job, dataset, result, run_dir, use_gpu)
    if tracker:
        tracker.finish(summary)
    from pipeline.train.reports import epoch_table  # matplotlib, which the failure paths never need

    for row in epoch_table(summary["epochs"]).splitlines():  # a line each: line() escapes a newline
        console.line(row)
    console.line(f"best val acc {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}; "
                 f"{summary['skipped_files']} unreadable file(s) skipped")
    console.line(f"run in {run_dir}; label with it: imgjobs label --checkpoint {shlex.quote(run_dir)} --input IMAGES "
                 f"--output {shlex.quote(storage.join(run_dir, 'labels'))}")  # an S3 query string holds an &
    return summary


def start_run(cfg: Config, dataset: TrainingData, run_dir: str, fresh: bool, console: Console):
    """Record the run's config in `run_dir` (a rerun is checked against the earlier one, rerun.prepare) and open
    its MLflow run if it has one (its tracker, else None)."""
    console.line(f"{cfg.name}: {len(dataset.train)} train / {len(dataset.val)} val images, classes {dataset.classes}")
    config = cfg.model_dump(mode="json")
    rerun.prepare(run_dir, config, fresh, console.line)
    tracker = None
    if cfg.tracking.mlflow_uri:
        from pipeline.train.tracking import MlflowRun  # mlflow: seconds of imports, and an optional extra

        tracker = MlflowRun(cfg.tracking.mlflow_uri, cfg.tracking.mlflow_experiment, cfg.name, run_dir, config,
                            console.line)
    return tracker


def check_model(cfg: Config, classes: list[str]) -> None:
    """Build the model once: a bad arch, weights file, trainable list or head_from_imagenet fails here, before
    anything is written. It runs while Ray starts (train), and so do its imports: the job's heavy ones, fit's too."""
    from pipeline.train.loop import new_model  # torch, torchvision and Ray Train: fit's imports

    new_model(cfg, classes)


def fit(job: TrainingJob, storage_path: str, use_gpu: bool) -> ray.train.Result:
    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.train.loop import train_loop_per_worker

    cfg = job.config
    # Ray Train gets a URI's filesystem object and the path inside it, so query-string options (an S3 endpoint)
    # reach it and never land inside the paths it joins.
    filesystem, path = storage.resolve(storage_path) if storage.is_uri(storage_path) else (None, storage_path)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures,
                                                   max_preemption_failures=cfg.train.max_preemption_failures),
            # Keeps the best checkpoint by val accuracy; Ray never deletes the latest one, which resume needs.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
            ),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        for raised in worker_exceptions(e):
            if isinstance(raised, shared_storage.NotShared):  # the user's to fix: one line, exit 2
                raise raised from None
        raise TrainingFailed(str(e).strip().splitlines()[-1]) from None


def versions() -> dict:
    """What made the run: package versions, and the git commit of the code when it runs from a checkout."""
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.dirname(pipeline.__file__)),
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:  # no git here
        commit = None
    return {"imgjobs": pipeline.__version__, "torch": torch.__version__, "ray": ray.__version__,
            "python": platform.python_version(), "git_commit": commit}


def summarise(job: TrainingJob, dataset: TrainingData, result: ray.train.Result, run_dir: str, use_gpu: bool) -> dict:
    """summary.json, metrics.csv and the plots, from the best and the latest checkpoints."""
    from pipeline.train.reports import write_run_outputs  # matplotlib, as in train()

    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: (cm[1]["val_acc"], -cm[1]["epoch"]))
    best_path = storage.join(run_dir, os.path.basename(best_ckpt.path), checkpoint.FILENAME)
    latest_path = storage.join(run_dir, os.path.basename(result.checkpoint.path), checkpoint.FILENAME)
    best, latest = checkpoint.load(best_path), checkpoint.load(latest_path)
    summary = {
        "name": job.config.name,
        "run_dir": run_dir,
        "best_val_acc": best_metrics["val_acc"],
        "best_epoch": best_metrics["epoch"],
        "best_checkpoint": best_path,
        "latest_checkpoint": latest_path,
        "classes": dataset.classes,
        "world_size": latest["history"][-1]["world_size"],
        "nodes": latest["history"][-1]["nodes"],
        "use_gpu": use_gpu,
        "skipped_files": sum(map(len, latest["skipped"].values())),
        "skipped": {key: why for keys in latest["skipped"].values() for key, why in keys.items()},
        "confusion_matrix": best["val"]["confusion"],
        # The best checkpoint's calibration share of val: images held out for imgjobs label --target-precision.
        "calibration_images": (best["val"].get("calibration") or {}).get("images", 0),
        "epochs": latest["history"],
        "interruptions": latest["interruptions"],
        "config": job.config.model_dump(mode="json"),
        "started": timestamp(job.started_at),
        "ended": timestamp(time.time()),
        "versions": versions(),
    }
    write_run_outputs(run_dir, summary, best, dataset)
    return summary
