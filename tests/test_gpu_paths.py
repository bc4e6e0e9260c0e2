"""The GPU paths' rules and fallbacks, run on the CPU: the precision each GPU gets, training that resumes across
devices and train.amp values, which JPEGs nvjpeg is trusted with, what the decoder does with errors that are not
a file's, its memory bound, the files it sends to the CPU, and the predictor's batch halving on out-of-memory.
Out-of-memory and CUDA errors are injected through the decoder's and the predictor's own seams (their
decode call, their model), never by patching torch. None of these tests starts Ray."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.errors import UsageError
from pipeline.formats.labels_file import RowRules, output_schema
from pipeline.formats.model_spec import ModelSpec
from pipeline.hardware import gpu_half_precision
from pipeline.images import decode_with_size, jpeg_header
from pipeline.label import predictor
from pipeline.label.device_decoding import CROP_BYTES, DECODED_BYTES, DeviceDecoder, plain_jpeg
from pipeline.label.plan import model_payload, split_cpu_decoded
from pipeline.label.predictor import CPU_DECODED, Predictor
from pipeline.label.reading import Preprocess, encoded_rows
from pipeline.models import from_checkpoint
from pipeline.train.run_state import load_scaler
from pipeline.train.worker import choose_amp
from tests.helpers import DEMO_DATA, random_weight_state

SPEC = ModelSpec(arch="resnet18", head="fc", resize_size=72, input_size=64, interpolation="bilinear",
                 mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
OUT_OF_MEMORY = "Error while decoding JPEG images: CUDA out of memory. Tried to allocate 2.00 GiB"


# Precision on GPUs, for labeling and for training.

@pytest.mark.parametrize("capability, precision", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"),
                                                   ((8, 6), "bf16"), ((9, 0), "bf16"), (None, "bf16")])
def test_bf16_only_from_sm_80_on_and_fp16_before(capability, precision):
    chosen, why = gpu_half_precision(capability)
    assert chosen == precision
    if capability:
        assert f"sm_{capability[0]}{capability[1]}" in why


def test_train_amp_auto_follows_the_gpu_and_cpu_workers_train_in_fp32():
    assert choose_amp("auto", (7, 5))[0] == "fp16"
    assert choose_amp("auto", (9, 0)) == ("bf16", "this GPU (sm_90) computes bf16 natively")
    assert choose_amp("bf16", (7, 5)) == ("bf16", "as set") and choose_amp("off", (9, 0))[0] == "off"
    for amp in ("off", "auto", "bf16", "fp16"):
        assert choose_amp(amp, None) == ("off", "CPU workers train in fp32")


def test_a_run_resumes_with_a_scaler_state_of_any_kind():
    """CPU workers, bf16 and no AMP save a disabled GradScaler's state ({}); fp16 on a GPU an enabled one's. Each
    loads into the other kind (a CPU scaler stands for the GPU's here: the state is the same)."""
    disabled, enabled = torch.amp.GradScaler("cpu", enabled=False), torch.amp.GradScaler("cpu", init_scale=1024.0)
    with pytest.raises(RuntimeError, match="empty"):  # what restore() did before
        torch.amp.GradScaler("cpu").load_state_dict(disabled.state_dict())
    resumed = torch.amp.GradScaler("cpu", init_scale=1024.0)
    load_scaler(resumed, disabled.state_dict())  # CPU run -> fp16 on a GPU: a fresh scale
    assert resumed.state_dict()["scale"] == 1024.0
    enabled.scale(torch.ones(()))
    enabled.update(512.0)  # where the scale got to in the GPU run
    load_scaler(resumed, enabled.state_dict())  # fp16 -> fp16: the scale goes on
    assert resumed.state_dict()["scale"] == enabled.state_dict()["scale"] == 512.0
    load_scaler(disabled, enabled.state_dict())  # fp16 on a GPU -> CPU, bf16 or no AMP: nothing to load
    assert disabled.state_dict() == {}
    load_scaler(resumed, None)  # a checkpoint from before the scaler was saved


# Which JPEGs nvjpeg is trusted with.

def jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **options)
    return buffer.getvalue()


