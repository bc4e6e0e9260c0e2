"""Exactly-once Parquet output of `imgjobs label`.

A row counts as done only once it is in a complete `*.parquet` file in the output folder. Files are
written under a hidden temporary name and renamed when complete, so a job killed at any moment (kill -9
included) leaves complete files plus, at worst, a hidden temporary that the next run deletes. The next
run reads the `path` column of the complete files and labels only the rest. Files get a run-unique
name, so a rerun never overwrites what an earlier run committed. The one exception: rows whose input
could not be read (`error_kind` "io") are retried by the next run, which first rewrites their files
without them, under the same name, the same way (a temporary, then a rename over it).
"""

from __future__ import annotations

import time
import uuid

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UsageError

OUTPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("label", pa.string()),
    ("label_index", pa.int32()),
    ("score", pa.float32()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_scores", pa.list_(pa.float32())),
    ("uncertain", pa.bool_()),
    ("error", pa.string()),
    ("error_kind", pa.string()),  # "decode": the file is bad; "io": it could not be read, and a rerun retries it
    ("width", pa.int32()),
    ("height", pa.int32()),
])
SUMMARY = "_summary.json"
TEMP_PREFIX = ".writing-"


class LabelWriter:
    def __init__(self, out_dir: str, rows_per_file: int, overwrite: bool):
        self.fs, self.base = check_writable(out_dir)
        self.rows_per_file = rows_per_file
        entries = self.fs.get_file_info(pafs.FileSelector(self.base))
        self.done: set[str] = set()  # keys already in a committed file, including this run's
        for entry in entries:
            if entry.base_name.startswith(TEMP_PREFIX) or overwrite and (_is_part(entry) or entry.base_name == SUMMARY):
                self.fs.delete_file(entry.path)  # a killed run's unfinished file, or --overwrite
            elif _is_part(entry):
                self.done.update(self._without_io_errors(entry.path))
        self.existing = len(self.done)
        self.run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.files_written = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, table: pa.Table) -> pa.Table:
        """Buffer rows not yet done and commit full files; returns the rows taken."""
        keep = [key not in self.done for key in table.column("path").to_pylist()]
        if not all(keep):  # Ray may re-run a task after a worker failure; its rows must not repeat
            table = table.filter(pa.array(keep))
        self.done.update(table.column("path").to_pylist())
        self._pending.append(table)
        self._pending_rows += table.num_rows
        if self._pending_rows >= self.rows_per_file:
            rows = pa.concat_tables(self._pending)
            while rows.num_rows >= self.rows_per_file:
                self._commit(rows.slice(0, self.rows_per_file))
                rows = rows.slice(self.rows_per_file)
            self._pending, self._pending_rows = [rows], rows.num_rows
        return table

    def _without_io_errors(self, path: str) -> list[str]:
        """The keys of a committed file, after dropping its io error rows from it so that this run retries them."""
        keys = read_table(self.fs, path, ["path", "error_kind"])
        io = io_errors(keys)
        if pc.any(io).as_py():
            kept = read_table(self.fs, path).filter(pc.invert(io))
            if kept.num_rows:
                temp = f"{path.rsplit('/', 1)[0]}/{TEMP_PREFIX}retry-{uuid.uuid4().hex[:8]}.parquet"
                pq.write_table(kept, temp, filesystem=self.fs)
                self.fs.move(temp, path)
            else:
                self.fs.delete_file(path)
            keys = keys.filter(pc.invert(io))
        return keys.column("path").to_pylist()

    def close(self) -> None:
        """Commit the last, partly filled file."""
        if self._pending_rows:
            self._commit(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def _commit(self, table: pa.Table) -> None:
        name = f"part-{self.run_id}-{self.files_written:05d}.parquet"
        temp = f"{self.base}/{TEMP_PREFIX}{name}"
        try:
            pq.write_table(table.cast(OUTPUT_SCHEMA), temp, filesystem=self.fs)
            self.fs.move(temp, f"{self.base}/{name}")  # atomic on local disks; object stores publish whole objects
        except OSError as e:  # disk full, file too large, permissions changed: earlier files stay complete
            try:
                self.fs.delete_file(temp)
            except OSError:
                pass  # the next run deletes it
            raise UsageError(
                f"writing {self.base}/{name} failed: {str(e).splitlines()[0]}; {self.files_written} file(s) of this run "
                f"are complete; free space or fix {self.base}, then run the same command again to resume"
            ) from None
        self.files_written += 1

    def read_all(self, columns: list[str]) -> pa.Table:
        parts = [e.path for e in self.fs.get_file_info(pafs.FileSelector(self.base)) if _is_part(e)]
        tables = [pq.read_table(p, columns=columns, filesystem=self.fs) for p in sorted(parts)]
        return pa.concat_tables(tables) if tables else OUTPUT_SCHEMA.empty_table().select(columns)


def check_writable(out_dir: str) -> tuple[pafs.FileSystem, str]:
    """Create the folder and write a probe file: fail now, not after the first batch. Returns the folder's
    filesystem and path in it."""
    fs, base = storage.resolve(out_dir)
    try:
        fs.create_dir(base, recursive=True)
        probe = f"{base}/{TEMP_PREFIX}probe-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(probe):
            pass
        fs.delete_file(probe)
    except OSError as e:
        raise UsageError(f"output {out_dir} cannot be written: {str(e).splitlines()[0]}") from None
    return fs, base


def io_errors(table: pa.Table) -> pa.ChunkedArray:
    """True for the rows whose input could not be read (error_kind "io"), false for the others."""
    return pc.fill_null(pc.equal(table.column("error_kind"), "io"), False)


def _is_part(entry: pafs.FileInfo) -> bool:
    return entry.type == pafs.FileType.File and entry.base_name.endswith(".parquet") and entry.base_name[0] not in "._"


def read_table(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (pa.ArrowInvalid, KeyError) as e:
        raise UsageError(f"output folder holds {path}, which is not a labels file of this imgjobs version "
                         f"({str(e).splitlines()[0]}); use another --output, or --overwrite") from None
