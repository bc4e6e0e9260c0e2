"""What a training worker's DataLoader iterates: decoded, transformed samples, and the ones that did not decode.

Loose files are read one by one in a fresh order each epoch (ImageDataset with EpochSampler). A split whose samples
all sit in archives is streamed shard by shard, WebDataset's way, through a shuffle buffer (ShardStream): no seek
per member, and compressed tars work. Both give every rank the same number of steps, and both can start an epoch
after its first steps, for a mid-epoch resume that trains the samples the interrupted run had not.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from pipeline.formats.keys import MEMBER_SEPARATOR, Reader, reason
from pipeline.images import decode_image
from pipeline.train.shards import member_class, shard_folder
from pipeline.train.splits import Layout, Split, TrainingData


class Samples:
    """What both datasets share: a reader per process (DataLoader workers fork, and must not share open files),
    and turning bytes into (tensor, target, key), or (None, key, reason, target) for a sample that does not read or
    decode (target -1 where its class is unknown)."""

    def __init__(self, root: str, split: Split, transform, draft_size: int | None = None):
        """`draft_size`: big JPEGs decode at a reduced scale that keeps this many pixels on the short side."""
        self.root, self.split, self.transform, self.draft_size = root, split, transform, draft_size
        self._reader = (None, None)

    @property
    def reader(self) -> Reader:
        if self._reader[0] != os.getpid():
            self._reader = (os.getpid(), Reader.for_root(self.root))
        return self._reader[1]

    def sample(self, key: str, target: int, data: bytes | None, error: str | None = None):
        if data is None:
            return None, key, error, target
        try:
            image = decode_image(data, self.draft_size)
        except Exception as e:  # one bad file must never stop training
            return None, key, reason(e), target
        return self.transform(image), target, key


class ImageDataset(Samples, Dataset):
    """A split's samples by index, each read by itself."""

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        key, target = self.split.key(index), self.split.target(index)
        try:
            data = self.reader.read_key(key)
        except Exception as e:
            return self.sample(key, target, None, reason(e))
        return self.sample(key, target, data)


class EpochSampler(Sampler):
    """DistributedSampler's contract (a seeded shuffle per epoch, padded by wrapping so that every rank takes the
    same number of samples, rank r taking every world-th) from a NumPy permutation rather than a Python list of 10⁸
    ints; `skip` starts the epoch after this rank's first samples. `shuffle=False` splits without padding (val:
    each sample counted once)."""

    def __init__(self, size: int, rank: int, world: int, seed: int = 0, shuffle: bool = True):
        self.size, self.rank, self.world, self.seed, self.shuffle = size, rank, world, seed, shuffle
        self.epoch = self.skip = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.rank, self.size, self.world)
        order = np.random.default_rng((self.seed, self.epoch)).permutation(self.size)
        total = math.ceil(self.size / self.world) * self.world
        return np.resize(order, total)[self.rank::self.world][self.skip:]  # resize repeats: the padding

    def __iter__(self) -> Iterator[int]:
        return map(int, self.indices())

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.size, self.world))
        return math.ceil(self.size / self.world) - self.skip


@dataclass(frozen=True)
class Share:
    """How a rank takes its share of a stream each epoch: rank `rank` of `world`, in batches of `batch_size`; with
    `shuffle` (train) in a fresh order each epoch from `seed`, through a shuffle buffer of `buffer` images."""

    rank: int
    world: int
    batch_size: int
    seed: int = 0
    buffer: int = 0
    shuffle: bool = True


