"""The training data as every lister gives it: classes, and train and val splits held as Arrow and NumPy arrays,
never as a Python object per sample, so that a split of 10⁸ samples stays a few bytes each in the driver and in
every worker (which get it through Ray's object store, not their arguments).

A split's samples are grouped by source: a folder of loose files, or an archive. Samples of a source sit together,
so a sample's source is found from `offsets` (dictionary encoding by run): a sample costs its name and its target.
A split of shard folders holds no names at all: a shard's image members are its samples, in the order the shard
stores them, and each takes its class from its folder (pipeline.train.shards).

How a split is read (its Layout) is decided once, by the lister that makes it (pipeline.train.data.scan).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from enum import Enum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.formats.keys import MEMBER_SEPARATOR, TAR_SUFFIXES, ZIP_SUFFIX, archive_kind

SPLITS = ("train", "val")
# keys.split_member as a regex: the shortest prefix that names an archive, then the separator
ARCHIVE_MEMBER = (f"(?i)^(?P<source>.*?(?:{'|'.join(re.escape(s) for s in (*TAR_SUFFIXES, ZIP_SUFFIX))}))"
                  f"{re.escape(MEMBER_SEPARATOR)}(?P<name>.+)$")


class Layout(Enum):
    """How a training worker reads a split's samples."""

    FILES = "files"  # each by its key: an image folder tree, or a labels table of files (or members of plain tars)
    SHARD_FOLDERS = "shard folders"  # streamed shard by shard: every image member in a class's folder
    LABELED_MEMBERS = "labeled members"  # streamed shard by shard: the archive members a labels table names


@dataclass
class Split:
    sources: pa.Array  # string: folders of loose files, or archives, each once
    counts: np.ndarray  # int64 per source: its samples
    names: pa.Array | None = None  # per sample: a file name in its folder, or a member name; None: shard folders
    targets: np.ndarray | None = None  # int16 per sample, None for shard folders (the member's folder says)
    layout: Layout = Layout.FILES
    folder: str = ""  # shard folders: the key of data.root/<split>; a shard's folder below it is a class

    def __post_init__(self):
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def source_of(self, index: int) -> int:
        return int(np.searchsorted(self.offsets, index, side="right")) - 1

    def key(self, index: int) -> str:
        """Sample `index`'s key (pipeline.formats.keys): FOLDER/NAME, or ARCHIVE!MEMBER."""
        source = self.sources[self.source_of(index)].as_py()
        separator = MEMBER_SEPARATOR if archive_kind(source) else "/"
        return f"{source}{separator}{self.names[index].as_py()}"

    def target(self, index: int) -> int:
        return int(self.targets[index])

    def keys(self) -> Iterator[str]:
        return map(self.key, range(len(self)))

    def key_array(self) -> pa.Array:
        """Every sample's key, as `key` gives it, in one Arrow array (a named split: shard folders name none)."""
        source = self._source_indices()
        separators = pa.array([MEMBER_SEPARATOR if archive_kind(s) else "/" for s in self.sources.to_pylist()])
        parts = [self.sources.take(source), separators.take(source), self.names]
        return pc.binary_join_element_wise(*(part.cast(pa.large_string()) for part in parts),
                                           pa.scalar("", pa.large_string()))

    def without(self, keys: pa.Array) -> Split:
        """This split less the samples whose keys are in `keys` (a named split: shard folders name none)."""
        table = pa.table({"source": pa.DictionaryArray.from_arrays(self._source_indices(), self.sources),
                          "name": self.names, "target": self.targets})
        kept = table.filter(pc.invert(pc.is_in(self.key_array(), keys)))
        return replace(Split.from_table(kept), layout=self.layout, folder=self.folder)

    def _source_indices(self) -> np.ndarray:
        """Each sample's source, as its index in `sources`."""
        return np.repeat(np.arange(len(self.counts), dtype=np.int32), self.counts)

    @classmethod
    def from_keys(cls, keys: pa.Array, targets: np.ndarray) -> Split:
        """A split of keys (loose paths and ARCHIVE!MEMBER keys), read as `with_layout` decides."""
        parts = split_keys(keys)
        return with_layout(cls.from_table(pa.table({"source": parts.field("source"), "name": parts.field("name"),
                                                    "target": np.asarray(targets, dtype=np.int16)})))

    @classmethod
    def from_table(cls, table: pa.Table) -> Split:
        """A split of a table's (source, name, target) rows; `source` may be dictionary-encoded."""
        table = sort_by_source(table)
        source = table["source"].combine_chunks()
        if pa.types.is_dictionary(source.type):  # runs of indices, named by their dictionary values
            runs = pc.run_end_encode(source.indices)
            sources = source.dictionary.take(runs.values)
        else:
            runs = pc.run_end_encode(source)
            sources = runs.values
        counts = np.diff(runs.run_ends.to_numpy().astype(np.int64), prepend=0)
        return cls(sources.cast(pa.string()), counts, table["name"].combine_chunks(),
                   table["target"].to_numpy().astype(np.int16))


@dataclass
class TrainingData:
    root: str
    classes: list[str]
    train: Split
    val: Split

    def names_each_image(self) -> bool:
        """Whether every image has a key of its own: shard folders name none (their members are read by class)."""
        return all(getattr(self, split).layout is not Layout.SHARD_FOLDERS for split in SPLITS)


def with_layout(split: Split) -> Split:
    """A named split whose samples are all archive members is streamed shard by shard, which compressed tars need;
    one with loose files among them is read file by file."""
    sources = split.sources.to_pylist()
    if sources and all(archive_kind(s) for s in sources):
        return replace(split, layout=Layout.LABELED_MEMBERS)
    return split


def split_keys(keys: pa.Array) -> pa.StructArray:
    """(source, name) of each key: ARCHIVE!MEMBER at the first '!' that follows an archive's name, else a
    folder and a file name."""
    member = pc.extract_regex(keys, ARCHIVE_MEMBER)
    loose = pc.extract_regex(keys, r"^(?P<source>.*)/(?P<name>[^/]+)$")
    return pc.if_else(pc.is_valid(member), member, loose)


def sort_by_source(table: pa.Table) -> pa.Table:
    """Rows sorted by source, then name. Arrow cannot sort a dictionary-encoded column, so a dictionary `source`
    sorts by the rank of each row's value among the dictionary's."""
    source = table["source"].combine_chunks()
    if pa.types.is_dictionary(source.type):
        rank = np.empty(len(source.dictionary), dtype=np.int32)
        rank[pc.sort_indices(source.dictionary).to_numpy()] = np.arange(len(rank), dtype=np.int32)
        order = pa.table({"source": rank[source.indices.to_numpy()], "name": table["name"]})
    else:
        order = table.select(["source", "name"])
    return table.take(pc.sort_indices(order, [("source", "ascending"), ("name", "ascending")]))
