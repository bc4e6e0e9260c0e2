"""What running a name again does. Ray Train resumes a run from its folder's latest checkpoint, so a rerun
with another config would go on with the old weights, optimizer and schedule: it is refused, unless the change
is one a run can continue with (more epochs, or how failures and loading are handled). `--fresh` starts over,
after moving the earlier run aside, never deleting it.
"""

from __future__ import annotations

import json
import time

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError

CONFIG = "config.json"  # the config a run started with, written before Ray Train starts
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # what Ray Train resumes from
# Keys a continued run may change: none of them changes what an epoch computes.
CONTINUABLE = {"train.max_failures", "train.max_preemption_failures", "train.preemption_check_seconds",
               "train.num_data_workers", "data.max_unreadable",
               "tracking.mlflow_uri", "tracking.mlflow_experiment"}


def prepare(run_dir: str, config: dict, fresh: bool, log=print) -> None:
    """Check a rerun of `run_dir` against `config` (or move the earlier run aside with `fresh`), then record
    `config` as the run's."""
    fs, base = storage.resolve(run_dir)
    try:
        if fs.get_file_info(f"{base}/{RAY_SNAPSHOT}").type == pafs.FileType.File:
            if fresh:
                log(f"train: --fresh: moved the earlier run to {move_aside(fs, base, run_dir)}; delete it when it is "
                    "no longer needed")
            else:
                check_continuable(earlier_config(fs, base), config, run_dir)
        storage.write_bytes(fs, f"{base}/{CONFIG}", json.dumps(config, indent=2).encode())
    except OSError as e:  # the first access to storage.path: an unreachable or read-only store fails here
        raise UsageError(f"storage.path {config['storage']['path']} cannot be written: {str(e).splitlines()[0]}") \
            from None


def earlier_config(fs: pafs.FileSystem, base: str) -> dict | None:
    for name, key in ((CONFIG, None), ("summary.json", "config")):  # runs of imgjobs 0.1 kept it in summary.json
        try:
            saved = json.loads(storage.read_bytes(fs, f"{base}/{name}"))
        except FileNotFoundError:
            continue
        return saved[key] if key else saved
    return None


def check_continuable(before: dict | None, now: dict, run_dir: str) -> None:
    if before is None:
        return
    changed = {key: (old, new) for key, (old, new) in diff(before, now).items()
               if key not in CONTINUABLE and not key.startswith("audit.")}  # imgjobs audit's keys, not training's
    epochs = changed.get("train.epochs")
    if epochs and epochs[0] is not None and epochs[1] is not None and epochs[1] >= epochs[0]:
        del changed["train.epochs"]  # more epochs: the run goes on from where it stopped
    if changed:
        raise UsageError(f"run {run_dir} was started with another config ({listed(changed)}); rerun with its config to "
                         "resume it, pick another name, or pass --fresh to start over (the earlier run is moved aside)")


def listed(changed: dict[str, tuple]) -> str:
    """A diff's changes on one line: `key: before -> now, ...`."""
    return ", ".join(f"{key}: {json.dumps(old)} -> {json.dumps(new)}" for key, (old, new) in sorted(changed.items()))


def diff(before: dict, now: dict, prefix: str = "") -> dict[str, tuple]:
    """Dotted keys whose values differ, with (before, now); a key the run's config lacks is left out, and one
    the new config lacks is None there."""
    changes = {}
    for key in sorted(set(before) | set(now)):
        if key not in before:  # a key this imgjobs added since the run started: the run had its default
            continue
        old, new = before[key], now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changes |= diff(old, new, f"{prefix}{key}.")
        elif old != new:
            changes[f"{prefix}{key}"] = (old, new)
    return changes


def move_aside(fs: pafs.FileSystem, base: str, run_dir: str) -> str:
    """Move every file of the run to <run>-replaced-<time>, one by one (object stores have no folder rename)."""
    suffix = f"-replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    for entry in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if entry.type == pafs.FileType.File:
            target = base + suffix + entry.path[len(base):]
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            fs.move(entry.path, target)
    fs.delete_dir(base)
    path, query = storage.split_query(run_dir)
    return path.rstrip("/") + suffix + query
