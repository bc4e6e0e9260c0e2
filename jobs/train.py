"""`imgjobs train -c CONFIG [key.sub=value ...]`: data-parallel fine-tuning with Ray Train.

Everything the user can get wrong is checked before Ray starts; the last line printed is the run directory.
"""

from __future__ import annotations

import os

import ray.train
from ray.train.torch import TorchTrainer

from pipeline import checkpoint, storage
from pipeline.cluster import alive_nodes, gpus_available, init_ray
from pipeline.config import load_config
from pipeline.data import scan_image_folder
from pipeline.errors import UsageError
from pipeline.models import build_model, configure_trainable
from pipeline.reports import confusion_matrix, epoch_table, write_run_outputs
from pipeline.training import train_loop_per_worker


def add_arguments(parser) -> None:
    parser.add_argument("-c", "--config", required=True, help="YAML config, e.g. configs/train.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, values parsed as YAML")


def run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    dataset = scan_image_folder(cfg.data.root)
    # Build the model once here so a bad arch, weights file or trainable list fails before Ray starts.
    model, head = build_model(cfg.model.arch, len(dataset.classes), cfg.model.weights)
    configure_trainable(model, head, cfg.model.mode, cfg.model.trainable)
    del model
    storage_path = storage.absolute(cfg.storage.path)
    run_dir = storage.join(storage_path, cfg.name)
    print(f"{cfg.name}: {len(dataset.train)} train / {len(dataset.val)} val images, classes {dataset.classes}")

    init_ray()
    use_gpu = gpus_available() if cfg.scaling.use_gpu == "auto" else cfg.scaling.use_gpu
    nodes = alive_nodes()
    if not storage.is_uri(storage_path) and nodes > 1:
        raise UsageError(
            f"storage.path {cfg.storage.path} is local but the cluster has {nodes} nodes, so checkpoints "
            "would be scattered; set storage.path to shared storage (s3://bucket/runs, gs://..., or an NFS mount)"
        )
    job = {
        "config": cfg.model_dump(mode="json"),
        "classes": dataset.classes,
        "train": vars(dataset.train),
        "val": vars(dataset.val),
        "started_at": args.started_at,
    }
    job["config"]["data"]["root"] = storage.absolute(cfg.data.root)  # workers may start in another directory
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=cfg.name,
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Keeps the best checkpoint by val accuracy; Ray never deletes the latest one, which resume needs.
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=1, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
            ),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        print(f"imgjobs train: error: training failed: {str(e).strip().splitlines()[-1]}")
        return 1

    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: (cm[1]["val_acc"], -cm[1]["epoch"]))
    best_path = storage.join(run_dir, os.path.basename(best_ckpt.path), checkpoint.FILENAME)
    latest_path = storage.join(run_dir, os.path.basename(result.checkpoint.path), checkpoint.FILENAME)
    best, latest = checkpoint.load(best_path), checkpoint.load(latest_path)
    summary = {
        "name": cfg.name,
        "run_dir": run_dir,
        "best_val_acc": best_metrics["val_acc"],
        "best_epoch": best_metrics["epoch"],
        "best_checkpoint": best_path,
        "latest_checkpoint": latest_path,
        "classes": dataset.classes,
        "world_size": latest["history"][-1]["world_size"],
        "use_gpu": use_gpu,
        "skipped_files": len(latest["skipped"]),
        "skipped": latest["skipped"],
        "confusion_matrix": confusion_matrix(dataset.val.targets, best["val_predictions"], len(dataset.classes)),
        "epochs": latest["history"],
        "config": job["config"],
    }
    write_run_outputs(run_dir, summary, best, dataset)
    print(epoch_table(summary["epochs"]))
    print(f"best val acc {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}; "
          f"{summary['skipped_files']} unreadable file(s) skipped")
    print(run_dir)
    return 0
