"""`imgjobs train -c CONFIG [key.sub=value ...]`: data-parallel fine-tuning with Ray Train.

Everything the user can get wrong is checked before training starts: the config and paths before torch and Ray
load, the model while Ray starts (pipeline.train.job). The last line names the run's folder and the labeling
command for its best checkpoint.
"""

from __future__ import annotations

import sys

from pipeline.console import printable


def add_arguments(parser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--fresh", action="store_true",
                        help="start the run over instead of resuming it; the earlier run is moved aside, not deleted")


def add_config_arguments(parser) -> None:
    """A training config and its overrides: imgjobs train's and imgjobs audit's."""
    parser.add_argument("-c", "--config", required=True, help="YAML config, e.g. configs/train.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, values parsed as YAML")


def checked_config(args):
    """(Config, TrainingData): the config and the paths checked before torch and Ray load, which takes seconds."""
    from pipeline.train.config import check_weights_file, load_config
    from pipeline.train.data import scan

    cfg = load_config(args.config, args.overrides)
    dataset = scan(cfg.data)
    check_weights_file(cfg.model.weights)
    return cfg, dataset


def run(args) -> int:
    cfg, dataset = checked_config(args)
    from pipeline.train.job import TrainingFailed, train

    try:
        train(cfg, dataset, started_at=args.started_at, fresh=args.fresh)
    except TrainingFailed as e:
        print(f"imgjobs train: error: training failed: {printable(str(e))}", file=sys.stderr)
        return 1
    return 0
