"""audit.method train: each fold's out-of-fold probabilities from the config's own training (imgjobs train's job:
Ray Train, its checkpoints and its resume) on the images of the other folds, which holds this fold out as its val
split; then the run's last checkpoint, not its best (chosen on this fold's given labels), predicts this fold.

Each run trains on scaling.num_workers workers. On a cluster of several machines the runs go side by side, as many
as its workers hold (runs_at_once); on one machine one after another, since runs there would share its cores or GPU.
A fold run lives in <audit>/_runs/fold-K-of-N: a killed audit's rerun resumes an unfinished run from its latest
checkpoint and keeps a finished one.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import torch

from pipeline import cluster, ray_internals, storage
from pipeline.audit.confident_learning import stratified_folds
from pipeline.audit.features import forward, output_columns, write_once
from pipeline.audit.place import Place
from pipeline.console import Console, Named
from pipeline.errors import UsageError
from pipeline.formats import audit_file, checkpoint
from pipeline.formats.model_spec import TrainedModel
from pipeline.models import from_checkpoint
from pipeline.train.config import Config, StorageConfig, TrackingConfig
from pipeline.train.dataset import Share
from pipeline.train.splits import SPLITS, Split, TrainingData


def check(data: TrainingData) -> None:
    """Only named images can be dealt into folds."""
    if not data.names_each_image():
        raise UsageError(f"audit.method train: the shard folders of {data.root} name no image one by one, so they "
                         "cannot be dealt into folds; use audit.method=linear")


def listing(data: TrainingData) -> pa.Table:
    """Every image of train and val, sorted by path: (path, target, split), the rows folds are dealt from."""
    tables = [pa.table({"path": split.key_array().cast(pa.string()), "target": split.targets,
                        "split": pa.repeat(name, len(split))})
              for name, split in ((name, getattr(data, name)) for name in SPLITS)]
    rows = pa.concat_tables(tables)
    return rows.take(pc.sort_indices(rows, [("path", "ascending")]))


def out_of_fold(place: Place, cfg: Config, data: TrainingData, started_at: float,
                console: Console) -> tuple[pa.Table, np.ndarray]:
    """(rows: path, target, split, error; their out-of-fold probabilities, NaN for the rows that did not read):
    each fold whose file is not there trained and predicted, every fold's file read back."""
    cluster.init_ray(training=True)
    rows = listing(data)
    paths, targets = rows["path"].combine_chunks(), rows["target"].to_numpy()
    folds = stratified_folds(targets, cfg.audit.folds, cfg.train.seed)
    names = [audit_file.fold_file(fold, cfg.audit.folds) for fold in range(cfg.audit.folds)]
    todo = [fold for fold, name in enumerate(names) if not place.exists(name)]
    use_gpu = cluster.use_gpus(cfg.scaling.use_gpu, console.line, "audit") if todo else False
    at_once = runs_at_once(cfg, use_gpu, len(todo))
    if at_once > 1:
        console.line(f"audit: {len(todo)} fold runs, {at_once} at a time on this cluster")

    def run_fold(fold: int) -> None:
        inside = folds == fold
        held_out = TrainingData(data.root, data.classes, *(Split.from_keys(paths.filter(part), targets[part])
                                                           for part in (~inside, inside)))
        latest = train_fold(place, cfg, held_out, fold, started_at, console if at_once == 1 else
                            Named(console, f"fold-{fold + 1}-of-{cfg.audit.folds}"))
        task = predict.options(num_gpus=1 if use_gpu else 0)
        written = ray.get(task.remote(latest, ray.put(held_out), cfg, place.uri(names[fold])))
        console.line(f"audit: fold {fold + 1}/{cfg.audit.folds}: {written} images predicted by {latest}")

    side_by_side(run_fold, todo, at_once)
    return joined(place, rows, names, len(data.classes))