class ShardStream(Samples, IterableDataset):
    """This rank's share of a split of archives, streamed shard by shard. Each epoch orders the shards afresh
    (train) and cuts the samples in that order into equal shares, one per rank, padded by wrapping as
    EpochSampler pads (val: in order, unpadded). A rank's DataLoader workers split its share in whole batches,
    so that their batches come in turn; each passes its samples through a shuffle buffer of `share.buffer`
    encoded images before decoding them. The rank's first `skip` samples (whole batches) are left out, without
    decoding.

    Samples come from the split's names and targets (Layout.LABELED_MEMBERS), or are every image member whose
    class (pipeline.train.shards.member_class) is one of `classes` (Layout.SHARD_FOLDERS)."""

    def __init__(self, root: str, split: Split, transform, draft_size: int | None, classes: list[str], share: Share):
        super().__init__(root, split, transform, draft_size)
        self.classes = {name: i for i, name in enumerate(classes)}
        self.rank, self.world, self.batch_size, self.seed = share.rank, share.world, share.batch_size, share.seed
        self.buffer, self.shuffle = share.buffer, share.shuffle
        self.epoch = self.skip = 0
        self._archive = self._class_members if split.layout is Layout.SHARD_FOLDERS else self._named_members

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def positions(self) -> tuple[int, int]:
        """This rank's samples, as positions [start, stop) in the epoch's order; positions past the end wrap."""
        size = len(self.split)
        if not self.shuffle:
            return self.rank * size // self.world, (self.rank + 1) * size // self.world
        per = math.ceil(size / self.world)
        return self.rank * per, (self.rank + 1) * per

    def __len__(self) -> int:
        start, stop = self.positions()
        return max(0, stop - start - self.skip)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        start, stop = self.positions()
        batches = math.ceil((stop - start) / self.batch_size)
        # Worker w takes batches w, w + workers, ... of the rank's epoch, as the DataLoader asks them in turn; as
        # a contiguous run of samples, so that it reads its own shards.
        mine = batches // workers + (worker < batches % workers)
        first = start + self.batch_size * (worker * (batches // workers) + min(worker, batches % workers))
        last = min(first + mine * self.batch_size, stop)
        done = len(range(worker, self.skip // self.batch_size, workers)) * self.batch_size  # its part of `skip`
        rng = random.Random(f"{self.seed}/{self.epoch}/{self.rank}/{worker}")
        stream = self._members(first, last)
        if self.shuffle and self.buffer > 1:
            stream = _shuffled(stream, self.buffer, rng)
        for position, (key, target, data, error) in enumerate(stream):
            if position >= done:
                yield self.sample(key, target, data, error)

    def _order(self) -> np.ndarray:
        n = len(self.split.sources)
        return np.random.default_rng((self.seed, self.epoch)).permutation(n) if self.shuffle else np.arange(n)

    def _members(self, first: int, last: int) -> Iterator[tuple]:
        """(key, target, bytes or None, error or None) of the samples at positions [first, last)."""
        order = self._order()
        counts = self.split.counts[order]
        ends = np.cumsum(counts)
        size = int(ends[-1]) if len(ends) else 0
        position = first
        while position < last and size:
            at = position % size
            s = int(np.searchsorted(ends, at, side="right"))
            begin = at - (int(ends[s]) - int(counts[s]))
            take = min(int(counts[s]) - begin, last - position)
            yield from self._archive(int(order[s]), begin, begin + take)
            position += take

    def _class_members(self, source: int, begin: int, end: int) -> Iterator[tuple]:
        """Samples [begin, end) of a shard of shard folders, in one pass over it: the image members of the
        classes, in stored order. A shard that yields fewer than its index counted (it broke, or changed, after it
        was indexed) gives failed samples of unknown class for the rest, so that every rank still takes the steps
        it was counted for: DDP's ranks must never fall out of step."""
        archive = self.split.sources[source].as_py()
        folder, seen, broken = shard_folder(self.split.folder, archive), 0, None
        for key, data, error, _ in self.reader.archive_members(archive, set()):
            if key == archive:
                broken = error
                continue
            target = self.classes.get(member_class(folder, key))
            if target is None:
                continue
            if seen >= begin:
                yield key, target, data, error
            seen += 1
            if seen == end:
                return
        for position in range(max(seen, begin), end):
            yield (f"{archive}{MEMBER_SEPARATOR}(indexed member {position + 1}, not read)", -1, None,
                   broken or "the shard holds fewer members than its index counted; it changed since")

    def _named_members(self, source: int, begin: int, end: int) -> Iterator[tuple]:
        """Samples [begin, end) of an archive whose members the split names, in one pass over it."""
        archive = self.split.sources[source].as_py()
        offset = int(self.split.offsets[source])
        wanted = dict(zip(self.split.names[offset + begin:offset + end].to_pylist(),
                          self.split.targets[offset + begin:offset + end].tolist()))
        prefix = archive + "!"
        broken = None
        for key, data, error, _ in self.reader.archive_members(archive, set()):
            if key == archive:
                broken = error
            target = wanted.pop(key[len(prefix):], None)
            if target is not None:
                yield key, target, data, error
            if not wanted:
                return
        for name, target in wanted.items():  # the table names members the archive lacks
            yield prefix + name, target, None, broken or "not in the archive"


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """WebDataset's shuffle: a buffer of `size` items, each drawn at random as a new one comes in."""
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def collate_skipping(samples):
    """Batch the good samples; hand back the skipped ones as {key: (reason, target)}: the audit keeps a row, with its
    given label, for every image that did not read or decode."""
    good = [s for s in samples if s[0] is not None]
    skipped = {s[1]: (s[2], s[3]) for s in samples if s[0] is None}
    if not good:
        return None, None, None, skipped
    images, targets, keys = zip(*good)
    return torch.stack(images), torch.tensor(targets), list(keys), skipped


def split_loader(data: TrainingData, split: str, transform, draft_size: int | None, share: Share, **loader_args):
    """(DataLoader, what orders its epochs) over rank `share.rank`'s share of a split: a split of files read file
    by file (EpochSampler), one of archives streamed (ShardStream)."""
    samples = getattr(data, split)
    args = dict(batch_size=share.batch_size, collate_fn=collate_skipping, **loader_args)
    if samples.layout is Layout.FILES:
        order = EpochSampler(len(samples), share.rank, share.world, share.seed, shuffle=share.shuffle)
        return DataLoader(ImageDataset(data.root, samples, transform, draft_size), sampler=order, **args), order
    stream = ShardStream(data.root, samples, transform, draft_size, data.classes, share)
    return DataLoader(stream, **args), stream
