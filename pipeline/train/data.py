"""ImageFolder datasets (root/{train,val}/<class>/...) on local disk or any pyarrow filesystem."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs
import torch
from torch.utils.data import Dataset

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.images import decode_image, image_error


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


class ImageDataset(Dataset):
    """Yields (tensor, target, index), or (None, path, reason) for a file that does not decode."""

    def __init__(self, root: str, split: Split, transform, indices=None):
        self.fs, _ = storage.resolve(root)
        self.split = split
        self.transform = transform
        self.indices = list(range(len(split))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        path = self.split.paths[index]
        try:
            image = decode_image(storage.read_bytes(self.fs, path))
        except Exception as e:  # one bad file must never stop training
            return None, path, image_error(e)
        return self.transform(image), self.split.targets[index], index


def collate_skipping(samples):
    """Batch the good samples; hand back the skipped ones as {path: reason}."""
    good = [s for s in samples if s[0] is not None]
    skipped = {s[1]: s[2] for s in samples if s[0] is None}
    if not good:
        return None, None, None, skipped
    images, targets, indices = zip(*good)
    return torch.stack(images), torch.tensor(targets), torch.tensor(indices), skipped
