"""What training reads, listed and checked before torch loads (pipeline.train.dataset reads the images):

- an image folder tree, root/{train,val}/<class>/... (the layout torchvision's ImageFolder reads);
- shard folders, root/{train,val}/*.tar with members in class folders (pipeline.train.shards);
- a labels Parquet (pipeline.train.from_labels).

Each on local disk or any pyarrow filesystem. The splits are Arrow and NumPy arrays (pipeline.train.splits).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.keys import Keys
from pipeline.train import from_labels, shards
from pipeline.train.splits import SPLITS, Split, TrainingData


def scan(data, line: Callable[[str], None] = print) -> TrainingData:
    """The training data that data.root names (a DataConfig)."""
    if from_labels.is_labels(data.root):
        return from_labels.scan_labels(data.root, data.min_score, data.val_fraction, data.split_seed)
    fs, base = storage.resolve(data.root)
    for split in SPLITS:
        if fs.get_file_info(f"{base}/{split}").type != pafs.FileType.Directory:
            raise UsageError(
                f"data.root: {data.root} has no {split}/ folder; expected {data.root}/{split}/<class>/*.jpg, shards "
                f"in {data.root}/{split}/, or a labels Parquet"
            )
    if shards.has_shards(data.root):
        return scan_shard_folders(data.root, line)
    return scan_image_folder(data.root)


def scan_shard_folders(root: str, line: Callable[[str], None]) -> TrainingData:
    indexes = {split: shards.scan_split(root, split, line) for split in SPLITS}
    classes_of = {split: set(pc.unique(index.filter(pc.greater(index["count"], 0))["class"]).to_pylist())
                  - {shards.OUTSIDE} for split, index in indexes.items()}
    classes = sorted(classes_of["train"])
    _check_classes(root, classes, sorted(classes_of["val"]), "class folders inside the shards")
    for split, index in indexes.items():
        outside = pc.sum(index.filter(pc.equal(index["class"], shards.OUTSIDE))["count"]).as_py() or 0
        if outside:
            line(f"warning: {outside} image(s) in the {split} shards sit in no class folder "
                 f"({split}/shard.tar!<class>/x.jpg); left out")
    return TrainingData(root, classes, *(shards.split_of(indexes[s], classes) for s in SPLITS))


def scan_image_folder(root: str) -> TrainingData:
    """List train/ and val/ and check they form a usable classification dataset."""
    fs, base, prefix = storage.resolve_keyed(root)
    by_split = {split: _class_dirs(fs, f"{base}/{split}") for split in SPLITS}
    classes = sorted(by_split["train"])
    _check_classes(root, classes, sorted(by_split["val"]), "class folders")
    splits = []
    for split in SPLITS:
        keys, targets = [], []
        for index, name in enumerate(classes):
            found = Keys()
            for path in storage.walk_images(fs, by_split[split][name]):
                found.append(prefix + path)
            files = found.sorted_unique()
            if not len(files):
                raise UsageError(f"data.root: class folder {root}/{split}/{name} has no images; add images or "
                                 "remove it")
            keys.append(files)
            targets.append(np.full(len(files), index, dtype=np.int16))
        splits.append(Split.from_keys(pa.chunked_array(keys).combine_chunks(), np.concatenate(targets)))
    return TrainingData(root, classes, *splits)


def _check_classes(root: str, train: list[str], val: list[str], what: str) -> None:
    if len(train) < 2:
        raise UsageError(f"data.root: {root}/train needs at least two {what}, found {train or 'none'}")
    if val != train:
        raise UsageError(f"data.root: val classes {val} differ from train classes {train}; give val/ the same "
                         f"{what} as train/")


def _class_dirs(fs: pafs.FileSystem, split_dir: str) -> dict[str, str]:
    return {e.base_name: e.path for e in fs.get_file_info(pafs.FileSelector(split_dir))
            if e.type == pafs.FileType.Directory and not e.base_name.startswith(".")}
