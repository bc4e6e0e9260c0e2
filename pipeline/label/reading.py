"""Read and decode stage of `imgjobs label`: work units in, fixed-size uint8 CHW crops out.

Pixels travel as uint8 (a quarter of float32's bytes through Ray's object store); the predictor does
ToTensor's /255 and Normalize with the same tensor operations torchvision uses, so the model sees
exactly what `eval_transform` would give it. A file that cannot be read or decoded becomes a row with
`error` set and zero pixels: nothing here raises for bad data.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.actor import ActorHandle

from pipeline import storage
from pipeline.formats.archives import Limits
from pipeline.formats.keys import MEMBER_SEPARATOR, Item, Reader, content_kind, error_kind, reason
from pipeline.formats.model_spec import ModelSpec
from pipeline.images import MAX_PIXELS, decode_with_size, is_image_name, jpeg_header, resize_center_crop
from pipeline.label.isolation import Attempts, in_child
from pipeline.label.units import UNIT, UNIT_TOTAL, Unit

# Ray Data gathers a read task's output until it exceeds DataContext.target_max_block_size (128 MiB by default)
# before it passes any on, and slices what reaches 1.5 times that: a shard of 10,000 small crops would reach the
# predictors only once read whole. The job sets it to BLOCK_BYTES, and decoded blocks hold a little more than that
# (BLOCK_ROWS_BYTES), so each passes on as it is, as soon as it is decoded: 18 rows of 224-pixel crops, 214 of 64.
# Encoded files, up to several MB each, go 32 to a block (Ray slices the larger ones).
BLOCK_BYTES = 2 * 2**20
BLOCK_ROWS_BYTES = int(1.25 * BLOCK_BYTES)
ENCODED_ROWS_PER_BLOCK = 32


@dataclass(frozen=True)
class ReadSettings:
    """What every read task is given besides its units."""

    spec: ModelSpec  # the checkpoint's model spec: sizes and interpolation
    # The labels folder: a unit in progress finds its done keys there, and attempts are counted there. None for a
    # pass that writes nothing (--calibration's): its units are new, and `attempts` counts theirs.
    output: str | None
    options: dict[str, str] = field(default_factory=dict)  # the inputs' filesystem options by host (Listing.options)
    limits: Limits = Limits()
    max_pixels: int = MAX_PIXELS
    exact_decode: bool = False
    encoded: bool = False  # rows carry the files' bytes, for GPU actors to decode (encoded_rows), not crops
    attempts: ActorHandle | None = None  # an isolation.PassAttempts, where `output` is None


class Preprocess:
    def __init__(self, spec: ModelSpec, exact_decode: bool = False, max_pixels: int = MAX_PIXELS):
        self.resize_size, self.input_size, self.max_pixels = spec.resize_size, spec.input_size, max_pixels
        self.interpolation = spec.interpolation
        # A JPEG at least twice the resize size decodes at a reduced DCT scale (1/2 to 1/8) that keeps at least
        # resize_size pixels on the short side, so Resize still downsamples; only its anti-aliasing source differs.
        self.draft_size = None if exact_decode else self.resize_size

    def __call__(self, data: bytes) -> tuple[np.ndarray, int, int]:
        """(3×S×S uint8, width, height) where width and height are the upright image's full size."""
        img, width, height = decode_with_size(data, draft_size=self.draft_size, max_pixels=self.max_pixels)
        crop = resize_center_crop(img, self.resize_size, self.input_size, self.interpolation)
        return np.asarray(crop).transpose(2, 0, 1), width, height

    def rows(self, items: Iterator[Item], careful: bool = False) -> Iterator[dict]:
        """Blocks of decoded rows from (key, bytes, read error, its kind) items; `careful` decodes each in a forked
        child (isolation), for a unit whose earlier attempts crashed."""
        block, size = [], -(-BLOCK_ROWS_BYTES // (3 * self.input_size**2))  # rows of a little over BLOCK_BYTES
        for key, data, error, kind in items:
            pixels, width, height = None, 0, 0
            if error is None:
                try:
                    pixels, width, height = in_child(self, data) if careful else self(data)
                except Exception as e:  # any bad file becomes an error row; the job goes on
                    error, kind = reason(e), content_kind(e)
            block.append((key, pixels, width, height, error or "", kind or ""))
            if len(block) == size:
                yield self._block(block)
                block = []
        if block:
            yield self._block(block)

    def _block(self, rows: list) -> dict:
        blank = np.zeros((3, self.input_size, self.input_size), dtype=np.uint8)
        return {
            "path": np.array([r[0] for r in rows], dtype=object),
            "pixels": np.stack([blank if r[1] is None else r[1] for r in rows]),
            "width": np.array([r[2] for r in rows], dtype=np.int32),
            "height": np.array([r[3] for r in rows], dtype=np.int32),
            "error": np.array([r[4] for r in rows], dtype=object),  # "" means decoded
            "error_kind": np.array([r[5] for r in rows], dtype=object),
        }


def encoded_rows(items: Iterator[Item]) -> Iterator[dict]:
    """Blocks of undecoded rows, for predictors that decode on their GPU (pipeline.label.device_decoding): the
    bytes, and for JPEGs the GPU takes, the upright size and EXIF orientation from the header; orientation 0
    marks the files the predictor decodes on its CPU instead."""
    while True:
        rows = list(itertools.islice(items, ENCODED_ROWS_PER_BLOCK))
        if not rows:
            return
        headers = [jpeg_header(data) if data else None for _, data, _, _ in rows]
        yield {
            "path": np.array([r[0] for r in rows], dtype=object),
            "data": np.array([r[1] or b"" for r in rows], dtype=object),
            "width": np.array([h[0] if h else 0 for h in headers], dtype=np.int32),
            "height": np.array([h[1] if h else 0 for h in headers], dtype=np.int32),
            "orientation": np.array([h[2] if h else 0 for h in headers], dtype=np.int8),
            "error": np.array([r[2] or "" for r in rows], dtype=object),
            "error_kind": np.array([r[3] or "" for r in rows], dtype=object),
        }


def read_units(batch: pa.Table, reading: ReadSettings, files_ref: list) -> Iterator[dict]:
    """Ray Data map_batches function over units (units.Unit.row): a generator, so an archive's members stream out
    block by block. `files_ref` is [the object ref of the sorted loose-file keys] that loose units index. Every row
    carries its unit, and a unit's last row its total."""
    preprocess = Preprocess(reading.spec, reading.exact_decode, reading.max_pixels)
    # Once per task: a filesystem can cost a request.
    attempts = Attempts(*storage.resolve(reading.output)) if reading.output else CountedBy(reading.attempts)
    reader = Reader(reading.options, reading.limits)
    for unit in map(Unit.of_row, batch.to_pylist()):
        careful = attempts.start(unit.name)
        rows = encoded_rows if reading.encoded else functools.partial(preprocess.rows, careful=careful)
        held = AllButLast(_items(unit, reader, reading.output, files_ref))
        yield from _with_unit(rows(held), unit.name)
        if held.last is None and unit.archive and not unit.prior:
            held.last = Item(unit.archive, None, "no image members in it", "empty")  # its unit's total needs a row
        if held.last is not None:  # the unit's last row, in a block of its own: the unit's end rides on it
            yield from _with_unit(rows(iter([held.last])), unit.name, total=unit.prior + held.count + 1)
        attempts.finish(unit.name)


class CountedBy:
    """A pass's isolation.PassAttempts actor, called as an isolation.Attempts is."""

    def __init__(self, actor: ActorHandle):
        self.actor = actor

    def start(self, unit: str) -> bool:
        return ray.get(self.actor.start.remote(unit))

    def finish(self, unit: str) -> None:
        ray.get(self.actor.finish.remote(unit))


def _items(unit: Unit, reader: Reader, output: str | None, files_ref: list) -> Iterator[Item]:
    """The unit's inputs that the labels files of `output` do not hold yet."""
    if unit.archive:
        return reader.archive_members(unit.archive, done_keys(output, unit.parts, unit.archive, None))
    files = ray.get(files_ref[0])[unit.start : unit.end]
    done = done_keys(output, unit.parts, "", files)
    return _read_files(reader, [key for key in files.to_pylist() if key not in done])


def done_keys(output: str | None, parts: tuple[str, ...], archive: str, files: pa.Array | None) -> set[str]:
    """The keys of a unit in progress already in the labels files `parts` of `output`: the archive's own key and its
    members' (ARCHIVE!MEMBER), or those of `files`."""
    if not parts:
        return set()
    fs, base = storage.resolve(output)
    done = set()
    for name in parts:
        keys = pq.read_table(f"{base}/{name}", columns=["path"], filesystem=fs).column("path")
        if archive:
            mine = pc.or_(pc.starts_with(keys, archive + MEMBER_SEPARATOR), pc.equal(keys, archive))
        else:
            mine = pc.is_in(keys, value_set=files.cast(pa.string()))
        done.update(keys.filter(mine).to_pylist())
    return done


class AllButLast:
    """Iterates over `items` but their last, which it keeps in `last`; `count` is how many it gave."""

    def __init__(self, items: Iterator[Item]):
        self.items, self.last, self.count = items, None, 0

    def __iter__(self) -> Iterator[Item]:
        for item in self.items:
            if self.last is not None:
                self.count += 1
                yield self.last
            self.last = item


def _with_unit(blocks: Iterator[dict], unit: str, total: int = -1) -> Iterator[dict]:
    """The blocks with their unit's columns; `total` (the unit's rows in all, earlier runs' included) goes on the
    last row."""
    for block in blocks:
        n = len(block["path"])
        block |= {UNIT: np.full(n, unit, dtype=object), UNIT_TOTAL: np.full(n, -1, dtype=np.int64)}
        block[UNIT_TOTAL][-1] = total
        yield block


def _read_files(reader: Reader, keys: list[str]) -> Iterator[Item]:
    for key in keys:
        if not is_image_name(key):  # a manifest's line that names neither an image nor an archive: never opened
            yield Item(key, None, "not an image or archive name (.jpg .png ... .tar .zip)", "unsupported")
            continue
        try:
            yield Item(key, reader.read(key))
        except Exception as e:  # missing (manifest lines), unreadable, not a regular file, over the cap
            yield Item(key, None, reason(e), error_kind(e))
