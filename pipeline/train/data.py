"""ImageFolder listing (root/{train,val}/<class>/...) on local disk or any pyarrow filesystem, checked before
torch loads (pipeline.train.dataset reads the images)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError


@dataclass
class Split:
    paths: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ImageFolder:
    root: str
    classes: list[str]
    train: Split
    val: Split


def scan_image_folder(root: str) -> ImageFolder:
    """List train/ and val/ and check they form a usable classification dataset."""
    fs, base = storage.resolve(root)
    splits = {}
    for split in ("train", "val"):
        info = fs.get_file_info(f"{base}/{split}")
        if info.type != pafs.FileType.Directory:
            raise UsageError(
                f"data.root: {root} has no {split}/ folder; expected {root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg"
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
    folder = ImageFolder(root, classes, Split([], []), Split([], []))
    for split, by_class in splits.items():
        target = getattr(folder, split)
        for index, name in enumerate(classes):
            files = by_class[name]
            if not files:
                raise UsageError(f"data.root: class folder {root}/{split}/{name} has no images; add images or remove it")
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