def runs_at_once(cfg: Config, use_gpu: bool, runs: int) -> int:
    """How many fold runs go side by side: one on a single machine; on a cluster of several, as many as the
    workers of their kind (GPU or CPU) hold, those up now or, where more, those its autoscaler can add."""
    kind = "GPU" if use_gpu else "CPU"
    machines = [node["Resources"][kind] for node in ray.nodes() if node["Alive"] and node["Resources"].get(kind)]
    most = max(sum(machines), cluster.autoscaler_gpus() if use_gpu else
               ray_internals.autoscaler_max_resources().get(kind, 0))
    if len(machines) < 2 and most <= sum(machines):
        return 1
    return max(1, min(runs, int(most // cfg.scaling.num_workers)))


def side_by_side(work: Callable[[int], None], items: list[int], at_once: int) -> None:
    """work(item) for every item, up to `at_once` at a time, each on a thread: Ray Train's fit runs from a thread, as
    Tune's trials do. Daemon threads, so that an interrupted audit exits at once (its rerun resumes the runs). After
    an error no item starts; the first error is raised once the started ones have ended."""
    todo, errors = queue.SimpleQueue(), []
    for item in items:
        todo.put(item)

    def worker() -> None:
        while not errors:
            try:
                item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                work(item)
            except BaseException as e:  # raised in the calling thread, below
                errors.append(e)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(min(at_once, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def train_fold(place: Place, cfg: Config, held_out: TrainingData, fold: int, started_at: float,
               console: Console) -> str:
    """Train `cfg`'s recipe on the other folds (held_out.train), unless a finished run is there; its last
    checkpoint."""
    from pipeline.train.job import train  # torch and Ray Train

    run = cfg.model_copy(update={"name": f"fold-{fold + 1}-of-{cfg.audit.folds}", "tracking": TrackingConfig(),
                                 "storage": StorageConfig(path=place.uri(audit_file.RUNS))})
    fs, base = storage.resolve(storage.join(run.storage.path, run.name, "summary.json"))
    try:
        return json.loads(storage.read_bytes(fs, base))["latest_checkpoint"]
    except FileNotFoundError:
        return train(run, held_out, started_at, console=console)["latest_checkpoint"]


@ray.remote(num_cpus=1)
def predict(checkpoint_path: str, data: TrainingData, cfg: Config, path: str) -> int:
    """Write the softmax of `checkpoint_path`'s model over data.val to `path`: (path, probs, error), an image that
    does not read or decode with its error and no probabilities. Returns the rows written."""
    trained = TrainedModel.of(checkpoint.load(checkpoint_path))
    share = Share(0, 1, cfg.audit.batch_size, shuffle=False)
    keys, _, logits, errors = forward(from_checkpoint(trained), trained.spec, data, "val", share, cfg)
    width = len(data.classes)
    paths, probs, reasons = output_columns(keys, softmax(logits.reshape(-1, width)), errors, width, fill=np.nan)
    write_once(pa.table({"path": paths, "probs": probs, "error": reasons}), path)
    return len(paths)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Kept out of `predict`: cloudpickle, pickling a task by value, takes each name the task uses that a module
    global has as a submodule for one (`data.classes` beside `torch`: torch.classes, which cannot be pickled)."""
    return torch.from_numpy(logits).softmax(1).numpy()


def joined(place: Place, rows: pa.Table, names: list[str], classes: int) -> tuple[pa.Table, np.ndarray]:
    """The fold files' probabilities and errors, matched to `rows` by path."""
    found = pa.concat_tables(pq.read_table(place.file(name), filesystem=place.fs) for name in names)
    at = pc.index_in(rows["path"], value_set=found["path"])
    if at.null_count:  # the data changed since the folds were dealt
        raise UsageError(f"audit: {at.null_count} images of data.root have no prediction in {place.path}, which "
                         "they joined since it started; audit them under another name")
    probs = found["probs"].combine_chunks().flatten().to_numpy().reshape(-1, classes)[at.to_numpy()]
    return rows.append_column("error", found["error"].take(at)), probs
