"""The label output: files committed by size and by time; archive members over the cap; bookkeeping by unit, with
nothing kept per image. Its lock: tests/test_output_lock.py."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import tarfile
import tracemalloc
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import label as label_command
from pipeline.formats.archives import Limits
from pipeline.formats.keys import Reader
from pipeline.formats.labels_file import OUTPUT_SCHEMA, PROVENANCE_KEY, UNITS_KEY, Decoding, Provenance
from pipeline.label import units
from pipeline.label.output import CommitPolicy, LabelWriter
from pipeline.label.sources import list_inputs
from pipeline.label.units import UNIT, UNIT_TOTAL
from tests.helpers import Clock, label_files


def test_archive_members_over_the_cap_get_an_error_row_without_being_inflated(tmp_path):
    small = b"\xff\xd8 a few bytes standing in for a photo"
    tar_path = tmp_path / "shard.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("big.jpg", bytes(2 * 2**20)), ("small.jpg", small)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    members = Reader(limits=Limits(member_bytes=2**20)).archive_members(str(tar_path), set())
    rows = {key.split("!")[1]: rest for key, *rest in members}
    assert rows["small.jpg"] == [small, None, None]
    assert rows["big.jpg"] == [None, "archive member of 2 MiB is over the 1 MiB cap (--max-member-mb)", "too_large"]

    # A zip bomb: 300 MiB of zeros in a few hundred KiB, over the default 256 MiB cap.
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("bomb.jpg", "w", force_zip64=True) as member:
            for _ in range(300):
                member.write(bytes(2**20))
        archive.writestr("small.jpg", small)
    assert bomb.stat().st_size < 2**20
    tracemalloc.start()
    rows = {key.split("!")[1]: rest for key, *rest in Reader().archive_members(str(bomb), set())}
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rows["bomb.jpg"] == [None, "archive member of 300 MiB is over the 256 MiB cap (--max-member-mb)",
                                "too_large"]
    assert rows["small.jpg"] == [small, None, None] and peak < 16 * 2**20


# What a job's writer is given: the writer only records it, and checks it against the output's files.
PROVENANCE = Provenance(imgjobs_version="0", checkpoint="c.pt", weights_sha256="0" * 64, arch="resnet18",
                        classes=["a", "b"], precision="auto", decode=Decoding(exact=False), top_k=2,
                        min_confidence=0.0, embeddings=None, compute_precision="fp32", decode_device="cpu")


def rows(*names: str, unit: str = "u", total: int = -1) -> pa.Table:
    """Rows as the predictors give them to the writer: with their unit, and `total` on the last."""
    schema = OUTPUT_SCHEMA.append(pa.field(UNIT, pa.string())).append(pa.field(UNIT_TOTAL, pa.int64()))
    totals = [-1] * (len(names) - 1) + [total]
    return pa.Table.from_pylist([{"path": name, UNIT: unit, UNIT_TOTAL: t} for name, t in zip(names, totals)],
                                schema=schema)


def test_with_the_default_options_rows_are_committed_once_a_minute_has_passed(tmp_path):
    """`--commit-every` defaults to 60 s: a kill loses at most about a minute of work, however few rows that is."""
    parser = argparse.ArgumentParser()
    label_command.add_arguments(parser)
    defaults = parser.parse_args(["--checkpoint", "c", "--input", "i", "--output", "o"])
    assert (defaults.commit_every, defaults.rows_per_file) == (60.0, 100_000)
    clock, out = Clock(), tmp_path / "out"
    writer = LabelWriter(str(out), PROVENANCE, CommitPolicy(defaults.rows_per_file, defaults.commit_every),
                         overwrite=False, clock=clock)

    def committed() -> list[str]:
        return sorted(pq.read_table(out).column("path").to_pylist()) if label_files(out) else []

    writer.add(rows("a", "b"))
    clock.now += 59.9
    writer.add(rows("c"))
    assert committed() == []  # under a minute: still pending
    clock.now += 0.1
    writer.add(rows("d"))
    assert committed() == ["a", "b", "c", "d"]  # a minute since the writer opened: one file with all of it
    clock.now += 30
    writer.add(rows("e"))
    assert committed() == ["a", "b", "c", "d"]  # the minute counts from the last commit
    clock.now += 30
    writer.add(rows("f", "a"))  # "a" is done already: never written twice
    assert committed() == ["a", "b", "c", "d", "e", "f"] and writer.files_written == 2
    writer.close()


def test_every_file_records_the_provenance_the_writer_was_given_which_nothing_changes_later(tmp_path):
    """The job builds its provenance whole before the writer opens the output: the writer's record is final, and
    the JSON keeps the keys, and their order, that files have always had."""
    out = tmp_path / "out"
    writer = LabelWriter(str(out), PROVENANCE, CommitPolicy(rows_per_file=1, every_s=3600), overwrite=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        writer.provenance.compute_precision = "bf16"
    writer.add(rows("a", unit="a", total=1))
    writer.close()
    recorded = json.loads(pq.read_schema(label_files(out)[0]).metadata[PROVENANCE_KEY])
    assert recorded == PROVENANCE.as_dict() and recorded["decode"] == {"exact": False}
    assert list(recorded) == ["imgjobs_version", "checkpoint", "weights_sha256", "arch", "classes", "precision",
                              "decode", "top_k", "min_confidence", "embeddings", "compute_precision", "decode_device"]


def test_the_ledger_leaves_the_records_it_was_given_as_they_were():
    records = units.Records()
    records.add("part-0.parquet", {"rows": {"a": 1}, "done": ["a"], "io_errors": 0})
    ledger = units.Ledger(records)
    table = rows("b/1", unit="b", total=1)
    ledger.committed_file(ledger.record(ledger.take(table)), table)
    assert ledger.complete == {"a", "b"} and records.complete == {"a"}


def unit_records(out) -> list[dict]:
    """Each labels file's unit record, in name order."""
    return [json.loads(pq.read_schema(f).metadata[UNITS_KEY]) for f in label_files(out)]


