"""`imgjobs label`: list inputs, stream them through Ray Data into the checkpoint's model, write Parquet once.

`label` reads top to bottom: list the inputs, load the checkpoint while Ray starts, find what the output already
holds, plan the actors, stream the rest through them into the writer, then summarise.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

import pipeline
from pipeline import storage
from pipeline.console import Console, duration, timestamp
from pipeline.errors import UsageError
from pipeline.formats import checkpoint
from pipeline.formats.calibration import CONFIDENCE, HeldOut, thresholds
from pipeline.formats.labels_file import Decoding, Provenance, RowRules, io_errors
from pipeline.label import isolation, units
from pipeline.label.evaluate import check_class_folders, evaluate, truth_and_prediction
from pipeline.label.options import LabelOptions
from pipeline.label.output import SUMMARY, CommitPolicy, LabelWriter, read_runs, refuse_other_labels_early
from pipeline.label.report import write_report
from pipeline.label.sources import Listing, list_inputs

if TYPE_CHECKING:
    from pipeline.label.plan import ActorPlan
    from pipeline.label.predictor import ModelPayload

RATE_WINDOW_S = 5.0
MAX_IO_ERRORS = 0.5  # a larger share of a run's inputs unreadable ends it with exit 1: the storage is wrong


class ReadFailures(Exception):
    """Most inputs could not be read. Their rows are written, and a rerun retries them."""


def label(opts: LabelOptions, started_at: float | None = None, console: Console | None = None) -> dict:
    """Run the job and return this run's entry in OUTPUT/_summary.json. User mistakes raise UsageError
    before anything is written. `started_at` (time.time() at command start) is where start-up is counted from."""
    started = started_at or time.time()
    console = console or Console()
    # A wrong checkpoint or input path is answered before torch and Ray load, which takes seconds; nothing is
    # written anywhere before every check has passed.
    checkpoint_path = checkpoint.find(opts.checkpoint)
    listing = list_inputs(opts.inputs)
    held_out = list_inputs([opts.calibration]) if opts.calibration else None
    listed_in = time.time() - started
    # The model loads on a thread while Ray starts on this one (it must: Ray's processes end with the thread that
    # started them). Each takes seconds of imports and start-up, and on 2 CPUs they overlap.
    from pipeline import cluster, ray_internals

    with ThreadPoolExecutor(1) as pool:
        new_local_ray = ray_internals.existing_cluster_address() is None  # asked before this job starts one
        loading = pool.submit(load_model, opts, checkpoint_path, listing.roots, new_local_ray, console.line)
        cluster.init_ray()
        model = loading.result()
    from pipeline.label import plan  # Ray and torch: imported once the checks above passed

    actors = start_actors(opts, model, plan.actor_plan(opts.batch_size, opts.max_actors, opts.precision), console)
    acceptance = accept(opts, actors, held_out, model, console) if opts.target_precision is not None else None
    actors = actors.accepting(acceptance)
    provenance = run_provenance(opts, model, actors.plan, acceptance)
    # Fails first if it cannot write there, another job holds the output, or the output holds other labels.
    writer = LabelWriter(opts.output, provenance, CommitPolicy(opts.rows_per_file, opts.commit_every), opts.overwrite,
                         console.line)
    try:
        isolation.clear(writer.folder.fs, writer.folder.path)  # under the lock: read tasks count this run's attempts
        work = units.plan(listing.archives.to_pylist(), listing.files, writer.records)
        skipped = writer.records.existing
        console.line(f"label: {len(listing.files)} image files and {len(listing.archives)} archives listed in "
                     f"{listed_in:.1f}s; {skipped} already in {opts.output}"
                     + (f" ({work.finished} finished units skipped unopened)" if work.finished else ""))
        if work.units and acceptance is None:  # with a target, said before the calibration pass
            announce(opts, actors.plan, console)
        progress = RunCounter(console, work.files, work.archives)
        if work.units:
            for table, cpu_decoded in run(opts, actors, work, listing.options, opts.output):
                progress.cpu_decoded += cpu_decoded
                progress.add(writer.add(table), started)
        isolation.clear(writer.folder.fs, writer.folder.path)  # every unit finished: the folder holds only outputs
    except BaseException:
        writer.close()  # what was labeled is committed, and the lock given back, whatever stopped the run
        raise
    try:
        writer.flush()
        console.close()
        summary = ({"run_id": writer.run_id, "started": timestamp(started), "ended": timestamp(time.time())}
                   | progress.summary(skipped) | provenance.as_dict()
                   | {"inputs": opts.inputs, "files_written": writer.files_written})
        if actors.plan.gpu:
            progress.note_cpu_decoded()
        if opts.evaluate:
            columns = ["path", "label_index", *(["accepted"] if acceptance else [])]
            summary.update(evaluate(writer.tables(columns), listing.roots, provenance.classes))
        append_run(writer, summary)
        if opts.report:
            write_report(opts.output, console.line)
    finally:
        writer.lock.release()  # only now: the next job into this output finds the summary and the page complete
    progress.check_reads()
    return summary


@dataclass(frozen=True)
class Model:
    """The checkpoint, its model, and what the job derives from them."""

    path: str  # the checkpoint file (checkpoint.find)
    state: dict  # the loaded checkpoint (checkpoint.load)
    model: Any
    top_k: int
    embedding_size: int | None
    cpu_payload: ModelPayload | None  # plan.model_payload for actors on this machine's CPU, when sure to run there


def load_model(opts: LabelOptions, path: str, roots: list[str], new_local_ray: bool, log) -> Model:
    """Load and check the checkpoint file `path`: weights that do not fit their arch, a --top-k or --embeddings the
    model cannot give, and --evaluate's class folders fail here. When the job starts a Ray of its own
    (`new_local_ray`) on a machine without GPUs, the actors' payload is built here too: its TorchScript tracing takes
    seconds that Ray's start covers."""
    import torch  # on the loading thread: its seconds of imports overlap Ray's start

    from pipeline.models import from_checkpoint  # torchvision, as torch above

    state = checkpoint.load(path)
    model = from_checkpoint(state)
    top_k = check_top_k(opts.top_k, state["classes"])
    if opts.evaluate:
        check_class_folders(roots, state["classes"], "--evaluate")
    if opts.target_precision is not None and not opts.calibration and not calibration_of(state):
        raise UsageError(f"--target-precision needs held-out scores to set its thresholds, and {path} keeps none (it "
                         "was trained with data.calibration_fraction=0, or by imgjobs 0.3): pass --calibration DIR, "
                         "a class-folder tree of hand-checked images drawn like the ones you label, or train again "
                         "with data.calibration_fraction above 0")
    size = embedding_size(model, state) if opts.embeddings else None
    payload = None
    if new_local_ray and not torch.cuda.is_available():
        from pipeline.label import plan  # Ray and torch, as above

        precision = plan.choose_precision(opts.precision, gpu=False)[0]
        payload = plan.model_payload(state, model, precision, gpu=False, embeddings=opts.embeddings, log=log)
    return Model(path, state, model, top_k, size, payload)


