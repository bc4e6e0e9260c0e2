"""`imgjobs audit -c CONFIG [key.sub=value ...]`: find the training labels that are likely wrong.

The same config as `imgjobs train`: its data (folder trees, shard folders, labels tables), audit.folds and
train.seed for the folds, and audit.method for what predicts each: linear heads on its model's frozen features, or
its own training recipe. The output, <storage.path>/<name>/audit/, is a Parquet with a
row per image and a review page; `data.exclude=` that folder trains without its suspects. A killed audit, rerun,
redoes only the parts and folds it had not finished.
"""

from __future__ import annotations

import sys

from jobs.train import add_config_arguments, checked_config
from pipeline.console import printable


def add_arguments(parser) -> None:
    add_config_arguments(parser)


def run(args) -> int:
    cfg, data = checked_config(args)
    from ray.exceptions import RayTaskError

    from pipeline.audit.job import audit
    from pipeline.formats.audit_file import SUMMARY
    from pipeline.train.job import TrainingFailed

    try:
        folder = audit(cfg, data, started_at=args.started_at)
    except RayTaskError as e:
        print(f"imgjobs audit: error: a task failed: {printable(str(e.cause))}", file=sys.stderr)
        return 1
    except TrainingFailed as e:  # audit.method train
        print(f"imgjobs audit: error: a fold's training failed: {printable(str(e))}", file=sys.stderr)
        return 1
    print(f"audit: done; rows in {folder}, counts in {folder}/{SUMMARY}; train without the suspects with "
          f"data.exclude={folder}")
    return 0
