"""Preprocessing presets (like torchvision's references/classification/presets.py), from a model's spec."""

from __future__ import annotations

import math

from torchvision import transforms as T

from pipeline.formats.model_spec import ModelSpec

# RandomResizedCrop's defaults, named: its smallest crop covers 8 % of the image, at aspect ratio 3/4.
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def interpolation(spec: ModelSpec) -> T.InterpolationMode:
    return T.InterpolationMode(spec.interpolation)


def train_transform(spec: ModelSpec) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(spec.input_size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=interpolation(spec)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def eval_transform(spec: ModelSpec) -> T.Compose:
    return T.Compose([
        T.Resize(spec.resize_size, interpolation=interpolation(spec)),
        T.CenterCrop(spec.input_size),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def decode_sizes(spec: ModelSpec) -> tuple[int, int]:
    """The short sides that JPEGs may decode at, for train_transform and eval_transform (images.decode_image's
    draft_size), so that no crop gets fewer pixels than the model's input: each side of RandomResizedCrop's
    smallest crop is at least sqrt(scale * ratio) of the image's short side, and Resize asks for resize_size."""
    return math.ceil(spec.input_size / math.sqrt(CROP_SCALE[0] * CROP_RATIO[0])), spec.resize_size