def run_provenance(opts: LabelOptions, model: Model, actors: ActorPlan, acceptance: Acceptance | None) -> Provenance:
    """Where this run's labels come from: complete before the writer opens the output, which records it in every
    file."""
    state = model.state
    targets = {} if acceptance is None else {
        "target_precision": opts.target_precision, "thresholds": acceptance.by_class, "held_out": acceptance.record}
    return Provenance(
        imgjobs_version=pipeline.__version__, checkpoint=model.path, weights_sha256=state["sha256"],
        arch=state["model"].arch, classes=state["classes"], precision=opts.precision,
        decode=Decoding(exact=opts.exact_decode or actors.gpu),  # GPU actors decode at full size
        top_k=model.top_k, min_confidence=opts.min_confidence, embeddings=model.embedding_size,
        compute_precision=actors.precision, decode_device="gpu" if actors.gpu else "cpu", **targets)


def embedding_size(model, state: dict) -> int:
    """The length of the embedding column; a model whose head takes no feature vector fails here."""
    from pipeline.models import embedding_head  # torchvision, on the loading thread

    return embedding_head(model, state["model"].head).in_features


def append_run(writer: LabelWriter, summary: dict) -> None:
    """Add this run's entry to OUTPUT/_summary.json, which keeps one per run."""
    writer.lock.check()  # a commit like any other: not by a run that may have lost its lock
    fs, base = writer.folder.fs, writer.folder.path
    runs = read_runs(fs, base)
    storage.write_bytes(fs, f"{base}/{SUMMARY}", json.dumps({"runs": [*runs, summary]}, indent=2).encode())


@dataclass(frozen=True)
class Actors:
    """The predictor actors that every pass of the job streams through: their plan, what they load, and how they
    make a row."""

    plan: ActorPlan
    payload: ModelPayload
    rules: RowRules

    def accepting(self, acceptance: Acceptance | None) -> Actors:
        """These actors, marking rows `accepted` by the thresholds of `acceptance`, if any."""
        return self if acceptance is None else replace(self, rules=replace(self.rules, thresholds=acceptance.by_index))


