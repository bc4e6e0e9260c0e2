"""What training reads, listed and checked before torch loads (pipeline.train.dataset reads the images):

- an image folder tree, root/{train,val}/<class>/... (the layout torchvision's ImageFolder reads);
- shard folders, root/{train,val}/*.tar with members in class folders (pipeline.train.shards);
- a labels Parquet (pipeline.train.from_labels).

Each on local disk or any pyarrow filesystem. The splits are Arrow and NumPy arrays (pipeline.train.splits), and
each says how the workers read it (its Layout): scan tells the kinds apart, and nothing after it asks again.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats import audit_file
from pipeline.formats.keys import Keys, archive_kind
from pipeline.images import is_image_name
from pipeline.train import from_labels, shards
from pipeline.train.splits import SPLITS, Split, TrainingData


def scan(data, line: Callable[[str], None] = print) -> TrainingData:
    """The training data that data.root names (a DataConfig), less data.exclude's suspects."""
    found = scan_root(data, line)
    return without_suspects(found, data.exclude, line) if data.exclude else found


def scan_root(data, line: Callable[[str], None]) -> TrainingData:
    """The training data that data.root names: the one place that tells which kind it is."""
    if from_labels.is_labels(data.root):
        return from_labels.scan_labels(data.root, data.min_score, data.val_fraction, data.split_seed,
                                       data.accepted_only)
    fs, base = storage.resolve(data.root)
    for split in SPLITS:
        if fs.get_file_info(f"{base}/{split}").type != pafs.FileType.Directory:
            raise UsageError(
                f"data.root: {data.root} has no {split}/ folder; expected {data.root}/{split}/<class>/*.jpg, shards "
                f"in {data.root}/{split}/, or a labels Parquet"
            )
    return scan_image_folder(data.root) or scan_shard_folders(data.root, line)


def without_suspects(found: TrainingData, audit_dir: str, line: Callable[[str], None]) -> TrainingData:
    """The data less the images that the audit in `audit_dir` marks as suspects (imgjobs audit)."""
    suspects = audit_file.suspect_keys(audit_dir)
    if not len(suspects):
        line(f"data.exclude: {audit_dir} marks no image as a suspect; nothing left out")
        return found
    if not found.names_each_image():
        raise UsageError(f"data.exclude: the shard folders of {found.root} name no image one by one; relabel the "
                         "suspects instead (docs/training.md#auditing-the-labels) and train on that labels table")
    kept = {split: getattr(found, split).without(suspects) for split in SPLITS}
    left_out = {split: len(getattr(found, split)) - len(kept[split]) for split in SPLITS}
    if not sum(left_out.values()):
        raise UsageError(f"data.exclude: none of the {len(suspects)} suspects of {audit_dir} is in {found.root}; "
                         "name the audit of this data.root")
    line(f"data.exclude: left out {left_out['train']} train and {left_out['val']} val images that {audit_dir} marks "
         "as suspects")
    return TrainingData(found.root, found.classes, kept["train"], kept["val"])


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
    return TrainingData(root, classes, *(shards.split_of(indexes[s], classes, shards.split_dir(root, s))
                                         for s in SPLITS))


def scan_image_folder(root: str) -> TrainingData | None:
    """List train/ and val/ and check they form a usable classification dataset; None when train/ holds shards
    (an archive anywhere in it), told apart in the same listing: on object stores a million keys take minutes to
    list, and must not be listed twice."""
    fs, base, prefix = storage.resolve_keyed(root)
    entries = {split: fs.get_file_info(pafs.FileSelector(f"{base}/{split}")) for split in SPLITS}
    if any(e.type == pafs.FileType.File and archive_kind(e.base_name) for e in entries["train"]):
        return None
    by_split = {split: _class_dirs(entries[split]) for split in SPLITS}
    classes = sorted(by_split["train"])
    train = [_class_images(fs, prefix, by_split["train"][name], archives_too=True) for name in classes]
    if any(found is None for found in train):
        return None
    _check_classes(root, classes, sorted(by_split["val"]), "class folders")
    val = [_class_images(fs, prefix, by_split["val"][name]) for name in classes]
    splits = []
    for split, found in zip(SPLITS, (train, val)):
        for name, files in zip(classes, found):
            if not len(files):
                raise UsageError(f"data.root: class folder {root}/{split}/{name} has no images; add images or "
                                 "remove it")
        targets = [np.full(len(files), index, dtype=np.int16) for index, files in enumerate(found)]
        splits.append(Split.from_keys(pa.chunked_array(found).combine_chunks(), np.concatenate(targets)))
    return TrainingData(root, classes, *splits)


def _class_images(fs: pafs.FileSystem, prefix: str, folder: str, archives_too: bool = False) -> pa.Array | None:
    """The sorted keys of the images under `folder`; with `archives_too`, None as soon as it holds an archive."""
    found = Keys()
    wanted = (lambda name: is_image_name(name) or archive_kind(name)) if archives_too else is_image_name
    for path in storage.walk(fs, folder, wanted):
        if archives_too and archive_kind(path):
            return None
        found.append(prefix + path)
    return found.sorted_unique()


def _check_classes(root: str, train: list[str], val: list[str], what: str) -> None:
    if len(train) < 2:
        raise UsageError(f"data.root: {root}/train needs at least two {what}, found {train or 'none'}")
    if val != train:
        raise UsageError(f"data.root: val classes {val} differ from train classes {train}; give val/ the same "
                         f"{what} as train/")


def _class_dirs(entries: list[pafs.FileInfo]) -> dict[str, str]:
    return {e.base_name: e.path for e in entries
            if e.type == pafs.FileType.Directory and not e.base_name.startswith(".")}