def photo(size=(320, 240), seed=0) -> Image.Image:
    """Smooth gradients and some noise: compresses like a photo, with stuffed 0xFF bytes in its scan data."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    pixels = np.stack([x * 255 / size[0], y * 255 / size[1], (x + y) * 127 / sum(size)], axis=2)
    return Image.fromarray((pixels + rng.normal(0, 12, pixels.shape)).clip(0, 255).astype(np.uint8))


def kinds_of_jpeg() -> dict[str, bytes]:
    image = photo()
    return {"baseline": jpeg(image, quality=90), "progressive": jpeg(image, quality=85, progressive=True),
            "4:4:4": jpeg(image, quality=95, subsampling=0), "optimized": jpeg(image, optimize=True),
            "gray": jpeg(image.convert("L")), "gray progressive": jpeg(image.convert("L"), progressive=True)}


def decodes_on_cpu(data: bytes) -> bool:
    try:
        decode_with_size(data)
    except Exception:
        return False
    return True


def test_whole_jpegs_and_real_photos_go_to_nvjpeg():
    for name, data in kinds_of_jpeg().items():
        assert plain_jpeg(data), name
    photos = sorted(DEMO_DATA.rglob("*.jpg"))
    assert len(photos) > 300 and all(plain_jpeg(p.read_bytes()) for p in photos if jpeg_header(p.read_bytes()))


def test_damaged_jpegs_that_the_cpu_rejects_never_go_to_nvjpeg():
    """The rule: a JPEG that the CPU path rejects is not plain, so the GPU path sends it to the CPU path, which
    gives it the same error row. Checked on named kinds of damage, then on 600 random ones (any JPEG the CPU
    rejects; some it accepts fail the rule too, and the CPU decodes them)."""
    data = kinds_of_jpeg()["baseline"]
    middle = len(data) // 2
    damaged = {
        "0xFF run into a bad marker": data[:middle] + b"\xff" * 40 + b"\xce" + data[middle + 41:],
        "frame of height 0": data.replace(b"\xff\xc0\x00\x11\x08\x00\xf0", b"\xff\xc0\x00\x11\x08\x00\x00", 1),
        "no end marker": data[:-2],
        "segment longer than the file": data[:20] + b"\xff\xfe\xff\xff" + data[20:],
    }
    for name, bad in damaged.items():
        assert not plain_jpeg(bad), name
    assert not decodes_on_cpu(damaged["0xFF run into a bad marker"])
    rng = random.Random(0)
    sources = list(kinds_of_jpeg().values())
    rejected = 0
    for _ in range(600):
        bad = bytearray(rng.choice(sources))
        at = rng.randrange(2, len(bad) - 2)
        if rng.random() < 0.5:  # the headers: tables, frame, scan
            bad[rng.randrange(2, min(len(bad) - 2, 700))] = rng.randrange(256)
        else:  # the scan data
            bad[at:at + rng.randrange(1, 40)] = bytes(rng.choice([0xFF, rng.randrange(256)]) for _ in range(40))
        bad = bytes(bad)
        if not decodes_on_cpu(bad):
            rejected += 1
            assert not plain_jpeg(bad), bad.hex()
    assert rejected > 50  # the damage is real


# The decoder, on the CPU (torchvision decodes with libjpeg-turbo there).

def batch_of(files: dict[str, bytes]) -> dict:
    """One block of encoded rows, as GPU actors' read tasks emit them."""
    return next(encoded_rows((name, data, None, None) for name, data in files.items()))


class Injected(DeviceDecoder):
    """A decoder whose decode call raises `error` on the calls that `when(tensors)` picks."""

    def __init__(self, *args, error="", when=lambda tensors: False, **kwargs):
        self.error, self.when, self.calls = error, when, []
        super().__init__(*args, **kwargs)

    def _decode_jpegs(self, tensors):
        self.calls.append(len(tensors))
        if self.when(tensors):
            raise RuntimeError(self.error)
        return super()._decode_jpegs(tensors)


def decoder(cls=DeviceDecoder, lines=None, **kwargs):
    log = lines.append if lines is not None else None
    return cls(SPEC, torch.device("cpu"), log=log, **kwargs)


