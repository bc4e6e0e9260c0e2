"""`imgjobs label`: list inputs, stream them through Ray Data into the checkpoint's model, write Parquet once."""

from __future__ import annotations

import io
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray
import torch

from pipeline import checkpoint, storage
from pipeline.cluster import init_ray
from pipeline.errors import UsageError
from pipeline.label_output import SUMMARY, LabelWriter
from pipeline.predictor import DTYPES, Predictor, example_batch
from pipeline.preprocess import make_unit, read_units
from pipeline.reports import confusion_matrix
from pipeline.sources import MEMBER_SEPARATOR, list_inputs

PROGRESS_EVERY_S = 5.0
# Images per model call. On CPU, small batches keep ResNet activations in cache: batch 8 runs 1.1x faster
# than 32 (2-core EPYC, fp32, oneDNN-fused TorchScript). A GPU needs big ones to stay busy.
CPU_BATCH, GPU_BATCH = 8, 256
# A read task is one decoding thread that also waits on storage. Its reservation must differ from the
# predictor's, or Ray Data fuses reading into the predictor actors and decoding stops running in parallel.
READ_CPUS = 0.5


@dataclass
class LabelOptions:
    checkpoint: str
    inputs: list[str]
    output: str
    top_k: int | None = None
    min_confidence: float = 0.0
    precision: str = "fp32"
    fast_decode: bool = False
    rows_per_file: int = 100_000
    batch_size: int | None = None
    overwrite: bool = False
    evaluate: bool = False


def label(opts: LabelOptions, started_at: float | None = None, log=print) -> dict:
    """Run the job and return the summary it writes to OUTPUT/_summary.json. User mistakes raise UsageError
    before any work starts. `started_at` (time.time() at command start) is where start-up is counted from."""
    started = started_at or time.time()
    opts.checkpoint = best_checkpoint(opts.checkpoint)
    state = checkpoint.load(opts.checkpoint)
    classes = state["classes"]
    top_k = min(5, len(classes)) if opts.top_k is None else opts.top_k
    if not 1 <= top_k <= len(classes):
        raise UsageError(f"--top-k {top_k} must be between 1 and the checkpoint's {len(classes)} classes")
    model = _build_model(state)
    listing = list_inputs(opts.inputs)
    if opts.evaluate:
        _check_class_folders(listing.roots, classes)
    writer = LabelWriter(opts.output, opts.rows_per_file, opts.overwrite)
    todo = [key for key in listing.files if key not in writer.done]
    archive_done = _done_members(writer.done, listing.archives)
    skipped = len(listing.files) - len(todo) + sum(map(len, archive_done.values()))
    log(f"label: {len(listing.files)} image files and {len(listing.archives)} archives listed in "
        f"{time.time() - started:.1f}s; {skipped} already in {opts.output}")

    progress = Progress(log, len(todo))
    if todo or listing.archives:
        init_ray()
        plan = actor_plan(opts.batch_size)
        payload = model_payload(state, model, opts.precision, gpu=plan["num_gpus"] > 0)
        dataset = _dataset(opts, plan, payload, todo, archive_done, top_k)
        for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
            progress.add(writer.add(table), started)
    writer.close()
    end = time.perf_counter()
    seconds = end - progress.started
    done_now = progress.labeled + progress.errors
    steady_rows, steady_s = done_now - progress.first_batch[1], end - progress.first_batch[0]
    summary = {
        "total": done_now + skipped,
        "labeled": progress.labeled,
        "errors": progress.errors,
        "skipped_existing": skipped,
        "seconds": round(seconds, 3),
        "images_per_s": round(done_now / seconds, 2) if done_now else 0.0,
        "startup_seconds": progress.startup_s,
        "images_per_s_after_startup": round(steady_rows / steady_s, 2) if progress.startup_s and steady_rows else None,
        "checkpoint": opts.checkpoint,
        "classes": classes,
        "precision": opts.precision,
        "fast_decode": opts.fast_decode,
        "top_k": top_k,
        "min_confidence": opts.min_confidence,
        "inputs": opts.inputs,
        "files_written": writer.files_written,
    }
    if opts.evaluate:
        summary.update(_evaluate(writer, listing.roots, classes))
    fs, base = storage.resolve(opts.output)
    storage.write_bytes(fs, f"{base}/{SUMMARY}", json.dumps(summary, indent=2).encode())
    return summary


