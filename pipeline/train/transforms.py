"""Preprocessing presets (like torchvision's references/classification/presets.py), from a model's spec."""

from __future__ import annotations

from torchvision import transforms as T


def interpolation(spec: dict) -> T.InterpolationMode:
    return T.InterpolationMode(spec["interpolation"])


def train_transform(spec: dict) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(spec["input_size"], interpolation=interpolation(spec)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(spec["mean"], spec["std"]),
    ])


def eval_transform(spec: dict) -> T.Compose:
    return T.Compose([
        T.Resize(spec["resize_size"], interpolation=interpolation(spec)),
        T.CenterCrop(spec["input_size"]),
        T.ToTensor(),
        T.Normalize(spec["mean"], spec["std"]),
    ])
