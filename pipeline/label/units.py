"""Bookkeeping by unit, not by image: what `imgjobs label` remembers of what an output already holds.

A unit is one archive (a shard), or a run of up to LOOSE_UNIT_FILES loose files of one folder in sorted order, so
the same inputs give the same units on every run. Each labels file records in its metadata (labels_file.UNITS_KEY)
how many rows of each unit it holds, and which units its rows complete: a unit's completion is committed
atomically with its last rows. A rerun reads only those footers:

- a finished unit is skipped without being opened;
- a unit in progress is labeled again by one read task, which reads the keys already done from the few files that
  hold its rows (reading.done_keys), and only those; the driver keeps no key of any image done before.

A loose unit is named by a digest of its keys, so a folder whose files changed gives new units: those look for
their done keys also in the files of the units that are no longer listed (`orphans`), and nothing is labeled twice.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.formats.labels_file import io_errors

LOOSE_UNIT_FILES = 1024
LOOSE = "files:"  # loose units' names start so; an archive's unit is named by its key
# Columns the read tasks add to every row, which the predictors pass on and the writer drops: the row's unit, and,
# on a unit's last row, how many rows the unit has in all (earlier runs' included); -1 on the others.
UNIT, UNIT_TOTAL = "unit", "unit_total"
BOOKKEEPING = (pa.field(UNIT, pa.string()), pa.field(UNIT_TOTAL, pa.int64()))


def loose_units(keys: pa.Array) -> Iterator[tuple[str, int, int]]:
    """(name, start, end) of the units of `keys`, sorted and unique image keys (large_string): each folder's files
    in runs of LOOSE_UNIT_FILES."""
    if not len(keys):
        return
    folders = pc.replace_substring_regex(keys, r"/[^/]*$", "")
    changes = np.flatnonzero(pc.not_equal(folders[1:], folders[:-1]).to_numpy(zero_copy_only=False)) + 1
    for start, end in zip([0, *changes.tolist()], [*changes.tolist(), len(keys)], strict=True):
        for first in range(start, end, LOOSE_UNIT_FILES):
            last = min(first + LOOSE_UNIT_FILES, end)
            yield _loose_name(keys.slice(first, last - first)), first, last


def _loose_name(keys: pa.LargeStringArray) -> str:
    """A name that changes when any key of the unit does: a digest of its string bytes and offsets, taken from the
    Arrow buffers without a Python string per key."""
    offsets = np.frombuffer(keys.buffers()[1], np.int64)[keys.offset : keys.offset + len(keys) + 1]
    digest = hashlib.blake2b(digest_size=10)
    digest.update(memoryview(keys.buffers()[2])[offsets[0] : offsets[-1]])
    digest.update((offsets - offsets[0]).tobytes())
    return f"{LOOSE}{digest.hexdigest()} {keys[0].as_py()} +{len(keys) - 1}"


@dataclass
class Records:
    """What the labels files of an output say of its units."""

    complete: set[str] = field(default_factory=set)
    parts: dict[str, list[str]] = field(default_factory=dict)  # unit -> the files holding its rows
    rows: Counter = field(default_factory=Counter)  # unit -> its rows there (those retried for io errors aside)

    def add(self, name: str, record: dict) -> None:
        """The record of labels file `name` (what metadata_of wrote)."""
        for unit, rows in record["rows"].items():
            if rows:  # a unit of only io error rows here: none left once they are dropped for a retry
                self.parts.setdefault(unit, []).append(name)
                self.rows[unit] += rows
        self.complete.update(record["done"])

    @property
    def existing(self) -> int:
        return sum(self.rows.values())


@dataclass(frozen=True)
class Unit:
    """One read task's work: an archive, or a run of loose files."""

    name: str
    archive: str  # the archive's key; "" for loose files
    start: int  # loose files: the unit's slice of the sorted loose-file keys (Work.keys)
    end: int
    prior: int  # its rows already in the output
    parts: tuple[str, ...]  # the labels files holding those rows (and, for loose files, those of orphaned units)

    def row(self) -> dict:
        """The unit as a row of Ray Data's read stage, of Arrow types only (of_row reads it back)."""
        return asdict(self) | {"parts": json.dumps(self.parts)}

    @classmethod
    def of_row(cls, row: dict) -> Unit:
        return cls(**row | {"parts": tuple(json.loads(row["parts"]))})