def test_a_damaged_jpeg_is_an_error_row_as_on_the_cpu_path_and_counts_as_sent_to_the_cpu():
    good = kinds_of_jpeg()
    data = good["baseline"]
    bad = data[:len(data) // 2] + b"\xff" * 40 + b"\xce" + data[len(data) // 2 + 41:]
    assert jpeg_header(bad)  # the read task would hand it to the GPU
    png = io.BytesIO()
    photo().save(png, "PNG")
    files = {**good, "damaged": bad, "png": png.getvalue()}
    batch = batch_of(files)
    crops, cpu = decoder()(batch)
    rows = list(files)
    assert list(np.flatnonzero(cpu)) == [rows.index("damaged"), rows.index("png")]
    assert batch["error"][rows.index("damaged")].startswith("OSError") and batch["error_kind"][-2] == "decode"
    assert not crops[rows.index("damaged")].any() and crops[rows.index("png")].any()
    preprocess = Preprocess(SPEC, exact_decode=True)
    for name in good:  # libjpeg-turbo through torchvision and through PIL: the same pixels, up to resampling
        expected = torch.tensor(preprocess(files[name])[0]).float()
        assert (crops[rows.index(name)].float() - expected).abs().mean() < 2, name


def test_the_cpu_path_of_gpu_actors_decodes_at_full_size():
    """Provenance records exact decoding for GPU actors: their CPU path must decode at full size too."""
    cmyk = jpeg(photo((640, 480)).convert("CMYK"))
    crops, cpu = decoder()(batch_of({"cmyk": cmyk}))
    assert cpu.all()
    assert torch.equal(crops[0], torch.tensor(Preprocess(SPEC, exact_decode=True)(cmyk)[0]))
    assert not torch.equal(crops[0], torch.tensor(Preprocess(SPEC)(cmyk)[0]))  # reduced decoding differs


def test_chunks_stay_within_the_memory_bound_and_an_image_too_big_alone_goes_to_the_cpu():
    files = {f"p{i}": jpeg(photo((320 + 40 * i, 240), seed=i)) for i in range(6)}
    files["huge"] = jpeg(photo((1200, 900)))
    dec = decoder(Injected)
    dec.max_bytes = 3 * 320 * 240 * DECODED_BYTES + 520 * 240 * CROP_BYTES  # three or so small ones at a time
    batch = batch_of(files)
    area = batch["width"].astype(np.int64) * batch["height"]
    assert area[-1] * (DECODED_BYTES + CROP_BYTES) > dec.max_bytes
    crops, cpu = dec(batch)
    assert list(np.flatnonzero(cpu)) == [6] and crops.flatten(1).any(1).all()
    rows, chunks = list(range(6)), []
    while rows:
        chunk, rows = dec._next_chunk(rows, area)
        chunks.append(chunk)
        assert area[chunk].sum() * DECODED_BYTES + area[chunk].max() * CROP_BYTES <= dec.max_bytes
    assert dec.calls[1:] == [len(c) for c in chunks] and len(chunks) > 1  # calls[0]: the start-up check


def test_out_of_memory_in_decoding_makes_chunks_smaller_and_every_image_still_decodes():
    files = {f"p{i}": jpeg(photo(seed=i)) for i in range(5)}
    expected, _ = decoder()(batch_of(files))
    lines = []
    once = iter([True])
    dec = decoder(Injected, lines, error=OUT_OF_MEMORY, when=lambda tensors: len(tensors) > 1 and next(once, False))
    budget = dec.max_bytes
    crops, cpu = dec(batch_of(files))
    assert torch.equal(crops, expected) and not cpu.any()
    assert dec.max_bytes == dec._bytes(list(range(5)), 320 * 240 * np.ones(5, dtype=np.int64)) // 2 < budget
    assert len(lines) == 1 and "out of GPU memory decoding 5 images" in lines[0]
    # An image that does not fit even alone: chunks get smaller until it is alone, then the CPU decodes it.
    lines.clear()
    single = decoder(Injected, lines, error=OUT_OF_MEMORY,
                     when=lambda tensors: any(t.numel() == len(files["p3"]) for t in tensors))
    crops, cpu = single(batch_of(files))
    assert list(np.flatnonzero(cpu)) == [3] and crops.flatten(1).any(1).all() and len(lines) == 1
    assert single.calls[1] == 5 and single.calls[-1] == 1 and single.max_bytes < budget // 4


@pytest.mark.parametrize("error", ["CUDA error: an illegal memory access was encountered",
                                   "Error while decoding JPEG images: Failed to synchronize CUDA stream: 700"])
def test_errors_that_are_not_a_files_stop_the_actor(error):
    """A sticky CUDA error fails every file: it must not send them all to the actor's CPU."""
    dec = decoder(Injected, error=error)
    dec.when = lambda tensors: True  # armed after the start-up check
    with pytest.raises(RuntimeError, match="not because of a file"):
        dec(batch_of({"a": kinds_of_jpeg()["baseline"]}))


def test_a_file_nvjpeg_rejects_goes_to_the_cpu_and_the_rest_of_its_chunk_stays_on_the_device():
    files = kinds_of_jpeg()
    rejected = len(files["progressive"])
    dec = decoder(Injected, error="Error while decoding JPEG images: Failed to decode batch: 3",
                  when=lambda tensors: any(t.numel() == rejected for t in tensors))
    crops, cpu = dec(batch_of(files))
    assert list(np.flatnonzero(cpu)) == [1] and crops.flatten(1).any(1).all()
    assert dec.calls[1:] == [len(files)] + [1] * len(files)  # the batch, then one by one


def test_a_decoder_that_cannot_decode_at_all_stops_at_start_with_one_line(monkeypatch):
    def missing(self, tensors):
        raise RuntimeError("Couldn't load the image extension. If you built torchvision from source, make sure "
                           "libjpeg and libpng were found.")

    monkeypatch.setattr(DeviceDecoder, "_decode_jpegs", missing)
    with pytest.raises(UsageError, match="Couldn't load the image extension") as raised:
        decoder()
    assert "\n" not in str(raised.value)


# The predictor: files sent to the CPU, and batch halving on out-of-memory.

@pytest.fixture(scope="module")
def payload() -> dict:
    state = random_weight_state("mobilenet_v3_small", ["blue", "red"], input_size=64)
    return model_payload(state, from_checkpoint(state), "fp32", gpu=False)


class OutOfMemoryOnce:
    """The model, but the first `times` calls raise the GPU's out-of-memory error."""

    def __init__(self, model, times=1):
        self.model, self.left, self.batches = model, times, []

    def __call__(self, x):
        self.batches.append(len(x))
        if self.left:
            self.left -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return self.model(x)


def gpu_predictor(payload: dict, batch_size: int = 8) -> Predictor:
    return Predictor([payload], RowRules(top_k=2), threads=1, batch_size=batch_size, device_decode=True)


def test_out_of_memory_halves_the_batch_once_with_a_line_and_labels_alike(payload, capsys):
    files = {f"p{i}.jpg": jpeg(photo(seed=i)) for i in range(12)}
    expected = gpu_predictor(payload)(batch_of(files))
    p = gpu_predictor(payload)
    p.model = OutOfMemoryOnce(p.model)
    budget = p.decode.max_bytes
    got = p(batch_of(files))
    assert got.column("label").equals(expected.column("label"))
    assert np.allclose(got.column("score").to_numpy(), expected.column("score").to_numpy(), atol=1e-4)
    assert p.batch_size == 4 and p.decode.max_bytes == budget // 2 and p.model.batches == [8, 4, 4, 4]
    lines = [line for line in capsys.readouterr().err.splitlines() if "out of GPU memory" in line]
    assert len(lines) == 1 and "batches of 4 images" in lines[0]
    p.model.left = 1  # once only: a second one fails the actor, saying what to do
    with pytest.raises(RuntimeError, match="halved once already; pass a smaller --batch-size"):
        p(batch_of(files))


def test_files_decoded_on_the_cpu_are_a_column_and_a_line_past_a_few_percent(payload, capsys, monkeypatch):
    monkeypatch.setattr(predictor, "CPU_NOTICE_AFTER", 10)
    jpegs = {f"p{i}.jpg": jpeg(photo(seed=i)) for i in range(19)}
    p = gpu_predictor(payload)
    table = p(batch_of(jpegs))
    assert table.column_names[-1] == CPU_DECODED and not any(table.column(CPU_DECODED).to_pylist())
    assert "on its CPU" not in capsys.readouterr().err
    png = io.BytesIO()
    photo().save(png, "PNG")
    table = p(batch_of({"a.png": png.getvalue(), "b.png": png.getvalue(), "text.jpg": b"not an image"}))
    assert table.column(CPU_DECODED).to_pylist() == [True, True, True]
    assert table.column("error").to_pylist()[:2] == [None, None]
    assert (p.files, p.cpu_files) == (22, 3)
    p(batch_of({"c.png": png.getvalue()}))
    lines = [line for line in capsys.readouterr().err.splitlines() if "on its CPU" in line]
    assert len(lines) == 1 and "3 of its first 22 files (14%)" in lines[0]
    labels, count = split_cpu_decoded(table)  # what the job sums into its summary, and writes
    assert count == 3 and labels.schema == output_schema()
    assert split_cpu_decoded(labels) == (labels, 0)