def test_a_unit_is_recorded_finished_in_the_file_that_holds_its_last_rows_and_a_rerun_skips_it(tmp_path):
    out = tmp_path / "out"
    writer = LabelWriter(str(out), PROVENANCE, CommitPolicy(rows_per_file=2, every_s=3600), overwrite=False)
    writer.add(rows("a/1", "a/2", unit="a"))
    writer.add(rows("b/1", unit="b"))
    writer.add(rows("a/2", "a/3", unit="a", total=3))  # a/2 again: Ray ran a task twice
    assert set(writer.ledger.taken) == {"b"}  # a's keys went with its last rows; b is still in progress
    writer.close()
    assert unit_records(out) == [{"rows": {"a": 2}, "done": [], "io_errors": 0},
                                 {"rows": {"b": 1, "a": 1}, "done": ["a"], "io_errors": 0}]
    again = LabelWriter(str(out), PROVENANCE, CommitPolicy(rows_per_file=2, every_s=3600), overwrite=False)
    work = units.plan(["a", "b", "c"], pa.array([], pa.large_string()), again.records)
    again.close()
    assert work.finished == 1 and [u.name for u in work.units] == ["b", "c"]
    b, c = work.units
    assert (b.prior, b.parts) == (1, (label_files(out)[1].name,))
    assert (c.prior, c.parts) == (0, ())
    assert [units.Unit.of_row(unit.row()) for unit in work.units] == work.units  # through Ray Data's rows and back


def test_loose_files_form_the_same_units_every_run_and_a_changed_folder_finds_its_done_keys(tmp_path):
    keys = pa.array(sorted([f"/d/{i:05d}.jpg" for i in range(2500)] + ["/e/x.jpg"]), pa.large_string())
    first = list(units.loose_units(keys))
    assert [(end - start) for _, start, end in first] == [1024, 1024, 452, 1]  # by folder, runs of 1024
    assert list(units.loose_units(keys)) == first
    records = units.Records()
    for i, (name, start, end) in enumerate(first):
        records.add(f"part-{i}.parquet", {"rows": {name: end - start}, "done": [name], "io_errors": 0})
    assert units.plan([], keys, records).units == []  # all finished: nothing to do
    grown = pa.array(sorted([*keys.to_pylist(), "/d/00000a.jpg"]), pa.large_string())
    work = units.plan([], grown, records)
    # The folder's later runs changed: they look for their done keys in the files of the units no longer listed.
    assert [u.end - u.start for u in work.units] == [1024, 1024, 453]
    orphans = tuple(f"part-{i}.parquet" for i in range(3))
    assert all(u.parts == orphans for u in work.units)


def test_the_writer_keeps_no_key_of_a_finished_unit(tmp_path):
    """No per-image structure in the driver: ten times the rows, in units of 500, leave the writer's Python memory
    as it was."""
    writer = LabelWriter(str(tmp_path / "out"), PROVENANCE, CommitPolicy(rows_per_file=5000, every_s=3600),
                         overwrite=False)
    tracemalloc.start()
    try:
        held = {}
        for unit in range(200):
            names = [f"s{unit:03d}.tar!{i:03d}.jpg" for i in range(500)]
            writer.add(rows(*names[:250], unit=f"s{unit:03d}.tar"))
            writer.add(rows(*names[250:], unit=f"s{unit:03d}.tar", total=500))
            if unit + 1 in (20, 200):
                held[unit + 1] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    writer.close()
    assert writer.files_written == 20 and not writer.ledger.taken
    assert held[200] - held[20] < 2 * 90_000, held  # under 2 bytes per row; a set of the keys takes over 100


def test_listing_keeps_its_keys_in_arrow_not_as_python_strings(tmp_path):
    """A manifest of 400,000 lines peaks at the Python memory of one of 100,000 (each names its images twice): the
    listing and its de-duplication hold the keys in Arrow arrays."""
    peaks = {}
    for count in (50_000, 200_000):
        manifest = tmp_path / f"m{count}.txt"
        manifest.write_text("".join(f"/data/{i // 1000:04d}/{i:07d}.jpg\n" for i in range(count)) * 2)  # twice
        tracemalloc.start()
        try:
            listing = list_inputs([str(manifest)])
            peaks[count] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        last = f"/data/{(count - 1) // 1000:04d}/{count - 1:07d}.jpg"
        assert len(listing.files) == count and listing.files[count - 1].as_py() == last
    assert peaks[200_000] < peaks[50_000] + 2**20, peaks
