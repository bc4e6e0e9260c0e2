"""Exactly-once Parquet output of `imgjobs label`.

A row counts as done only once it is in a complete `*.parquet` file in the output folder. Files are
written under a hidden temporary name and renamed when complete, so a job killed at any moment (kill -9
included) leaves complete files plus, at worst, a hidden temporary that the next run deletes. Each file records
in its metadata its rows per unit and the units whose last rows it holds (pipeline.label.units): the next run
reads only those footers, skips finished units, and labels the rest of the others. Files get a run-unique name,
so a rerun never overwrites what an earlier run committed. The one exception: rows whose input could not be read
(`error_kind` "io") are retried by the next run, which first rewrites the files that hold some (their records
say so) without them, under the same name, the same way (a temporary, then a rename over it).

Files are committed when they hold `--rows-per-file` rows, or `--commit-every` seconds after the last commit,
whichever comes first: a kill loses at most about that much work. Small files are not merged afterwards: a
merge is a second commit of the same rows, so a kill between writing the merged file and deleting its parts
would leave duplicates, and one file a minute (1,440 a day) is well within what Parquet readers handle.

Each file's schema metadata (key `imgjobs`) records where its labels came from (`provenance`). A run resumes
into an output only when everything that changes labels is the same; `--overwrite` starts over, deleting only
files that carry that provenance: a Parquet file someone else put in the folder is refused, never deleted. One job
writes into an output at a time (lock.OutputLock), and checks its lock before every commit.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats.labels_file import (
    PROVENANCE_KEY,
    UNITS_KEY,
    Provenance,
    io_errors,
    is_part,
    output_schema,
    part_paths,
    provenance_of,
    read_table,
    units_record,
)
from pipeline.label.lock import Folder, OutputLock
from pipeline.label.units import UNIT, UNIT_TOTAL, Ledger, Records

SUMMARY = "_summary.json"
TEMP_PREFIX = ".writing-"
# imgjobs 0.1 wrote its review page as report.html, which Parquet readers take for a data file; it is now
# _report.html, and a later run or report removes the old one.
LEGACY_REPORT = "report.html"
# What a resumed run must share with the files already there: anything else would mix two kinds of labels.
LABEL_DEFINING = ("weights_sha256", "classes", "precision", "decode", "top_k", "min_confidence", "embeddings",
                  "target_precision", "thresholds")


@dataclass(frozen=True)
class CommitPolicy:
    """When the writer commits a file: once it holds `rows_per_file` rows, or `every_s` seconds after the last
    commit."""

    rows_per_file: int
    every_s: float


class LabelWriter:
    """Commits labeled rows into `out_dir` exactly once, under the output's lock, as `commits` says when;
    `provenance`, complete, goes into every file's schema metadata and must match what the output already holds."""

    def __init__(self, out_dir: str, provenance: Provenance, commits: CommitPolicy, overwrite: bool, log=print,
                 clock=time.monotonic):
        self.folder = check_writable(out_dir)
        self.provenance = provenance
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.lock = OutputLock(self.folder, self.run_id, log)
        self.lock.acquire()  # before touching anything: temporaries may be another job's
        try:
            self._open(overwrite)
        except BaseException:
            self.lock.release()
            raise
        self.commits = commits
        self.files_written = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.clock = clock  # the commit policy's seconds: tests pass a clock of their own
        self._last_commit = clock()

    def _open(self, overwrite: bool) -> None:
        """Check the files there against the provenance, clean up, and read what they record of their units."""
        parts, summary = self._scan()
        schemas = self._footers(parts)
        if overwrite:
            for path in parts + summary:
                self.folder.fs.delete_file(path)
            parts, schemas = [], []
        records = [units_record(schema, path) for schema, path in zip(schemas, parts, strict=True)]
        wanted = self.provenance.as_dict()
        for path, schema in zip(parts, schemas, strict=True):  # every check before any committed file changes
            check_same_labels(provenance_of(schema, path), wanted, path, self.folder.uri)
        self.records = Records()
        for path, record in zip(parts, records, strict=True):
            if not record["io_errors"] or self._retry_io_errors(path, record):
                self.records.add(path.rsplit("/", 1)[-1], record)
        self.ledger = Ledger(self.records)

    def _scan(self) -> tuple[list[str], list[str]]:
        """The output's labels files and summary, once a killed run's unfinished files and an old page are gone."""
        parts, summary = [], []
        for entry in self.folder.fs.get_file_info(pafs.FileSelector(self.folder.path)):
            if entry.base_name.startswith(TEMP_PREFIX) or entry.base_name == LEGACY_REPORT:
                self.folder.fs.delete_file(entry.path)
            elif is_part(entry):
                parts.append(entry.path)
            elif entry.base_name == SUMMARY:
                summary.append(entry.path)
        return parts, summary

    def _footers(self, parts: list[str]) -> list[pa.Schema]:
        """The schemas of the labels files `parts`. Only files that carry imgjobs' provenance are ours to read, resume
        or delete: anything else is refused before any file changes, --overwrite included."""
        with ThreadPoolExecutor(16) as pool:  # footers only, many at once: on object stores each is a request or two
            schemas = list(pool.map(self._footer, parts))
        for path, schema in zip(parts, schemas, strict=True):
            if schema is None or PROVENANCE_KEY not in (schema.metadata or {}):
                raise UsageError(f"output {self.folder.uri} holds {path.rsplit('/', 1)[-1]}, which carries no imgjobs "
                                 "provenance; imgjobs never deletes such a file, --overwrite included: move it out of "
                                 "the folder, or use another --output")
        return schemas

    def add(self, table: pa.Table) -> pa.Table:
        """Buffer rows not yet taken (their unit columns included) and commit full files; returns the rows taken."""
        table = self.ledger.take(table)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        size = self.commits.rows_per_file
        if self._pending_rows >= size:
            rows = pa.concat_tables(self._pending)
            while rows.num_rows >= size:
                self._commit(rows.slice(0, size))
                rows = rows.slice(size)
            self._pending, self._pending_rows = [rows], rows.num_rows
        if self._pending_rows and self.clock() - self._last_commit >= self.commits.every_s:
            self.flush()
        return table

    def _retry_io_errors(self, path: str, record: dict) -> bool:
        """Drop the io error rows of a committed file, so that this run retries them (its record counts none);
        returns whether the file is still there, with other rows."""
        table = read_table(self.folder.fs, path)
        kept = table.filter(pc.invert(io_errors(table)))
        if kept.num_rows:
            metadata = table.schema.metadata | {UNITS_KEY: json.dumps(record | {"io_errors": 0}).encode()}
            temp = f"{path.rsplit('/', 1)[0]}/{TEMP_PREFIX}retry-{uuid.uuid4().hex[:8]}.parquet"
            pq.write_table(kept.replace_schema_metadata(metadata), temp, filesystem=self.folder.fs)
            self.folder.fs.move(temp, path)
            return True
        self.folder.fs.delete_file(path)
        return False

    def _footer(self, path: str) -> pa.Schema | None:
        return read_footer(self.folder.fs, path)

    def close(self) -> None:
        """Commit the last, partly filled file, and give the output's lock back, even when that commit fails."""
        try:
            self.flush()
        finally:
            self.lock.release()

    def flush(self) -> None:
        """Commit the last, partly filled file."""
        if self._pending_rows:
            self._commit(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def _commit(self, table: pa.Table) -> None:
        self.lock.check()
        fs, base = self.folder.fs, self.folder.path
        name = f"part-{self.run_id}-{self.files_written:05d}.parquet"
        temp = f"{base}/{TEMP_PREFIX}{name}"
        record = self.ledger.record(table)
        try:
            provenance = self.provenance
            schema = output_schema(provenance.embeddings, provenance.target_precision is not None).with_metadata(
                {PROVENANCE_KEY: json.dumps(provenance.as_dict()), UNITS_KEY: json.dumps(record)})
            pq.write_table(table.drop_columns([UNIT, UNIT_TOTAL]).cast(schema), temp, filesystem=fs)
            fs.move(temp, f"{base}/{name}")  # atomic on local disks; object stores publish whole objects
        except OSError as e:  # disk full, file too large, permissions changed: earlier files stay complete
            try:
                fs.delete_file(temp)
            except OSError:
                pass  # the next run deletes it
            raise UsageError(
                f"writing {base}/{name} failed: {str(e).splitlines()[0]}; {self.files_written} file(s) of this "
                f"run are complete; free space or fix {base}, then run the same command again to resume"
            ) from None
        self.ledger.committed_file(record, table)
        self.files_written += 1
        self._last_commit = self.clock()

    def tables(self, columns: list[str]) -> Iterator[pa.Table]:
        """The output's labels files, one at a time, with these columns."""
        for path in part_paths(self.folder.fs, self.folder.path):
            yield read_table(self.folder.fs, path, columns)


def read_runs(fs: pafs.FileSystem, base: str) -> list[dict]:
    """The runs recorded in base/_summary.json; none when there is no summary yet (the first run, or one killed
    before its end) or it is one of imgjobs 0.1."""
    try:
        return json.loads(storage.read_bytes(fs, f"{base}/{SUMMARY}"))["runs"]
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return []


def check_writable(out_dir: str) -> Folder:
    """The folder, created, once a probe file was written there: fail now, not after the first batch."""
    fs, base = storage.resolve(out_dir)
    try:
        fs.create_dir(base, recursive=True)
        probe = f"{base}/{TEMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe):
            pass
        fs.delete_file(probe)
    except OSError as e:
        raise UsageError(f"output {out_dir} cannot be written: {str(e).splitlines()[0]}") from None
    return Folder(out_dir, fs, base)


def read_footer(fs: pafs.FileSystem, path: str) -> pa.Schema | None:
    """The schema of the Parquet file `path`; None where it is no Parquet file, though named one."""
    try:
        return pq.read_schema(path, filesystem=fs)
    except pa.ArrowInvalid:
        return None


def refuse_other_labels_early(out_dir: str, wanted: dict) -> None:
    """Before slow work that the provenance waits on (--target-precision's calibration pass): refuse an output
    whose first labels file was made differently in anything known before the thresholds. Changes nothing; the
    writer checks every file again under the output's lock, and reports what this cannot read."""
    try:
        fs, base = storage.resolve(out_dir)
        first = part_paths(fs, base)[:1]
        schemas = [read_footer(fs, path) for path in first]
    except OSError:
        return
    for path, schema in zip(first, schemas, strict=True):
        if schema is not None and PROVENANCE_KEY in (schema.metadata or {}):
            check_same_labels(provenance_of(schema, path), wanted, path, out_dir,
                              [key for key in LABEL_DEFINING if key != "thresholds"])


def check_same_labels(found: dict, wanted: dict, path: str, out_dir: str, keys=LABEL_DEFINING) -> None:
    """Refuse to resume into labels that another checkpoint, other classes or other label options made."""
    differences = [f"{key} {_short(found.get(key))} there, {_short(wanted.get(key))} now"
                   for key in keys if found.get(key) != wanted.get(key)]
    if differences:
        raise UsageError(f"output {out_dir} holds labels made differently ({'; '.join(differences)}; first in "
                         f"{path.rsplit('/', 1)[-1]}); rerun with the same checkpoint and options to resume, use "
                         "another --output, or --overwrite to start over")


def _short(value) -> str:
    text = json.dumps(value)
    return text[:19] + "…" if len(text) > 20 else text
