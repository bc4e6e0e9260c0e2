"""`imgjobs label`: list inputs, stream them through Ray Data into the checkpoint's model, write Parquet once.

`label` reads top to bottom: load the checkpoint, list the inputs and what the output already holds, plan
the actors, stream the rest through them into the writer, then summarise.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import pyarrow.fs as pafs
import ray

from pipeline import storage
from pipeline.cluster import init_ray
from pipeline.errors import UsageError
from pipeline.label.evaluate import check_class_folders, evaluate
from pipeline.label.output import SUMMARY, LabelWriter
from pipeline.label.plan import actor_plan, model_payload, split_files
from pipeline.label.predictor import Predictor
from pipeline.label.reading import make_unit, read_units
from pipeline.label.sources import MEMBER_SEPARATOR, Listing, list_inputs
from pipeline.train import checkpoint

PROGRESS_EVERY_S = 5.0


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


@dataclass
class Work:
    """What this run labels: the files and archives not yet in the output, minus done archive members."""

    files: list[str]
    archive_done: dict[str, list[str]]  # archive key -> its keys already in the output
    skipped: int  # inputs the output already holds


def label(opts: LabelOptions, started_at: float | None = None, log=print) -> dict:
    """Run the job and return the summary it writes to OUTPUT/_summary.json. User mistakes raise UsageError
    before any work starts. `started_at` (time.time() at command start) is where start-up is counted from."""
    started = started_at or time.time()
    opts.checkpoint = best_checkpoint(opts.checkpoint)
    state = checkpoint.load(opts.checkpoint)
    model = checkpoint.build_from(state)  # weights that do not fit their arch fail here, before Ray starts
    top_k = check_top_k(opts.top_k, state["classes"])
    listing = list_inputs(opts.inputs)
    if opts.evaluate:
        check_class_folders(listing.roots, state["classes"])
    writer = LabelWriter(opts.output, opts.rows_per_file, opts.overwrite)
    work = remaining(listing, writer.done)
    log(f"label: {len(listing.files)} image files and {len(listing.archives)} archives listed in "
        f"{time.time() - started:.1f}s; {work.skipped} already in {opts.output}")

    progress = Progress(log, len(work.files))
    if work.files or work.archive_done:
        init_ray()
        plan = actor_plan(opts.batch_size)
        payload = model_payload(state, model, opts.precision, gpu=plan["num_gpus"] > 0)
        for table in dataset(opts, plan, payload, work, top_k).iter_batches(batch_format="pyarrow", batch_size=None):
            progress.add(writer.add(table), started)
    writer.close()
    summary = progress.summary(work.skipped) | {
        "checkpoint": opts.checkpoint,
        "classes": state["classes"],
        "precision": opts.precision,
        "fast_decode": opts.fast_decode,
        "top_k": top_k,
        "min_confidence": opts.min_confidence,
        "inputs": opts.inputs,
        "files_written": writer.files_written,
    }
    if opts.evaluate:
        summary.update(evaluate(writer, listing.roots, state["classes"]))
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


def check_top_k(top_k: int | None, classes: list[str]) -> int:
    top_k = min(5, len(classes)) if top_k is None else top_k
    if not 1 <= top_k <= len(classes):
        raise UsageError(f"--top-k {top_k} must be between 1 and the checkpoint's {len(classes)} classes")
    return top_k


def remaining(listing: Listing, done: set[str]) -> Work:
    """The listed inputs the output does not hold yet. For each archive, the keys of it (members, or its own
    error row) already done, in one pass over `done`: a member key is ARCHIVE!MEMBER, and either part may
    itself contain a '!'."""
    files = [key for key in listing.files if key not in done]
    by_archive = {a: [a] if a in done else [] for a in listing.archives}
    for key in done:
        cut = key.find(MEMBER_SEPARATOR)
        while cut >= 0:
            if key[:cut] in by_archive:
                by_archive[key[:cut]].append(key)
                break
            cut = key.find(MEMBER_SEPARATOR, cut + 1)
    skipped = len(listing.files) - len(files) + sum(map(len, by_archive.values()))
    return Work(files, by_archive, skipped)


def dataset(opts: LabelOptions, plan: dict, payload: dict, work: Work, top_k: int) -> ray.data.Dataset:
    """Read units (file batches and archives) → read-and-decode tasks → predictor actors."""
    quiet_ray_data()
    units = [make_unit(files=files) for files in split_files(work.files, plan["batch_size"])]
    units += [make_unit(archive=a, done=keys) for a, keys in work.archive_done.items()]
    return (
        ray.data.from_items(units, override_num_blocks=len(units))
        .map_batches(read_units, batch_size=1, batch_format="pyarrow", num_cpus=plan["read_cpus"],
                     fn_kwargs={"spec": payload["model"], "fast_decode": opts.fast_decode})
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


def quiet_ray_data() -> None:
    """The job prints its own progress line; Ray Data's progress bars and notices about them are noise."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    logging.getLogger("ray.data._internal.execution.streaming_executor").setLevel(logging.WARNING)


class Progress:
    """Counts rows, prints an images/s line every few seconds, and times start-up and throughput."""

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

    def summary(self, skipped: int) -> dict:
        end = time.perf_counter()
        seconds = end - self.started
        done = self.labeled + self.errors
        steady_rows, steady_s = done - self.first_batch[1], end - self.first_batch[0]
        return {
            "total": done + skipped,
            "labeled": self.labeled,
            "errors": self.errors,
            "skipped_existing": skipped,
            "seconds": round(seconds, 3),
            "images_per_s": round(done / seconds, 2) if done else 0.0,
            "startup_seconds": self.startup_s,
            "images_per_s_after_startup": round(steady_rows / steady_s, 2) if self.startup_s and steady_rows else None,
        }