@dataclass(frozen=True)
class Work:
    """The units a run labels, and what they hold."""

    units: list[Unit]
    keys: pa.Array  # the sorted loose-file keys that loose units index
    files: int  # loose files not yet labeled
    archives: int  # archives not finished
    finished: int  # units skipped: finished by an earlier run


def plan(archives: list[str], files: pa.Array, records: Records) -> Work:
    """The units of the listed `archives` and loose `files` that `records` does not show finished. A unit in
    progress carries the files that hold its rows (its read task skips those rows) and its row count there."""
    listed = set(archives)
    units, finished, to_label = [], 0, 0
    loose = list(loose_units(files))
    listed.update(name for name, _, _ in loose)
    orphans = sorted({part for unit, parts in records.parts.items()
                      if unit.startswith(LOOSE) and unit not in listed for part in parts})
    for name, archive, start, end in [(a, a, 0, 0) for a in archives] + [(n, "", s, e) for n, s, e in loose]:
        if name in records.complete:
            finished += 1
            continue
        parts = records.parts.get(name, []) + (orphans if not archive else [])
        units.append(Unit(name, archive, start, end, records.rows[name], tuple(sorted(set(parts)))))
        to_label += (end - start - records.rows[name]) if not archive else 0
    return Work(units, files, to_label, sum(1 for u in units if u.archive), finished)


class Ledger:
    """The writer's side: drops rows it has already taken this run (Ray runs a task again after a worker failure),
    counts each unit's rows, and says which units a file of rows completes. It holds keys only of the units in
    progress in this run, and lets them go when their last rows are committed."""

    def __init__(self, records: Records):
        self.complete = set(records.complete)  # its own: it adds the units this run finishes
        self.prior = records.rows
        self.taken: dict[str, set[str]] = {}  # unit in progress -> its keys taken this run
        self.committed: Counter = Counter()  # unit -> its rows committed this run
        self.total: dict[str, int] = {}  # unit -> its rows in all, once its last row came
        self.failed: set[str] = set()  # units with rows whose input could not be read: a rerun retries them

    def take(self, table: pa.Table) -> pa.Table:
        """The rows of `table` not taken before."""
        keep = []
        columns = (table.column(UNIT), table.column("path"), table.column(UNIT_TOTAL), io_errors(table))
        for unit, key, total, io in zip(*(column.to_pylist() for column in columns), strict=True):
            taken = None if unit in self.complete else self.taken.setdefault(unit, set())
            keep.append(taken is not None and key not in taken)
            if keep[-1]:
                taken.add(key)
                if total >= 0:
                    self.total[unit] = total
                if io:
                    self.failed.add(unit)
        return table if all(keep) else table.filter(pa.array(keep, pa.bool_()))

    def record(self, table: pa.Table) -> dict:
        """The unit record of a labels file of these rows (taken before): rows per unit, those with io errors
        aside, and the units whose last rows they are."""
        rows = Counter(table.column(UNIT).to_pylist())
        io = Counter(table.filter(io_errors(table)).column(UNIT).to_pylist())
        done = [unit for unit, count in rows.items() if unit not in self.failed
                and self.prior[unit] + self.committed[unit] + count == self.total.get(unit)]
        return {"rows": {unit: count - io[unit] for unit, count in rows.items()}, "done": done,
                "io_errors": sum(io.values())}

    def committed_file(self, record: dict, table: pa.Table) -> None:
        """The file of `record` is in place: its rows count, and its finished units' keys go."""
        self.committed.update(Counter(table.column(UNIT).to_pylist()))
        for unit in record["done"]:
            self.complete.add(unit)
            for progress in (self.taken, self.total, self.committed):
                progress.pop(unit, None)

