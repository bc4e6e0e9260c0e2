"""Decoding choices keep the labels. Reduced-size JPEG decoding (the default) agrees with full decoding
(`--exact-decode`) on the real full-resolution ants/bees photos and on 12-megapixel photos made from them, with a
trained checkpoint. GPU predictors' own decoding (device_decoding) agrees with the read tasks' decoding: on a CPU
here, where torchvision decodes with libjpeg-turbo; on a GPU, with nvjpeg, where there is one."""

from __future__ import annotations

import io

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from pipeline.formats import checkpoint
from pipeline.formats.keys import Reader
from pipeline.formats.labels_file import RowRules
from pipeline.formats.model_spec import ModelSpec
from pipeline.images import ORIENTATION, decode_image
from pipeline.label.device_decoding import orient
from pipeline.label.plan import model_payload
from pipeline.label.predictor import Predictor
from pipeline.label.reading import Preprocess, encoded_rows
from pipeline.models import from_checkpoint
from tests.corpus import make_corpus, sample_image

CLASSES = ["ants", "bees"]


def labels(model, spec: ModelSpec, paths: list, exact: bool) -> np.ndarray:
    """What the predictors compute from the read tasks' crops: /255, Normalize, the model's argmax."""
    preprocess = Preprocess(spec, exact_decode=exact)
    mean, std = (torch.tensor(k).view(1, 3, 1, 1) for k in (spec.mean, spec.std))
    out = []
    for start in range(0, len(paths), 16):
        pixels = np.stack([preprocess(p.read_bytes())[0] for p in paths[start:start + 16]])
        with torch.inference_mode():
            out.append(model(torch.from_numpy(pixels).float().div(255).sub(mean).div(std)).argmax(1).numpy())
    return np.concatenate(out)


@pytest.mark.ray
def test_reduced_size_decoding_agrees_with_full_decoding(demo_run, shared_hymenoptera, tmp_path):
    state = checkpoint.load(demo_run["best_checkpoint"])
    model = from_checkpoint(state)
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


def test_orient_turns_images_upright_as_pil_does():
    image = sample_image(size=(5, 3))  # not square, not symmetric
    raw = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[ORIENTATION] = orientation
        buf = io.BytesIO()
        image.save(buf, "PNG", exif=exif)  # lossless, so the pixels compare exactly
        upright = np.asarray(decode_image(buf.getvalue())).transpose(2, 0, 1)
        assert np.array_equal(orient(raw, orientation).numpy(), upright), orientation


@pytest.mark.parametrize("orientation, upright", [(1, (2000, 1000)), (3, (2000, 1000)), (6, (1000, 2000)),
                                                  (8, (1000, 2000))])
def test_reduced_decoding_reports_the_full_upright_size(orientation, upright):
    """The width and height columns give the photo's own upright size, not the reduced decode's."""
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    sample_image(size=(2000, 1000)).save(buf, "JPEG", exif=exif, quality=90)
    spec = ModelSpec(arch="resnet18", head="fc", mean=[0.5] * 3, std=[0.5] * 3, resize_size=256, input_size=224)
    reduced = decode_image(buf.getvalue(), draft_size=256)
    assert reduced.size == (upright[0] // 2, upright[1] // 2)  # decoded at half scale, then turned upright
    pixels, width, height = Preprocess(spec)(buf.getvalue())
    assert (width, height) == upright and pixels.shape == (3, 224, 224)
    assert Preprocess(spec, exact_decode=True)(buf.getvalue())[1:] == upright


def label_rows(predictor: Predictor, blocks) -> dict[str, dict]:
    return {row["path"]: row for block in blocks for row in predictor(block).to_pylist()}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])  # nvjpeg on a GPU
def test_predictors_decoding_on_their_device_label_as_read_tasks_do(ray_local, demo_run, shared_hymenoptera,
                                                                   tmp_path, device):
    """The predictor of GPU actors, fed the bytes that their read tasks emit, against the CPU actors' predictor fed
    decoded crops: the same error rows, sizes and labels, for real photos (one turned by EXIF), the odd files of
    the corpus (other formats and CMYK go to the CPU path, broken ones to error rows), and a JPEG whose header is
    fine but whose scan data is damaged (device_decoding.plain_jpeg sends it to the CPU path, which rejects it).
    The predictor says which files its CPU decoded."""
    corpus = make_corpus(tmp_path / "corpus")
    photos = sorted((shared_hymenoptera / "val").rglob("*.jpg"))[::8]
    with Image.open(photos[0]) as img:
        exif = Image.Exif()
        exif[ORIENTATION] = 6
        img.save(tmp_path / "turned.jpg", exif=exif, quality=92)
    damaged = bytearray(photos[1].read_bytes())
    damaged[len(damaged) // 2:len(damaged) // 2 + 40] = b"\xff" * 40
    (tmp_path / "damaged.jpg").write_bytes(bytes(damaged))
    keys = [str(p) for p in photos] + [str(tmp_path / "turned.jpg"), str(tmp_path / "damaged.jpg")]
    keys += [str(tmp_path / "corpus" / name) for name in corpus]

    def items():
        reader = Reader()
        for key in keys:
            try:
                yield key, reader.read(key), None, None
            except OSError as e:
                yield key, None, str(e), "io"

    state = checkpoint.load(demo_run["best_checkpoint"])
    spec = state["model"]
    payload = model_payload(state, from_checkpoint(state), "fp32", gpu=device == "cuda")
    on_cpu = Predictor([ray.put(payload)], RowRules(top_k=2), threads=2, batch_size=8)
    on_device = Predictor([ray.put(payload)], RowRules(top_k=2), threads=2, batch_size=8,
                          device_decode=True)
    expected = label_rows(on_cpu, Preprocess(spec, exact_decode=True).rows(items()))
    got = label_rows(on_device, encoded_rows(items()))
    assert set(got) == set(expected) == set(keys)
    errors = {k for k, r in expected.items() if r["error"]}
    assert str(tmp_path / "damaged.jpg") in errors and str(tmp_path / "corpus" / "truncated.jpg") in errors
    assert {k: (r["error"], r["error_kind"]) for k, r in got.items() if r["error"]} == \
        {k: (expected[k]["error"], expected[k]["error_kind"]) for k in errors}
    labeled = sorted(set(keys) - errors)
    assert [(got[k]["width"], got[k]["height"]) for k in labeled] == \
        [(expected[k]["width"], expected[k]["height"]) for k in labeled]
    on_cpu = {k for k, r in got.items() if r["cpu_decoded"]}
    assert {str(tmp_path / "damaged.jpg"), str(tmp_path / "corpus" / "cmyk.jpg")} <= on_cpu
    assert not on_cpu & {str(p) for p in photos}
    agree = np.mean([got[k]["label"] == expected[k]["label"] for k in labeled])
    assert agree >= 0.99 if device == "cpu" else agree >= 0.95  # nvjpeg's IDCT differs a little from libjpeg's
    scores = np.array([[got[k]["score"], expected[k]["score"]] for k in labeled])
    assert np.abs(scores[:, 0] - scores[:, 1]).max() < (0.02 if device == "cpu" else 0.1)