def start_actors(opts: LabelOptions, model: Model, actors: ActorPlan, console: Console) -> Actors:
    """The actors' model payload (unless load_model built it), and how they make a row."""
    from pipeline.label import plan  # Ray and torch, as in label()

    payload = model.cpu_payload
    if actors.gpu or payload is None or payload.precision != actors.precision:
        payload = plan.model_payload(model.state, model.model, actors.precision, gpu=actors.gpu,
                                     embeddings=opts.embeddings, log=console.line)
    return Actors(actors, payload, RowRules(model.top_k, opts.min_confidence))


def announce(opts: LabelOptions, actors: ActorPlan, console: Console) -> None:
    """Before the first pass through the actors: what the plan waits for, and what precision auto chose."""
    if actors.waiting:
        console.line("label: waiting for a worker node with CPUs: none is up yet, and the autoscaler adds one as the "
                     f"job asks for it; the pool grows to {actors.max_actors} actor(s) (--max-actors)")
    if opts.precision == "auto":
        console.line(f"label: precision auto: {actors.precision} ({actors.precision_reason}; --precision fp32 or bf16 "
                     "forces one)")


def run(opts: LabelOptions, actors: Actors, work: units.Work, options: dict[str, str],
        output: str | None) -> Iterator[tuple[pa.Table, int]]:
    """Stream the work's units through the actors, on the Ray that label() joined or started: each labeled block,
    and how many of its files GPU actors decoded on their CPUs instead. `options` are the inputs' filesystem
    options by host (Listing.options); `output` is the labels folder, None for a pass that writes nothing."""
    import ray

    from pipeline.label import plan  # Ray and torch, as in label()
    from pipeline.label.reading import ReadSettings
    from pipeline.ray_output import driver_notices_dropped

    attempts = None if output else ray.remote(num_cpus=0)(isolation.PassAttempts).remote()
    reading = ReadSettings(actors.payload.spec, output, options, opts.limits, opts.max_pixels, opts.exact_decode,
                           encoded=actors.plan.gpu, attempts=attempts)
    dataset = plan.dataset(work, reading, actors.plan, actors.payload, actors.rules)
    try:
        with driver_notices_dropped():
            # No prefetch: with it, the stream's latest block waits for the next one, which a slow unit may hold back.
            for block in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                yield plan.split_cpu_decoded(block)
    finally:
        if attempts is not None:
            ray.kill(attempts)


@dataclass(frozen=True)
class Acceptance:
    """--target-precision's thresholds, and the held-out counts behind them."""

    by_class: dict[str, float | None]
    record: dict  # Provenance.held_out

    @property
    def by_index(self) -> tuple[float, ...]:
        return tuple(math.inf if t is None else t for t in self.by_class.values())


def accept(opts: LabelOptions, actors: Actors, held_out: Listing | None, model: Model,
           console: Console) -> Acceptance:
    """Each class's threshold for --target-precision, from the held-out scores of the --calibration tree (labeled
    now, without writing) or else of the checkpoint's calibration share of val. Before the tree's pass, an output
    labeled otherwise (with another target, for one) is refused; without a pass, the writer refuses it next."""
    if held_out and not opts.overwrite:
        refuse_other_labels_early(opts.output, run_provenance(opts, model, actors.plan, None).as_dict()
                                  | {"target_precision": opts.target_precision})
    classes = model.state["classes"]
    announce(opts, actors.plan, console)
    if held_out:
        found, source = label_held_out(opts, actors, held_out, classes), opts.calibration
    else:
        found = HeldOut.of_dict(calibration_of(model.state))
        source = f"the calibration share of val kept in {model.path}"
    target = opts.target_precision
    chosen = thresholds(found, target)
    console.line(f"label: --target-precision {target:g}: thresholds set from {found.count} held-out images, "
                 f"{source} (each class's at the end)")
    record = {"source": source, "confidence": CONFIDENCE, "images": found.count,
              "classes": {name: asdict(t) | {"accepted_share": round(t.accepted_share, 6)}
                          for name, t in chosen.items()},
              "histograms": found.as_dict()}
    return Acceptance({name: t.threshold for name, t in chosen.items()}, record)


def label_held_out(opts: LabelOptions, actors: Actors, held_out: Listing, classes: list[str]) -> HeldOut:
    """The top-1 scores of the --calibration tree's images, labeled by the actors as the job's are."""
    check_class_folders(held_out.roots, classes, "--calibration")
    found = HeldOut.empty(classes)
    work = units.plan(held_out.archives.to_pylist(), held_out.files, units.Records())
    for table, _ in run(opts, actors, work, held_out.options, None):
        truth, predicted = truth_and_prediction(table, held_out.roots, classes)
        inside = (truth >= 0) & (predicted >= 0)
        scores = table.column("score").to_numpy(zero_copy_only=False)
        found = found.add(predicted[inside], scores[inside], truth[inside])
    return found