def best_checkpoint(path: str) -> str:
    """A training run's folder (holding summary.json) stands for its best checkpoint."""
    fs, base = storage.resolve(path)
    summary = f"{base}/summary.json"
    if fs.get_file_info(f"{base}/{checkpoint.FILENAME}").type == pafs.FileType.NotFound and \
            fs.get_file_info(summary).type == pafs.FileType.File:
        return json.loads(storage.read_bytes(fs, summary))["best_checkpoint"]
    return path


def _dataset(opts: LabelOptions, plan: dict, payload: dict, todo: list[str], archive_done: dict[str, list[str]],
             top_k: int):
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the job prints its own images/s line; Ray's notices about it are noise
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)
    units = [make_unit(files=files) for files in split_files(todo, plan["batch_size"])]
    units += [make_unit(archive=a, done=keys) for a, keys in archive_done.items()]
    model = payload["model"]
    return (
        ray.data.from_items(units, override_num_blocks=len(units))
        .map_batches(
            read_units,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=READ_CPUS,
            fn_kwargs={"resize_size": model["resize_size"], "input_size": model["input_size"], "fast_decode": opts.fast_decode},
        )
        .map_batches(
            Predictor,
            batch_size=plan["batch_size"],
            batch_format="numpy",
            fn_constructor_kwargs={
                "payload_ref": [ray.put(payload)],
                "top_k": top_k,
                "min_confidence": opts.min_confidence,
                "threads": plan["threads"],
                "batch_size": plan["batch_size"],
            },
            compute=ray.data.ActorPoolStrategy(size=plan["actors"]),
            num_cpus=plan["num_cpus"],
            num_gpus=plan["num_gpus"],
        )
    )


def _build_model(state: dict) -> torch.nn.Module:
    try:
        return checkpoint.build_from(state)
    except RuntimeError as e:  # the weights do not fit the architecture the checkpoint names
        raise UsageError(f"checkpoint weights do not fit model.arch {state['model']['arch']!r} "
                         f"({str(e).splitlines()[0]}); pass a checkpoint written by imgjobs train") from None


def model_payload(state: dict, model: torch.nn.Module, precision: str, gpu: bool) -> dict:
    """What the predictors need of a checkpoint, built once here and put once in the object store.

    GPU predictors build the model from its weights. CPU predictors get it as TorchScript instead: traced in
    channels_last (oneDNN's fastest layout), frozen (BatchNorm folded into the convolutions), with bf16 weights
    for bf16. They load it with torch alone, without torchvision or timm, which saves each actor seconds."""
    payload = {"classes": state["classes"], "model": state["model"], "precision": precision,
               "device": "cuda" if gpu else "cpu"}
    if gpu:
        return payload | {"model_state": state["model_state"]}
    model = model.to(DTYPES[precision], memory_format=torch.channels_last)
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, yet still the fastest on CPU
        buffer = io.BytesIO()
        example = example_batch(1, state["model"]["input_size"], DTYPES[precision])
        torch.jit.save(torch.jit.freeze(torch.jit.trace(model, example)), buffer)
    return payload | {"torchscript": buffer.getvalue()}


