"""`imgjobs audit`: which training labels are likely wrong (pipeline.audit.confident_learning), from K-fold
out-of-fold probabilities. The folds split train and val together, stratified by the given label and seeded by
train.seed. Each fold's probabilities come from (audit.method):

- linear: a linear head fitted on the other folds' frozen features. The features of every part of train and val
  are extracted first (Ray tasks, in parallel where the cluster has room), then each fold's head is fitted (Ray
  tasks); pipeline.audit.features.
- train: the config's own training on the other folds, one imgjobs train run per fold; pipeline.audit.trained_folds.

Either way a killed audit's rerun skips what a run finished: feature parts, fold runs and fold files are each
written once. Then the labels are ranked and the Parquet, _summary.json and _report.html written
(pipeline.formats.audit_file).
"""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from pipeline import cluster, storage
from pipeline.audit import features as work
from pipeline.audit import trained_folds
from pipeline.audit.confident_learning import Audit, find_label_issues, stratified_folds
from pipeline.audit.place import Place
from pipeline.audit.report import write_report
from pipeline.console import Console
from pipeline.errors import UsageError
from pipeline.formats import audit_file
from pipeline.train import rerun
from pipeline.train.config import Config
from pipeline.train.splits import SPLITS, TrainingData

# Keys an audit may be rerun with, changed, by method: none of them changes a feature or a probability (linear),
# or they are those a training run may continue with (train).
CONTINUABLE = {"linear": {"audit.batch_size", "data.max_unreadable", "data.shuffle_buffer"},
               "train": {"audit.batch_size", "audit.part_images", *rerun.CONTINUABLE}}


def audit(cfg: Config, data: TrainingData, started_at: float, console: Console | None = None) -> str:
    """Audit the labels of `data` into <storage.path>/<name>/audit; returns that folder."""
    console = console or Console()
    line = console.line
    images = len(data.train) + len(data.val)
    if images < cfg.audit.folds:
        raise UsageError(f"audit.folds {cfg.audit.folds} is more than the {images} images of {data.root}; lower it "
                         "(each fold needs images to predict)")
    if cfg.audit.method == "train":
        trained_folds.check(data)
    place = Place.of(storage.join(cfg.storage.path, cfg.name, "audit"))
    check_rerun(place, cfg)
    if cfg.audit.method == "train":
        line(f"audit: {len(data.train)} train and {len(data.val)} val images, {cfg.audit.folds} folds, each trained "
             f"with this config ({cfg.model.arch}, {cfg.train.epochs} epochs)")
        rows, probs = trained_folds.out_of_fold(place, cfg, data, started_at, console)
    else:
        rows, probs = linear_heads(place, cfg, data, line)
    usable = pc.is_null(rows["error"]).to_numpy(zero_copy_only=False)
    found = find_label_issues(rows["target"].to_numpy()[usable], probs[usable])
    table = output_table(rows, usable, found, data.classes)
    pq.write_table(table, place.file(audit_file.FILE), filesystem=place.fs)
    summary = summarize(cfg, data, table, found, time.time() - started_at)
    storage.write_bytes(place.fs, place.file(audit_file.SUMMARY), json.dumps(summary, indent=2).encode())
    write_report(place, data.root, table, summary, line)
    return place.path


def linear_heads(place: Place, cfg: Config, data: TrainingData, line) -> tuple[pa.Table, np.ndarray]:
    """(rows: path, target, error, split, feature; their out-of-fold probabilities, NaN for the rows without
    features), from linear heads on frozen features."""
    cluster.init_ray()
    model, spec = work.feature_model(cfg, data.classes)
    line(f"audit: {len(data.train)} train and {len(data.val)} val images, {cfg.audit.folds} folds, features of "
         f"{spec.arch} ({cfg.audit.checkpoint or 'model.weights ' + cfg.model.weights})")
    extract_features(place, cfg, data, model, spec, line)
    rows = read_features(place)
    usable = pc.is_null(rows["error"]).to_numpy(zero_copy_only=False)
    targets = rows["target"].to_numpy()
    fold_of = np.full(len(rows), -1, dtype=np.int16)
    fold_of[usable] = stratified_folds(targets[usable], cfg.audit.folds, cfg.train.seed)
    return rows, out_of_fold(place, cfg, rows, fold_of, len(data.classes), line)


def check_rerun(place: Place, cfg: Config) -> None:
    """Refuse a rerun with a config that would change the audit (a one-line diff); record the config."""
    now = cfg.model_dump(mode="json")
    try:
        before = json.loads(storage.read_bytes(place.fs, place.file(audit_file.CONFIG)))
    except FileNotFoundError:
        before = None
    except OSError as e:  # the first access to storage.path
        raise UsageError(f"storage.path {cfg.storage.path} cannot be read: {str(e).splitlines()[0]}") from None
    if before is not None:
        changed = {key: change for key, change in rerun.diff(defining(before), defining(now)).items()
                   if key not in CONTINUABLE[cfg.audit.method]}
        if changed:
            raise UsageError(f"audit {place.path} was started with another config ({rerun.listed(changed)}); rerun "
                             "with its config to resume it, or pick another name")
    storage.write_bytes(place.fs, place.file(audit_file.CONFIG), json.dumps(now, indent=2).encode())


def defining(config: dict) -> dict:
    """The parts of a config that decide an audit's result: the data, the model, the audit and the fold seed; and
    for the train method, the whole recipe and its workers."""
    if config["audit"].get("method", "linear") == "train":
        return {key: config.get(key) for key in ("data", "model", "audit", "train", "scaling")}
    return {**{key: config.get(key) for key in ("data", "model", "audit")}, "seed": config["train"]["seed"]}


