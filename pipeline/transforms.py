"""Preprocessing presets (like torchvision's references/classification/presets.py)."""

from __future__ import annotations

from torchvision import transforms as T

RESIZE_SIZE = 256
CROP_SIZE = 224


def train_transform(mean, std, crop_size: int = CROP_SIZE) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(crop_size),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(mean, std, resize_size: int = RESIZE_SIZE, crop_size: int = CROP_SIZE) -> T.Compose:
    return T.Compose([
        T.Resize(resize_size),
        T.CenterCrop(crop_size),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])
