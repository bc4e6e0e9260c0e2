"""The torch Dataset over a training split: decoded, transformed images, and the files that did not decode."""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from pipeline.images import decode_image, image_error
from pipeline.train.data import image_reader
from pipeline.train.splits import Split


class ImageDataset(Dataset):
    """Yields (tensor, target, index), or (None, path, reason) for a file that does not decode."""

    def __init__(self, root: str, split: Split, transform, indices=None, keys: bool = False,
                 draft_size: int | None = None):
        """`draft_size`: big JPEGs decode at a reduced scale that keeps this many pixels on the short side."""
        self.root, self.keys, self.draft_size = root, keys, draft_size
        self._reader = (None, None)  # (pid, reader): DataLoader workers fork, and must not share open files
        self.split = split
        self.transform = transform
        self.indices = list(range(len(split))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        index = self.indices[i]
        path = self.split.paths[index]
        try:
            image = decode_image(self.read(path), self.draft_size)
        except Exception as e:  # one bad file must never stop training
            return None, path, image_error(e)
        return self.transform(image), self.split.targets[index], index


    def read(self, path: str) -> bytes:
        if self._reader[0] != os.getpid():
            self._reader = (os.getpid(), image_reader(self.root, self.keys))
        return self._reader[1](path)


def collate_skipping(samples):
    """Batch the good samples; hand back the skipped ones as {path: reason}."""
    good = [s for s in samples if s[0] is not None]
    skipped = {s[1]: s[2] for s in samples if s[0] is None}
    if not good:
        return None, None, None, skipped
    images, targets, indices = zip(*good)
    return torch.stack(images), torch.tensor(targets), torch.tensor(indices), skipped
