"""Training decodes big JPEGs at a reduced scale that still gives every crop the model's input in full pixels."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.images import decode_image
from pipeline.models import build_model
from pipeline.train.dataset import ImageDataset
from pipeline.train.splits import Split
from pipeline.train.transforms import CROP_RATIO, CROP_SCALE, decode_sizes


@pytest.fixture(scope="module")
def big_photo(shared_hymenoptera, tmp_path_factory):
    """A real photo upscaled to 12 MP (4000×3000), as phones take them."""
    source = decode_image(sorted((shared_hymenoptera / "train" / "bees").glob("*.jpg"))[0].read_bytes())
    folder = tmp_path_factory.mktemp("big")
    source.resize((4000, 3000), Image.BICUBIC).save(folder / "big.jpg", quality=90)
    return folder


def decoded_sizes(folder, draft_size):
    """The (width, height) that ImageDataset hands its transform."""
    dataset = ImageDataset(str(folder), Split.from_keys(pa.array([str(folder / "big.jpg")]), [0]),
                           transform=lambda img: img.size, draft_size=draft_size)
    return dataset[0][0]


def test_big_photos_decode_at_a_reduced_scale_that_keeps_every_crop_at_full_pixels(big_photo):
    spec = build_model("resnet18", 2, "none")[1]
    train_draft, val_draft = decode_sizes(spec)
    assert decoded_sizes(big_photo, None) == (4000, 3000)
    width, height = decoded_sizes(big_photo, train_draft)
    assert (width, height) == (2000, 1500)  # libjpeg's 1/2 scale: 1/4 would leave small crops short of 224 pixels
    assert decoded_sizes(big_photo, val_draft) == (500, 375)  # 1/8: Resize(256) still downscales
    # RandomResizedCrop's crops of the reduced image are never smaller than the model's input.
    reduced = Image.new("RGB", (width, height))
    torch.manual_seed(0)
    sides = [min(T.RandomResizedCrop.get_params(reduced, list(CROP_SCALE), list(CROP_RATIO))[2:])
             for _ in range(2000)]
    assert min(sides) >= spec.input_size, min(sides)


def test_a_crop_of_the_reduced_decode_matches_the_same_crop_of_the_full_decode(big_photo):
    """The same region (the smallest crop RandomResizedCrop makes) resized to 224 from either decode: the pixels
    differ by no more than DCT scaling's own smoothing (0.32 levels of 255 here; a 1/4 scale, one step too far,
    gives 0.70)."""
    spec = build_model("resnet18", 2, "none")[1]
    data = (big_photo / "big.jpg").read_bytes()
    full, reduced = decode_image(data), decode_image(data, decode_sizes(spec)[0])
    share = (CROP_SCALE[0] * CROP_RATIO[0]) ** 0.5
    crops = []
    for img in (full, reduced):
        w, h = img.size
        box = (0.4 * w, 0.4 * h, 0.4 * w + share * h, 0.4 * h + share * h)
        crops.append(np.asarray(img.resize((224, 224), Image.BILINEAR, box=box), dtype=np.float32))
    assert np.abs(crops[0] - crops[1]).mean() < 0.5, np.abs(crops[0] - crops[1]).mean()