def calibration_of(state: dict) -> dict | None:
    """The held-out histograms a checkpoint keeps of its val's calibration share; none in checkpoints of imgjobs
    0.3 or trained with data.calibration_fraction=0."""
    return (state.get("val") or {}).get("calibration")


def check_top_k(top_k: int | None, classes: list[str]) -> int:
    top_k = min(5, len(classes)) if top_k is None else top_k
    if not 1 <= top_k <= len(classes):
        raise UsageError(f"--top-k {top_k} must be between 1 and the checkpoint's {len(classes)} classes")
    return top_k


class RunCounter:
    """Counts rows, keeps a progress line with percent, images/s and ETA, and times start-up and throughput."""

    def __init__(self, console: Console, files: int, archives: int):
        self.console, self.files, self.archives = console, files, archives
        self.started = time.perf_counter()
        self.labeled = self.errors = self.io_errors = 0
        self.cpu_decoded = 0  # files that GPU actors decoded on their CPUs
        self.accepted = None  # rows accepted, with --target-precision
        self.first_io_error = None
        self.startup_s = None  # command start to first labeled batch
        self.first_batch = (0.0, 0)  # (time, rows) at the first batch: throughput after start-up counts from here
        self.window = (0.0, 0)  # (time, rows) where the current images/s window starts
        self.rate = 0.0  # images/s over the last whole window: recent, so start-up does not drag it down

    def add(self, table, job_started_at: float) -> None:
        errors = table.num_rows - table.column("error").null_count
        self.errors += errors
        io = io_errors(table)
        io_count = pc.sum(io).as_py() or 0
        self.io_errors += io_count
        if io_count and self.first_io_error is None:
            first = pc.index(io, True).as_py()
            self.first_io_error = f"{table.column('path')[first]}: {table.column('error')[first]}"
        self.labeled += table.num_rows - errors
        if "accepted" in table.column_names:
            self.accepted = (self.accepted or 0) + (pc.sum(table.column("accepted")).as_py() or 0)
        now, done = time.perf_counter(), self.labeled + self.errors
        if self.startup_s is None:
            self.startup_s = round(time.time() - job_started_at, 2)
            self.first_batch = self.window = (now, done)
            self.console.line(f"label: first labeled batch after {self.startup_s:.1f}s")
        elapsed = now - self.window[0]
        if elapsed >= RATE_WINDOW_S or not self.rate and elapsed > 0:
            self.rate = (done - self.window[1]) / elapsed
            if elapsed >= RATE_WINDOW_S:
                self.window = (now, done)
        self.console.progress(self.line(done))

    def check_reads(self) -> None:
        """ReadFailures when most of the run's inputs could not be read."""
        done = self.labeled + self.errors
        if done and self.io_errors > MAX_IO_ERRORS * done:
            raise ReadFailures(f"{self.io_errors} of {done} inputs could not be read (first: "
                               f"{self.first_io_error}); check the input's storage and credentials, then run the "
                               "same command again: it retries those rows")

    def note_cpu_decoded(self) -> None:
        """Say so when GPU actors decoded a large share of the files on their CPUs."""
        from pipeline.label.predictor import CPU_SHARE_NOTICE  # torch: imported by then

        done = self.labeled + self.errors
        if done and self.cpu_decoded > CPU_SHARE_NOTICE * done:
            self.console.line(f"label: GPU actors decoded {self.cpu_decoded} of {done} files on their CPUs (other "
                              "formats, CMYK, damaged JPEGs, files nvjpeg rejected): those CPUs may have bounded the "
                              "rate")

    def line(self, done: int) -> str:
        text = f"label: {done}"
        if self.archives:  # members of archives are counted as they stream: no total to compare with
            text += f" done ({self.files} files and {self.archives} archives listed)"
        elif self.files:
            text += f"/{self.files} ({100 * done / self.files:.0f}%)"
        if self.rate:
            text += f", {self.rate:.1f} images/s"
            if not self.archives:
                text += f", ETA {duration((self.files - done) / self.rate)}"
        return text + f", {self.errors} errors"

    def summary(self, skipped: int) -> dict:
        end = time.perf_counter()
        seconds = end - self.started
        done = self.labeled + self.errors
        steady_rows, steady_s = done - self.first_batch[1], end - self.first_batch[0]
        return {
            "total": done + skipped,
            "labeled": self.labeled,
            "accepted": self.accepted,
            "errors": self.errors,
            "io_errors": self.io_errors,
            "cpu_decoded": self.cpu_decoded,
            "skipped_existing": skipped,
            "seconds": round(seconds, 3),
            "images_per_s": round(done / seconds, 2) if done else 0.0,
            "startup_seconds": self.startup_s,
            "images_per_s_after_startup": round(steady_rows / steady_s, 2) if self.startup_s and steady_rows else None,
        }
