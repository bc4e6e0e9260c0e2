"""The training data as both listers give it: classes, and train and val splits of keys with their targets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Split:
    paths: list[str]
    targets: list[int]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class TrainingData:
    root: str
    classes: list[str]
    train: Split
    val: Split
    keys: bool = False  # paths are keys (local paths, URIs, ARCHIVE!MEMBER) rather than paths in root's filesystem
