"""Reduced-size JPEG decoding (the default) keeps the labels of full decoding (`--exact-decode`), on the real
full-resolution ants/bees photos and on 12-megapixel photos made from them, with a trained checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.label.reading import Preprocess
from pipeline.train import checkpoint

CLASSES = ["ants", "bees"]


def labels(model, spec: dict, paths: list, exact: bool) -> np.ndarray:
    """What the predictors compute from the read tasks' crops: /255, Normalize, the model's argmax."""
    preprocess = Preprocess(spec, exact_decode=exact)
    mean, std = (torch.tensor(spec[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    out = []
    for start in range(0, len(paths), 16):
        pixels = np.stack([preprocess(p.read_bytes())[0] for p in paths[start:start + 16]])
        with torch.inference_mode():
            out.append(model(torch.from_numpy(pixels).float().div(255).sub(mean).div(std)).argmax(1).numpy())
    return np.concatenate(out)


@pytest.mark.slow
def test_reduced_size_decoding_agrees_with_full_decoding(demo_run, shared_hymenoptera, tmp_path):
    state = checkpoint.load(demo_run["best_checkpoint"])
    model = checkpoint.build_from(state)
    spec = state["model"]
    photos = sorted((shared_hymenoptera / "val").rglob("*.jpg"))
    big = []  # 12 MP, as phones take them: every third val photo, upscaled
    for path in photos[::3]:
        with Image.open(path) as img:
            size = (4000, 3000) if img.width >= img.height else (3000, 4000)
            big.append(tmp_path / path.name)
            img.convert("RGB").resize(size, Image.BICUBIC).save(big[-1], quality=90)
    class_of = {p.name: CLASSES.index(p.parent.name) for p in photos}
    assert len(class_of) == len(photos)
    for paths in (photos, big):
        truth = np.array([class_of[p.name] for p in paths])
        exact, reduced = labels(model, spec, paths, exact=True), labels(model, spec, paths, exact=False)
        assert (exact == reduced).mean() >= 0.99, (len(paths), (exact != reduced).sum())
        assert abs((exact == truth).mean() - (reduced == truth).mean()) <= 0.005
        assert (reduced == truth).mean() >= 0.9  # a trained model, so agreement means something