def actor_plan(batch_size: int | None) -> dict:
    """How many predictor actors, with what resources. A GPU each where there are GPUs. On CPUs, an actor
    reserves half a CPU less than its threads use, so a read task always finds room: a pool that reserves
    every CPU starves the read tasks and the pipeline stalls forever (seen on 2 CPUs)."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return {"actors": gpus, "num_gpus": 1, "num_cpus": 1, "threads": 2, "batch_size": batch_size or GPU_BATCH}
    node_cpus = min(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU"))
    threads = int(min(4, node_cpus))  # intra-op scaling flattens beyond ~4 threads at CPU batch sizes
    return {
        "actors": max(1, int(resources["CPU"]) // (threads + 1)),
        "num_gpus": 0,
        "num_cpus": threads - READ_CPUS,
        "threads": threads,
        "batch_size": batch_size or CPU_BATCH,
    }


def split_files(files: list[str], batch_size: int) -> list[list[str]]:
    """Files per read task: first a model batch's worth, so labels start to flow at once, then doubling up to
    about four tasks per CPU (8 to 256 files each), so reads spread over the cluster at little per-task cost."""
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    largest = max(8, min(256, math.ceil(len(files) / (4 * cpus))))
    parts, start, size = [], 0, min(batch_size, largest)
    while start < len(files):
        parts.append(files[start : start + size])
        start, size = start + size, min(2 * size, largest)
    return parts


def _done_members(done: set[str], archives: list[str]) -> dict[str, list[str]]:
    """For each archive, the keys of it (members, or its own error row) that the output already holds.
    One pass over `done`; a member key is ARCHIVE!MEMBER, and either part may itself contain a '!'."""
    by_archive = {a: [a] if a in done else [] for a in archives}
    for key in done:
        cut = key.find(MEMBER_SEPARATOR)
        while cut >= 0:
            if key[:cut] in by_archive:
                by_archive[key[:cut]].append(key)
                break
            cut = key.find(MEMBER_SEPARATOR, cut + 1)
    return by_archive


class Progress:
    """Counts rows and prints an images/s line every few seconds."""

    def __init__(self, log, listed: int):
        self.log, self.listed = log, listed
        self.started = self.last = time.perf_counter()
        self.labeled = self.errors = self.last_done = 0
        self.startup_s = None  # command start to first labeled batch
        self.first_batch = (0.0, 0)  # (time, rows) at the first batch: throughput after start-up counts from here

    def add(self, table, job_started_at: float) -> None:
        errors = table.num_rows - table.column("error").null_count
        self.errors += errors
        self.labeled += table.num_rows - errors
        now, done = time.perf_counter(), self.labeled + self.errors
        if self.startup_s is None:
            self.startup_s = round(time.time() - job_started_at, 2)
            self.first_batch = (now, done)
            self.last, self.last_done = now, done
            self.log(f"label: first labeled batch after {self.startup_s:.1f}s")
        if now - self.last >= PROGRESS_EVERY_S:
            of = f" of {self.listed} files" if self.listed else ""
            rate = (done - self.last_done) / (now - self.last)  # recent, not since start: start-up would drag it down
            self.log(f"label: {done}{of} done ({self.errors} errors), {rate:.1f} images/s")
            self.last, self.last_done = now, done


def _check_class_folders(roots: list[str], classes: list[str]) -> None:
    if not roots:
        raise UsageError("--evaluate needs a directory input with one folder per class, e.g. data/hymenoptera/val")
    for root in roots:
        fs, base = storage.resolve(root)
        folders = {
            e.base_name for e in fs.get_file_info(pafs.FileSelector(base))
            if e.type == pafs.FileType.Directory and not e.base_name.startswith(".")
        }
        if not folders or not folders <= set(classes):
            raise UsageError(
                f"--evaluate: {root} has folders {sorted(folders)}, not a subset of the checkpoint's classes {classes}"
            )


def _evaluate(writer: LabelWriter, roots: list[str], classes: list[str]) -> dict:
    """Accuracy and confusion matrix over every labeled image of the class-folder inputs in the output,
    earlier runs' rows included, so a resumed job reports the whole collection."""
    rows = writer.read_all(["path", "label_index"])
    index = {name: i for i, name in enumerate(classes)}
    prefixes = [r.rstrip("/") + "/" for r in roots]
    targets, predictions, unlabeled = [], [], 0
    for path, predicted in zip(rows.column("path").to_pylist(), rows.column("label_index").to_pylist()):
        prefix = next((p for p in prefixes if path.startswith(p)), None)
        folder, _, rest = path[len(prefix):].partition("/") if prefix else (None, "", "")
        if folder not in index or not rest:  # not inside a class folder of an evaluated tree
            continue
        if predicted is None:
            unlabeled += 1
            continue
        targets.append(index[folder])
        predictions.append(predicted)
    correct = sum(t == p for t, p in zip(targets, predictions))
    return {
        "accuracy": round(correct / len(targets), 4) if targets else None,
        "evaluated": len(targets),
        "evaluated_errors": unlabeled,
        "confusion_matrix": confusion_matrix(targets, predictions, len(classes)),
    }
