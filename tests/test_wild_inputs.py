"""Inputs from the wild, at the reader level and without Ray: every input gets a row (or, in training, a skip), and
none takes more than a bounded amount of memory, time or disk. Files are built at test time; memory bounds are
checked under RLIMIT_AS in a subprocess (tests.memory_limit), so a regression fails here instead of taking CI down."""

from __future__ import annotations

import bz2
import io
import lzma
import os
import signal
import struct
import tarfile
import tracemalloc
import zipfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
from PIL import Image

from jobs.cli import main
from pipeline import storage
from pipeline.formats.archives import Limits
from pipeline.formats.keys import Reader, escape, unescape
from pipeline.label import isolation
from pipeline.label.isolation import Attempts, Crashed, in_child
from pipeline.label.reading import CountedBy, Preprocess, ReadSettings, read_units
from pipeline.label.sources import list_inputs
from pipeline.label.units import UNIT_TOTAL, Unit
from pipeline.train import data as train_data
from pipeline.train.config import DataConfig
from tests.helpers import read_output
from tests.memory_limit import bounded_json

MiB = 2**20


def jpeg(colour=(200, 30, 30), size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()


def tar_bytes(members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def rows_of(reader: Reader, key: str) -> dict[str, tuple]:
    """member name -> (bytes, error, kind), and the archive's own row under ''."""
    return {item.key.partition("!")[2]: item[1:] for item in reader.archive_members(key)}


# Names that are not UTF-8.

LATIN1 = "caf\udce9.jpg"  # b"caf\xe9.jpg" as Python's file APIs give it


def test_names_that_are_not_utf8_get_escaped_keys_that_read_back(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(jpeg())
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.jpg"), "wb") as f:
        f.write(b"latin-1 named")
    (folder / "caf\u00e9 utf8.jpg").write_bytes(b"utf-8 named")

    keys = list_inputs([str(folder)]).files.to_pylist()
    assert keys == sorted([f"{folder}/caf\\xe9.jpg", f"{folder}/caf\u00e9 utf8.jpg", f"{folder}/ok.jpg"])
    pa.array(keys, pa.string())  # keys are valid UTF-8: they go into Parquet
    reader = Reader()
    assert reader.read(f"{folder}/caf\\xe9.jpg") == b"latin-1 named"
    assert reader.read_key(f"{folder}/caf\u00e9 utf8.jpg") == b"utf-8 named"  # valid UTF-8: the key is the name
    assert escape("caf\u00e9.jpg") == "caf\u00e9.jpg" and unescape(escape(LATIN1)) == LATIN1

    archive = tmp_path / "names.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:  # from a Latin-1 system
        info = tarfile.TarInfo("caf\u00e9.jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"tar"))
    key = f"{archive}!caf\\xe9.jpg"
    assert rows_of(reader, str(archive)) == {"caf\\xe9.jpg": (b"tar", None, None)}
    assert Reader().read_key(key) == b"tar"


# Sizes that lie.

def lying_zip(method: int, payload: bytes, declared: int = 100) -> bytes:
    """A zip whose headers declare `declared` bytes for bomb.jpg, whose compressed data is `payload`, and a small
    honest JPEG after it."""
    out, central, small = io.BytesIO(), [], jpeg()
    for member, method_, data, size, crc in (("bomb.jpg", method, payload, declared, 0),
                                             ("small.jpg", zipfile.ZIP_STORED, small, len(small), zlib.crc32(small))):
        offset = out.tell()
        encoded = member.encode()
        fields = (20, 0, method_, 0, 0, crc, len(data), size, len(encoded), 0)
        out.write(b"PK\x03\x04" + struct.pack("<5HL2L2H", *fields) + encoded + data)
        central.append(b"PK\x01\x02" + struct.pack("<6HL2L5H2L", 20, *fields, 0, 0, 0, 0, offset) + encoded)
    start = out.tell()
    out.write(b"".join(central))
    out.write(b"PK\x05\x06" + struct.pack("<4H2LH", 0, 0, 2, 2, out.tell() - start, start, 0))
    return out.getvalue()


def zeros_deflated(size: int) -> bytes:
    """Raw deflate of `size` zero bytes (a multiple of 1 MiB), built from one flushed MiB repeated: cheap at 2 GiB."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * (size // MiB) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def zeros_lzma_zip(size: int) -> bytes:
    """A zip LZMA member's data: version, properties' size, properties, then raw LZMA1."""
    filters = [{"id": lzma.FILTER_LZMA1, "preset": 1}]
    properties = lzma._encode_filter_properties(filters[0])
    c = lzma.LZMACompressor(lzma.FORMAT_RAW, filters=filters)
    body = b"".join(c.compress(bytes(16 * MiB)) for _ in range(size // (16 * MiB))) + c.flush()
    return struct.pack("<BBH", 9, 4, len(properties)) + properties + body


@pytest.mark.parametrize("method", ["deflate 2 GiB", "bzip2 128 MiB", "lzma 128 MiB", "stored 8 MiB"])
def test_a_zip_member_that_declares_100_bytes_costs_no_more_than_the_cap(tmp_path, method):
    size = {"deflate": 2 << 30, "bzip2": 128 * MiB, "lzma": 128 * MiB, "stored": 8 * MiB}[method.split()[0]]
    payload = {"deflate": lambda: zeros_deflated(size), "bzip2": lambda: bz2.compress(bytes(size), 1),
               "lzma": lambda: zeros_lzma_zip(size), "stored": lambda: bytes(size)}[method.split()[0]]()
    kind = {"deflate": zipfile.ZIP_DEFLATED, "bzip2": zipfile.ZIP_BZIP2, "lzma": zipfile.ZIP_LZMA,
            "stored": zipfile.ZIP_STORED}[method.split()[0]]
    bomb = tmp_path / "bomb.zip"
    bomb.write_bytes(lying_zip(kind, payload))
    assert bomb.stat().st_size < 10 * MiB
    rows = bounded_json(f"""
        reader = Reader(limits=Limits(member_bytes=2**20))
        print(json.dumps([[i.key.rpartition("!")[2], i.error, i.kind] for i in reader.archive_members({str(bomb)!r})]))
    """, extra_bytes=64 * MiB, timeout=60, setup="import json\nfrom pipeline.formats.keys import Reader, Limits")
    assert rows == [["bomb.jpg", "archive member inflates past the 1 MiB cap (--max-member-mb)", "too_large"],
                    ["small.jpg", None, None]]


def test_a_zip_member_past_100_to_1_is_too_large_whatever_its_size(tmp_path):
    bomb = tmp_path / "honest.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("flat.jpg", bytes(8 * MiB))  # honest headers, 8 MiB in 8 KiB: no photo compresses so
        archive.writestr("photo.jpg", jpeg())
    rows = rows_of(Reader(), str(bomb))
    assert rows["flat.jpg"] == (None, "archive member inflates over 100 times its compressed size", "too_large")
    assert rows["photo.jpg"] == (jpeg(), None, None)


# Compressed tars: by their bytes, skipped in linear time, within budgets, in flat memory.

def test_a_tar_that_is_really_bzip2_streams_and_skips_a_big_member_in_linear_time(tmp_path):
    shard = tmp_path / "shard.tar"  # named .tar, written as bzip2
    shard.write_bytes(bz2.compress(tar_bytes([("big.jpg", bytes(128 * MiB)), ("small.jpg", jpeg())]), 1))
    rows = bounded_json(f"""
        reader = Reader(limits=Limits(member_bytes=2**20))
        print(json.dumps({{i.key.rpartition("!")[2]: [i.error, i.kind, len(i.data or b"")]
                          for i in reader.archive_members({str(shard)!r})}}))
    """, extra_bytes=64 * MiB, timeout=60, setup="import json\nfrom pipeline.formats.keys import Reader, Limits")
    assert rows == {"big.jpg": ["archive member of 128 MiB is over the 1 MiB cap (--max-member-mb)", "too_large", 0],
                    "small.jpg": [None, None, len(jpeg())]}
    # read_key opens it by its bytes too (it once took any .tar for an uncompressed one)
    assert Reader().read_key(f"{shard}!small.jpg") == jpeg()


def test_an_archive_past_its_budgets_gives_the_rest_one_row(tmp_path):
    shard = tmp_path / "many.tar.gz"
    shard.write_bytes(tar_bytes([(f"{i:02d}.jpg", os.urandom(MiB // 2)) for i in range(8)], "w:gz"))
    rows = list(Reader(limits=Limits(archive_bytes=2 * MiB)).archive_members(str(shard)))
    assert 2 <= len(rows) - 1 <= 4 and all(row.error is None for row in rows[:-2])
    assert rows[-1] == (str(shard), None, "unreadable archive: archive inflates past 0.00195312 GiB "
                        "(--max-archive-gb); the rest is not read", "too_large")
    rows = list(Reader(limits=Limits(archive_members=3)).archive_members(str(shard)))
    assert [row.error for row in rows[:3]] == [None] * 3 and rows[3].kind == "too_large" and len(rows) == 4
    assert "over 3 members (--max-archive-members)" in rows[3].error


def test_memory_stays_flat_in_the_number_of_members(tmp_path):
    shard = tmp_path / "small-members.tar"
    shard.write_bytes(tar_bytes([(f"{i:06d}.jpg", b"x") for i in range(10_000)]))
    tracemalloc.start()
    count = sum(1 for _ in Reader().archive_members(str(shard)))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # tarfile would keep a TarInfo per member (about 1 KiB each: 10 MiB); a 16-byte digest each remains
    assert count == 10_000 and peak < 3 * MiB, peak


def test_duplicate_names_first_wins_everywhere_and_dot_slash_names_are_plain(tmp_path):
    first, second = jpeg((10, 10, 10)), jpeg((250, 250, 250))
    members = [("./ants/a.jpg", first), ("ants/a.jpg", second), ("./bees/b.jpg", first)]
    for name, mode in (("plain.tar", "w"), ("packed.tar.gz", "w:gz")):
        path = tmp_path / name
        path.write_bytes(tar_bytes(members, mode))
        assert rows_of(Reader(), str(path)) == {"ants/a.jpg": (first, None, None), "bees/b.jpg": (first, None, None)}
        assert Reader().read_key(f"{path}!ants/a.jpg") == first
    with zipfile.ZipFile(tmp_path / "dup.zip", "w") as archive:
        with pytest.warns(UserWarning, match="Duplicate name"):
            for data in (first, second):
                archive.writestr("ants/a.jpg", data)
    assert Reader().read_key(f"{tmp_path / 'dup.zip'}!ants/a.jpg") == first  # zipfile's own index keeps the last


def test_shards_packed_with_tar_c_dot_train_by_their_class_folders(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        (tmp_path / split / "000.tar").write_bytes(tar_bytes(
            [(f"./{cls}/{i}.jpg", jpeg()) for cls in ("ants", "bees") for i in range(2)]))
    found = train_data.scan(DataConfig(root=str(tmp_path)), lambda line: None)
    assert found.classes == ["ants", "bees"] and len(found.train) == 4


# Loose files and manifest lines.

def test_only_regular_files_are_read_and_the_size_cap_applies_to_loose_files(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "ok.jpg").write_bytes(jpeg())
    os.mkfifo(folder / "held.jpg")  # opened for reading, it would wait for a writer forever
    (folder / "zero.jpg").symlink_to("/dev/zero")  # read whole, it would never end
    (folder / "big.jpg").write_bytes(bytes(2 * MiB))
    (folder / "dir.jpg").mkdir()
    (folder / "dir.jpg" / "inner.jpg").write_bytes(jpeg())
    manifest = tmp_path / "list.txt"
    manifest.write_text("imgs/ok.jpg\nimgs/notes.md\n")
    listing = list_inputs([str(folder), str(manifest)])
    found = bounded_json(f"""
        from pipeline.label.reading import _read_files
        keys = {listing.files.to_pylist()!r}
        print(json.dumps({{os.path.relpath(i.key, {str(tmp_path)!r}): [i.error, i.kind]
                          for i in _read_files(Reader(limits=Limits(member_bytes=2**20)), keys)}}))
    """, extra_bytes=64 * MiB, timeout=60, setup="import json, os\nfrom pipeline.formats.keys import Reader, Limits")
    assert found == {
        "imgs/ok.jpg": [None, None], "imgs/dir.jpg/inner.jpg": [None, None],
        "imgs/held.jpg": ["not a regular file but a FIFO", "unsupported"],
        "imgs/zero.jpg": ["not a regular file but a character device", "unsupported"],
        "imgs/big.jpg": ["file of 1 MiB is over the 1 MiB cap (--max-member-mb)", "too_large"],
        "imgs/notes.md": ["not an image or archive name (.jpg .png ... .tar .zip)", "unsupported"],
    }


def test_a_local_path_with_zip_bang_in_it_is_a_file_not_a_member(tmp_path):
    odd = tmp_path / "photos.zip!old"
    odd.mkdir()
    (odd / "x.jpg").write_bytes(b"a file")
    assert Reader().read_key(str(odd / "x.jpg")) == b"a file"


# A unit that fails as a whole, and a decoder that crashes its process.

SPEC = SimpleNamespace(resize_size=16, input_size=16, interpolation="bilinear")


def archive_unit(path: Path) -> pa.Table:
    return pa.Table.from_pylist([Unit(str(path), str(path), start=0, end=0, prior=0, parts=()).row()])


def read_unit(path: Path, output: Path | None, **settings) -> list[dict]:
    reading = ReadSettings(SPEC, output and str(output), max_pixels=10**8, **settings)
    blocks = read_units(archive_unit(path), reading, [None])
    return [row for block in blocks for row in pa.table({k: v for k, v in block.items() if k != "pixels"}).to_pylist()]


def test_a_stream_that_breaks_mid_archive_is_decode_rows_and_its_unit_ends(tmp_path):
    data = tar_bytes([(f"{i}.jpg", jpeg((i * 40, 0, 0))) for i in range(4)], "w:bz2")
    broken = tmp_path / "broken.tar.bz2"
    broken.write_bytes(data[:len(data) // 2] + bytes(64) + data[len(data) // 2 + 64:])  # a corrupt block
    rows = read_unit(broken, tmp_path / "out")
    assert rows[-1]["path"] == str(broken) and rows[-1]["error_kind"] == "decode"
    assert rows[-1][UNIT_TOTAL] == len(rows)  # the unit's end rides on it: the writer records the unit as done
    assert {row["error_kind"] for row in rows} <= {"", "decode"}  # nothing a rerun would retry
    assert not (tmp_path / "out" / isolation.ATTEMPTS).exists() or not any((tmp_path / "out" / isolation.ATTEMPTS)
                                                                         .iterdir())  # the attempt finished


def crash(_):
    os.kill(os.getpid(), signal.SIGSEGV)


CRASHES = b"bytes that crash the decoder"


def crash_on(monkeypatch, data: bytes) -> None:
    """Preprocess's decoder, made to crash its process on `data` as a codec's native fault would."""
    decode = Preprocess.__call__
    monkeypatch.setattr(Preprocess, "__call__",
                        lambda self, given: crash(given) if given == data else decode(self, given))


def crashing_shard(tmp_path: Path) -> Path:
    shard = tmp_path / "s.tar"
    shard.write_bytes(tar_bytes([("a.jpg", jpeg()), ("b.jpg", b"not an image"), ("c.jpg", CRASHES)]))
    return shard


def careful_rows(rows: list[dict]) -> list[tuple[str, str, bool]]:
    return [(row["path"].rpartition("!")[2], row["error_kind"], "crashed its process" in row["error"]) for row in rows]


CAREFUL = [("a.jpg", "", False), ("b.jpg", "decode", False), ("c.jpg", "decode", True)]


def test_a_native_crash_costs_its_file_one_row_once_the_unit_crashed_twice(tmp_path, monkeypatch):
    with pytest.raises(Crashed, match=r"crashed its process \(signal 11\)"):
        in_child(crash, b"")
    assert in_child(len, b"abc") == 3
    with pytest.raises(ValueError, match="in the child"):
        in_child(lambda _: (_ for _ in ()).throw(ValueError("in the child")), b"")

    crash_on(monkeypatch, CRASHES)
    output, shard = tmp_path / "out", crashing_shard(tmp_path)
    attempts = Attempts(*storage.resolve(str(output)))
    assert [attempts.start(str(shard)), attempts.start(str(shard))] == [False, False]  # two crashed attempts
    rows = read_unit(shard, output)  # the third is careful: each file decoded in a child of its own
    assert careful_rows(rows) == CAREFUL
    assert not attempts.start(str(shard))  # the careful attempt finished: its count is gone
    isolation.clear(*storage.resolve(str(output)))
    assert not (output / isolation.ATTEMPTS).exists()


def test_a_pass_that_writes_nothing_counts_its_crashes_in_an_actor(ray_local, tmp_path, monkeypatch):
    """--calibration's pass has no output folder to count in: a PassAttempts actor counts, as label() runs it."""
    crash_on(monkeypatch, CRASHES)
    shard = crashing_shard(tmp_path)
    actor = ray_local.remote(num_cpus=0)(isolation.PassAttempts).remote()
    attempts = CountedBy(actor)
    assert [attempts.start(str(shard)), attempts.start(str(shard))] == [False, False]
    assert careful_rows(read_unit(shard, None, attempts=actor)) == CAREFUL
    assert not attempts.start(str(shard))
    ray_local.kill(actor)


# All of it in one `imgjobs label` run.

def png_header(width: int, height: int) -> bytes:
    """A PNG of a header declaring width × height and an empty data chunk: a few bytes, decoded never."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">2I5B", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", b"")


def test_one_label_run_over_every_kind_of_wild_input_gives_each_a_row_and_a_rerun_finishes(ray_local, small_checkpoint,
                                                                                            tmp_path, capsys):
    wild = tmp_path / "wild"
    wild.mkdir()
    (wild / "ok.jpg").write_bytes(jpeg())
    with open(os.path.join(os.fsencode(wild), b"caf\xe9.jpg"), "wb") as f:
        f.write(jpeg((0, 200, 0)))
    os.mkfifo(wild / "held.jpg")
    (wild / "zero.jpg").symlink_to("/dev/zero")
    (wild / "big.jpg").write_bytes(bytes(2 * MiB))
    (wild / "huge.png").write_bytes(png_header(100_000, 100_000))
    (wild / "names.tar").write_bytes(tar_bytes([("./ants/a.jpg", jpeg()), ("ants/a.jpg", b"a second a.jpg"),
                                                ("../up.jpg", jpeg()), ("\x1b[31mred.jpg", jpeg())]))
    (wild / "bomb.zip").write_bytes(lying_zip(zipfile.ZIP_DEFLATED, zeros_deflated(2 << 30)))
    (wild / "fake.tar").write_bytes(bz2.compress(tar_bytes([("big.jpg", bytes(16 * MiB)), ("small.jpg", jpeg())])))
    data = tar_bytes([(f"{i}.jpg", jpeg((i * 40, 0, 0))) for i in range(4)], "w:bz2")
    (wild / "broken.tar.bz2").write_bytes(data[:len(data) // 2] + bytes(64) + data[len(data) // 2 + 64:])
    manifest = tmp_path / "list.txt"
    manifest.write_text("wild/ok.jpg\nwild/readme.md\n")
    out = tmp_path / "out"
    args = ["label", "--checkpoint", small_checkpoint, "--input", str(wild), str(manifest), "--output", str(out),
            "--max-member-mb", "1"]

    assert main(args) == 0, capsys.readouterr()
    rows = {os.path.relpath(r["path"], wild): r["error_kind"] for r in read_output(out)}
    broken = {key: kind for key, kind in rows.items() if key.startswith("broken.tar.bz2")}
    assert rows == {
        "ok.jpg": None, "caf\\xe9.jpg": None, "held.jpg": "unsupported", "zero.jpg": "unsupported",
        "big.jpg": "too_large", "huge.png": "too_large", "readme.md": "unsupported",
        "names.tar!ants/a.jpg": None, "names.tar!../up.jpg": None, "names.tar!\x1b[31mred.jpg": None,
        "bomb.zip!bomb.jpg": "too_large", "bomb.zip!small.jpg": None,
        "fake.tar!big.jpg": "too_large", "fake.tar!small.jpg": None, **broken}
    assert broken["broken.tar.bz2"] == "decode" and set(broken.values()) <= {None, "decode"}
    assert "\x1b" not in capsys.readouterr().out  # names reach the console escaped

    assert main(args) == 0  # every unit was recorded as done: the rerun opens none of them
    said = capsys.readouterr().out
    assert " 0 labeled, 0 errors" in said and f"{len(rows)} already done" in said, said
