"""Shard folders as training data: data.root/train/ and data.root/val/ hold .tar (plain, gzip, bzip2 or xz) or .zip
shards, as img2dataset and WebDataset write them, whose image members sit in class folders (`ants/0001.jpg`). A member
with no folder takes its class from the shard's own folder (`train/ants/shard-0001.tar`).

Workers stream whole shards (pipeline.train.dataset.ShardStream) and need only each shard's sample count to give
every rank the same steps. The counts come from a small index beside the shards, `_imgjobs_shards.parquet` (its
`_` keeps Parquet readers off it), written on first use; a later start reads only the shards it lacks, or whose
size changed.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats.keys import ARCHIVE_NAMES, Reader, archive_kind, split_member
from pipeline.train.splits import Layout, Split

INDEX = "_imgjobs_shards.parquet"
INDEX_SCHEMA = pa.schema([("shard", pa.string()), ("size", pa.int64()), ("class", pa.string()),
                          ("count", pa.int64())])
OUTSIDE = ""  # the index's class for members outside any class folder: counted, never trained on


def member_class(folder_of_shard: str, member_key: str) -> str:
    """The class of an archive member: its first folder inside the archive, else the shard's (shard_folder)."""
    folder, _, rest = split_member(member_key)[1].partition("/")
    return folder if rest else folder_of_shard


def shard_folder(split_key: str, shard: str) -> str:
    """The first folder a shard sits in below the split's folder (`split_key`): the class of its members
    that sit in no folder of their own."""
    folder, _, rest = shard[len(split_key) + 1:].partition("/")
    return folder if rest else OUTSIDE


def split_dir(root: str, split: str) -> str:
    """The key of `root`/`split`, which its shards' keys start with."""
    _, base, prefix = storage.resolve_keyed(root)
    return f"{prefix}{base}/{split}"


def scan_split(root: str, split: str, line: Callable[[str], None]) -> pa.Table:
    """The index of `root`/`split`'s shards (shard key, size, class, count), brought up to date and saved."""
    fs, base, prefix = storage.resolve_keyed(root)
    folder = f"{base}/{split}"
    found = list(storage.walk_sizes(fs, folder, archive_kind))  # a shard each: thousands, not millions
    listed = pa.table({"shard": [prefix + path for path, _ in found], "size": [size for _, size in found]},
                      schema=pa.schema([("shard", pa.string()), ("size", pa.int64())]))
    if not len(listed):
        raise UsageError(f"data.root: {root}/{split} holds no shards {ARCHIVE_NAMES}; put the {split} "
                         f"shards there, or use an image folder tree ({split}/<class>/*.jpg) throughout")
    index_path = f"{folder}/{INDEX}"
    known = _read_index(fs, index_path)
    current = known.join(listed, ["shard", "size"], join_type="inner") if len(known) else known
    stale = listed.filter(pc.invert(pc.is_in(listed["shard"], current["shard"].unique())))
    if len(stale):
        line(f"indexing {len(stale)} of {len(listed)} shards in {root}/{split} (once; the counts go to {INDEX})")
        reader = Reader.for_root(root)
        with ThreadPoolExecutor(8) as pool:  # reading, not decoding: the storage bounds it
            counted = list(pool.map(lambda row: _count(reader, prefix + folder, *row),
                                    zip(stale["shard"].to_pylist(), stale["size"].to_pylist())))
        current = pa.concat_tables([current.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA),
                                    pa.Table.from_pylist([r for rows in counted for r in rows], schema=INDEX_SCHEMA)])
        try:
            with fs.open_output_stream(index_path) as f:
                pq.write_table(current.sort_by("shard"), f)
        except OSError as e:  # a read-only bucket: training goes on, and the next start counts again
            line(f"warning: cannot write {root}/{split}/{INDEX} ({e}); the shards will be counted again at "
                 "each start")
    return current.sort_by("shard")


def split_of(index: pa.Table, classes: list[str], folder: str) -> Split:
    """The Split of an index of the shards in `folder` (split_dir): its shards in order, with the samples of the
    given classes each holds. Members of other classes stay in the stream but are left out (ShardStream skips
    them)."""
    wanted = index.filter(pc.is_in(index["class"], pa.array(classes)))
    shards = index["shard"].unique()
    grouped = wanted.group_by("shard").aggregate([("count", "sum")])
    counts = dict(zip(grouped["shard"].to_pylist(), grouped["count_sum"].to_pylist()))
    return Split(shards, np.array([counts.get(s, 0) for s in shards.to_pylist()], dtype=np.int64),
                 layout=Layout.SHARD_FOLDERS, folder=folder)


def _read_index(fs, path: str) -> pa.Table:
    try:
        with fs.open_input_file(path) as f:
            return pq.read_table(f).cast(INDEX_SCHEMA)
    except (FileNotFoundError, pa.ArrowInvalid, ValueError, KeyError):  # none yet, or not ours: counted again
        return INDEX_SCHEMA.empty_table()


def _count(reader: Reader, split_key: str, shard: str, size: int) -> list[dict]:
    """A shard's index rows: its image members by class; a shard that cannot be read counts none, and its
    stream will say why."""
    folder = shard_folder(split_key, shard)
    counts: dict[str, int] = {}
    for key, _, _, _ in reader.archive_members(shard, set()):
        if key != shard:  # the archive's own error row
            name = member_class(folder, key)
            counts[name] = counts.get(name, 0) + 1
    return [{"shard": shard, "size": size, "class": c, "count": n} for c, n in counts.items()] or \
        [{"shard": shard, "size": size, "class": OUTSIDE, "count": 0}]
