"""What training reads: an image folder tree (root/{train,val}/<class>/..., the layout torchvision's ImageFolder
reads) on local disk or any pyarrow filesystem, or a labels Parquet (from_labels), listed and checked before torch
loads (pipeline.train.dataset reads the images)."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.keys import Reader
from pipeline.train import from_labels
from pipeline.train.splits import Split, TrainingData


def scan(data) -> TrainingData:
    """The training data that data.root names (a DataConfig): a labels Parquet, or an image folder tree."""
    if from_labels.is_labels(data.root):
        return from_labels.scan_labels(data.root, data.min_score, data.val_fraction, data.split_seed)
    return scan_image_folder(data.root)


def image_reader(root: str, keys: bool) -> Callable[[str], bytes]:
    """path -> bytes for the paths of a split, in this process (a DataLoader worker opens its own files)."""
    if keys:
        path, query = storage.split_query(root)
        return Reader({storage.host(path): query} if query else {}).read_key
    fs, _ = storage.resolve(root)
    return lambda path: storage.read_bytes(fs, path)


def scan_image_folder(root: str) -> TrainingData:
    """List train/ and val/ and check they form a usable classification dataset."""
    fs, base = storage.resolve(root)
    splits = {}
    for split in ("train", "val"):
        info = fs.get_file_info(f"{base}/{split}")
        if info.type != pafs.FileType.Directory:
            raise UsageError(
                f"data.root: {root} has no {split}/ folder; expected {root}/train/<class>/*.jpg and "
                f"{root}/val/<class>/*.jpg"
            )
        splits[split] = _class_dirs(fs, f"{base}/{split}")
    classes = sorted(splits["train"])
    if len(classes) < 2:
        raise UsageError(f"data.root: {root}/train needs at least two class folders, found {classes or 'none'}")
    if sorted(splits["val"]) != classes:
        raise UsageError(
            f"data.root: val classes {sorted(splits['val'])} differ from train classes {classes}; "
            "give val/ the same class folders as train/"
        )
    folder = TrainingData(root, classes, Split([], []), Split([], []))
    for split, by_class in splits.items():
        target = getattr(folder, split)
        for index, name in enumerate(classes):
            files = by_class[name]
            if not files:
                raise UsageError(f"data.root: class folder {root}/{split}/{name} has no images; add images or "
                                 "remove it")
            target.paths += files
            target.targets += [index] * len(files)
    return folder


def _class_dirs(fs: pafs.FileSystem, split_dir: str) -> dict[str, list[str]]:
    entries = fs.get_file_info(pafs.FileSelector(split_dir))
    classes = {}
    for entry in entries:
        if entry.type == pafs.FileType.Directory and not entry.base_name.startswith("."):
            classes[entry.base_name] = list(storage.walk_images(fs, entry.path))
    return classes