def extract_features(place: Place, cfg: Config, data: TrainingData, model, spec, line) -> None:
    """One Ray task per part of each split whose features file is not there yet."""
    todo = [part for part in parts(cfg, data) if not place.exists(features_name(part))]
    if not todo:
        return
    use_gpu = cluster.use_gpus(cfg.scaling.use_gpu, line, "audit")
    task = work.extract_part.options(num_gpus=1 if use_gpu else 0)
    model_ref, data_ref = ray.put(model), ray.put(data)
    pending = {task.remote(model_ref, spec, data_ref, part, cfg, place.uri(features_name(part))): part
               for part in todo}
    done, started = 0, time.time()
    while pending:
        [ready], _ = ray.wait(list(pending))
        done += ray.get(ready)
        split, index, count = pending.pop(ready)
        line(f"audit: features of {split} part {index + 1}/{count} written ({done} images, "
             f"{done / (time.time() - started):.1f} images/s)")


def parts(cfg: Config, data: TrainingData) -> list[tuple[str, int, int]]:
    """(split, index, parts) of every part: audit.part_images images each, or fewer."""
    counts = {split: max(1, math.ceil(len(getattr(data, split)) / cfg.audit.part_images)) for split in SPLITS}
    return [(split, index, counts[split]) for split in SPLITS for index in range(counts[split])]


def features_name(part: tuple[str, int, int]) -> str:
    split, index, count = part
    return f"{audit_file.FEATURES}/{split}-{index:05d}-of-{count:05d}.parquet"


def read_features(place: Place) -> pa.Table:
    """Every part's rows, with their split, sorted by path: the order folds and fold files count rows in."""
    tables = []
    for entry in place.fs.get_file_info(pafs.FileSelector(place.file(audit_file.FEATURES))):
        if entry.base_name.endswith(".parquet"):
            table = pq.read_table(entry.path, filesystem=place.fs)
            split = entry.base_name.split("-", 1)[0]
            tables.append(table.append_column("split", pa.repeat(split, len(table))))
    rows = pa.concat_tables(tables)
    return rows.take(pc.sort_indices(rows, [("path", "ascending")]))


def out_of_fold(place: Place, cfg: Config, rows: pa.Table, folds: np.ndarray, classes: int, line) -> np.ndarray:
    """Every row's out-of-fold probabilities (NaN for rows without features): each fold's head fitted where its
    file is not there yet, every fold's file read back."""
    names = {fold: audit_file.fold_file(fold, cfg.audit.folds) for fold in range(cfg.audit.folds)}
    todo = [fold for fold, name in names.items() if not place.exists(name)]
    if todo:
        features = rows["feature"].combine_chunks().flatten().to_numpy().reshape(len(rows), -1)
        refs = [ray.put(features), ray.put(rows["target"].to_numpy()), ray.put(folds)]
        pending = {work.fit_fold.remote(*refs, fold, classes, place.uri(names[fold])): fold for fold in todo}
        while pending:
            [ready], _ = ray.wait(list(pending))
            fold = pending.pop(ready)
            line(f"audit: fold {fold + 1}/{cfg.audit.folds}: {np.sum(folds == fold)} images predicted by a head "
                 f"fitted on the other folds (C {ray.get(ready):g}, by {work.INNER_FOLDS}-fold log loss)")
    probs = np.full((len(rows), classes), np.nan, dtype=np.float32)
    for name in names.values():
        fold = pq.read_table(place.file(name), filesystem=place.fs)
        probs[fold["row"].to_numpy()] = fold["probs"].combine_chunks().flatten().to_numpy().reshape(-1, classes)
    return probs


def output_table(rows: pa.Table, usable: np.ndarray, found: Audit, classes: list[str]) -> pa.Table:
    """The audit's rows (pipeline.formats.audit_file.SCHEMA), in path order."""
    names = pa.array(classes)
    suggested = np.full(len(rows), -1)
    suggested[usable] = found.suggested
    confidence = np.full(len(rows), np.nan, dtype=np.float32)
    confidence[usable] = found.self_confidence
    suspect = np.zeros(len(rows), dtype=bool)
    suspect[usable] = found.suspect
    targets = rows["target"].to_numpy()
    return pa.table({
        "path": rows["path"],
        "split": rows["split"],
        "label": names.take(pa.array(targets, mask=targets < 0)),  # unknown: a shard that broke after indexing
        "suggested_label": names.take(pa.array(suggested, mask=~usable)),
        "self_confidence": pa.array(confidence, mask=~usable),
        "suspect": suspect,
        "error": rows["error"],
    }, schema=audit_file.SCHEMA)


def summarize(cfg: Config, data: TrainingData, table: pa.Table, found: Audit, seconds: float) -> dict:
    suspects = table.filter(pc.field("suspect"))
    by_class = pc.value_counts(suspects["label"]).to_pylist()
    return {
        "data_root": data.root,
        "classes": data.classes,
        "folds": cfg.audit.folds,
        "method": cfg.audit.method,
        "images": len(table),
        "unreadable": len(table) - table["error"].null_count,
        "suspects": len(suspects),
        "suspects_by_label": {entry["values"]: entry["counts"] for entry in by_class},
        "thresholds": dict(zip(data.classes, found.thresholds.round(4).tolist())),
        "confident_joint": found.joint.round(2).tolist(),
        "seconds": round(seconds, 1),
    }
