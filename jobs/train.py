"""`imgjobs train -c CONFIG [key.sub=value ...]`: data-parallel fine-tuning with Ray Train.

Everything the user can get wrong is checked before Ray starts; the last line printed is the run directory.
"""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("-c", "--config", required=True, help="YAML config, e.g. configs/train.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, values parsed as YAML")


def run(args) -> int:
    from pipeline.train.config import load_config
    from pipeline.train.job import TrainingFailed, train

    cfg = load_config(args.config, args.overrides)
    try:
        summary = train(cfg, started_at=args.started_at)
    except TrainingFailed as e:
        print(f"imgjobs train: error: training failed: {e}", file=sys.stderr)
        return 1
    print(summary["run_dir"])
    return 0
