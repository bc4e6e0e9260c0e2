"""`imgjobs label` end to end on real Ray, real images and real Parquet."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import pipeline
from jobs.cli import main
from pipeline.formats import checkpoint
from pipeline.hardware import native_bf16
from pipeline.images import decode_image, resize_center_crop
from pipeline.label.plan import model_payload
from pipeline.label.predictor import torchscript_model
from pipeline.models import build_model, from_checkpoint
from pipeline.train.transforms import eval_transform
from tests.corpus import make_corpus
from tests.helpers import REPO, HeldImage, label_files, make_image_folder, random_weight_state, read_output, start_label

CLASSES = ["blue", "red"]


def reference_probs(ckpt: str, paths: list) -> np.ndarray:
    """The plain PyTorch way: PIL decode, torchvision eval transform, eager fp32 forward."""
    state = checkpoint.load(ckpt)
    spec = state["model"]
    tf = eval_transform(spec)
    x = torch.stack([tf(decode_image(Path(p).read_bytes())) for p in paths])
    with torch.inference_mode():
        return from_checkpoint(state)(x).softmax(1).numpy()


def test_mixed_inputs_broken_files_and_labels_equal_plain_pytorch(ray_local, small_checkpoint, tmp_path, capsys):
    folder = make_image_folder(tmp_path / "imgs", train_per_class=6, val_per_class=0) / "train"
    corpus = make_corpus(tmp_path / "corpus")
    (tmp_path / "corpus" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")  # unreadable: no target
    corpus["dangling.jpg"] = "error"
    bad = [name for name, expect in corpus.items() if expect == "error"]
    odd = [name for name, expect in corpus.items() if expect == "ok"]
    shard = tmp_path / "shard.tar.gz"
    with tarfile.open(shard, "w:gz") as tar:
        tar.add(folder / "red" / "red_000.jpg", arcname="../up/red_000.jpg")
        tar.add(tmp_path / "corpus" / "text.jpg", arcname="inner/text.png")
    manifest = tmp_path / "list.txt"
    manifest.write_text("imgs/train/blue/blue_000.jpg\nimgs/train/blue/missing.jpg\n")
    out = tmp_path / "out"
    args = ["label", "--checkpoint", small_checkpoint, "--output", str(out), "--top-k", "2", "--min-confidence", "0.7",
            "--rows-per-file", "7", "--batch-size", "4",
            "--input", f"file://{folder}", str(tmp_path / "corpus"), str(shard), str(manifest)]
    assert main(args) == 0

    rows = {r["path"]: r for r in read_output(out)}
    images = sorted(str(p) for p in folder.rglob("*.jpg"))
    expected_keys = (
        {f"file://{p}" for p in images}
        | {str(tmp_path / "corpus" / n) for n in [*bad, *odd]}
        | {f"{shard}!../up/red_000.jpg", f"{shard}!inner/text.png"}
        | {str(tmp_path / "imgs/train/blue" / n) for n in ("blue_000.jpg", "missing.jpg")}  # the manifest's lines
    )
    assert set(rows) == expected_keys
    errors = {k for k, r in rows.items() if r["error"]}
    assert errors == {str(tmp_path / "corpus" / n) for n in bad} | {
        f"{shard}!inner/text.png", str(tmp_path / "imgs/train/blue/missing.jpg")}
    bomb = str(tmp_path / "corpus" / "bomb.png")
    assert "pixel cap (--max-pixels)" in rows[bomb]["error"] and rows[bomb]["error_kind"] == "too_large"
    unreadable = {str(tmp_path / "corpus" / "dangling.jpg"), str(tmp_path / "imgs/train/blue/missing.jpg")}
    assert {k for k in errors if rows[k]["error_kind"] == "io"} == unreadable
    assert all(rows[k]["error_kind"] == "decode" for k in errors - unreadable - {bomb})
    for key in errors:
        r = rows[key]
        assert "\n" not in r["error"] and r["label"] is None and r["label_index"] is None and r["score"] is None
    for key in expected_keys - errors:
        r = rows[key]
        assert r["label"] == CLASSES[r["label_index"]] == r["topk_labels"][0] and len(r["topk_scores"]) == 2
        assert r["score"] == r["topk_scores"][0] >= r["topk_scores"][1] and r["uncertain"] == (r["score"] < 0.7)
        assert r["width"] > 0 and r["height"] > 0

    # Same labels and scores as the plain PyTorch way, for plain photos and the odd modes alike.
    plain = images + [str(tmp_path / "corpus" / n) for n in odd]
    probs = reference_probs(small_checkpoint, plain)
    got = [rows[f"file://{p}" if p in images else p] for p in plain]
    assert [r["label_index"] for r in got] == probs.argmax(1).tolist()
    np.testing.assert_allclose([r["score"] for r in got], probs.max(1), atol=1e-4)

    summary = json.loads((out / "_summary.json").read_text())["runs"][-1]
    assert summary["total"] == len(rows) and summary["errors"] == len(errors)
    assert summary["labeled"] == len(rows) - len(errors) and summary["skipped_existing"] == 0
    assert summary["classes"] == CLASSES and summary["images_per_s"] > 0 and summary["checkpoint"] == small_checkpoint
    assert [pq.ParquetFile(f).metadata.num_rows for f in label_files(out)].count(7) == len(rows) // 7

    # Rerun: all but the unreadable rows are there; those are retried, fail again, and so are all this run did:
    # exit 1, and still one row per input. --overwrite: everything again, in fresh files.
    assert main(args) == 1
    first, again = json.loads((out / "_summary.json").read_text())["runs"]  # one entry per run
    assert first == summary and first["run_id"] != again["run_id"] and again["started"] >= first["ended"]
    assert again["skipped_existing"] == len(rows) - 2 and again["labeled"] == 0 and again["errors"] == 2
    assert again["io_errors"] == 2
    rerun_rows = read_output(out)
    assert len(rerun_rows) == len(rows) and {r["path"] for r in rerun_rows} == set(rows)

    # Every file says where its labels came from.
    weights_sha256 = hashlib.sha256(Path(small_checkpoint).read_bytes()).hexdigest()
    for part in label_files(out):
        provenance = json.loads(pq.read_schema(part).metadata[b"imgjobs"])
        assert provenance == {"imgjobs_version": pipeline.__version__, "checkpoint": small_checkpoint,
                              "weights_sha256": weights_sha256, "arch": "mobilenet_v3_small", "classes": CLASSES,
                              "precision": "auto", "decode": {"exact": False}, "top_k": 2, "min_confidence": 0.7,
                              "embeddings": None, "compute_precision": "bf16" if native_bf16() else "fp32",
                              "decode_device": "cpu"}

    # Resuming with other weights or options would mix two kinds of labels: refused before any work, one line.
    (tmp_path / "other").mkdir()
    retrained = random_weight_state("mobilenet_v3_small", CLASSES, input_size=64)
    retrained["model_state"]["classifier.3.bias"] += 0.1  # the same model, other weights
    other = checkpoint.save(retrained, str(tmp_path / "other"))
    capsys.readouterr()
    for change, named in ([["--precision", "bf16"], 'precision "auto" there, "bf16" now'],
                          [["--checkpoint", other], f'weights_sha256 "{weights_sha256[:18]}…'],
                          [["--min-confidence", "0.5"], "min_confidence 0.7 there, 0.5 now"]):
        assert main([*args, *change]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1 and "--overwrite to start over" in err, err
    assert len(json.loads((out / "_summary.json").read_text())["runs"]) == 2 and len(read_output(out)) == len(rows)

    assert main([*args, "--overwrite", "--precision", "bf16", "--exact-decode"]) == 0
    bf16 = {r["path"]: r for r in read_output(out)}
    assert set(bf16) == set(rows) and {k for k, r in bf16.items() if r["error"]} == errors
    provenance = json.loads(pq.read_schema(label_files(out)[0]).metadata[b"imgjobs"])
    assert provenance["precision"] == provenance["compute_precision"] == "bf16"
    assert provenance["decode"] == {"exact": True}
    assert len(json.loads((out / "_summary.json").read_text())["runs"]) == 1  # --overwrite starts over


def test_a_folder_of_shards_and_a_range_label_every_member_and_a_missing_shard_gets_an_error_row(
        ray_local, small_checkpoint, tmp_path, capsys):
    images = sorted((make_image_folder(tmp_path / "imgs", train_per_class=3, val_per_class=0) / "train").rglob("*.jpg"))
    shards = tmp_path / "shards"
    (shards / "more").mkdir(parents=True)
    for name, part in (("000000.tar", images[:2]), ("000002.tar", images[2:4])):
        with tarfile.open(shards / name, "w") as tar:
            for image in part:
                tar.add(image, arcname=f"{image.parent.name}/{image.name}")
    with zipfile.ZipFile(shards / "more" / "extra.zip", "w") as archive:
        for image in images[4:]:
            archive.write(image, f"{image.parent.name}/{image.name}")
    out = tmp_path / "out"
    # The folder lists the three archives; the range names two of them again, and a shard that is not there.
    assert main(["label", "--checkpoint", small_checkpoint, "--input", str(shards), f"{shards}/{{000000..000002}}.tar",
                 "--output", str(out), "--batch-size", "4"]) == 0
    assert "label: 0 image files and 4 archives listed" in capsys.readouterr().out
    rows = {r["path"]: r for r in read_output(out)}
    members = {f"{shards}/000000.tar!{p.parent.name}/{p.name}" for p in images[:2]}
    members |= {f"{shards}/000002.tar!{p.parent.name}/{p.name}" for p in images[2:4]}
    members |= {f"{shards}/more/extra.zip!{p.parent.name}/{p.name}" for p in images[4:]}
    missing = f"{shards}/000001.tar"
    assert set(rows) == members | {missing}
    assert not [key for key in members if rows[key]["error"]]
    assert rows[missing]["error_kind"] == "io" and "unreadable archive" in rows[missing]["error"]
    summary = json.loads((out / "_summary.json").read_text())["runs"][-1]
    assert summary["labeled"] == 6 and summary["errors"] == 1


def test_embeddings_are_the_pooled_features_and_equal_for_byte_identical_files(ray_local, small_checkpoint, tmp_path,
                                                                              capsys):
    folder = make_image_folder(tmp_path / "imgs", train_per_class=5, val_per_class=0) / "train"
    shutil.copy(folder / "red" / "red_000.jpg", folder / "red" / "zz_copy.jpg")  # a batch of its own, at the end
    (folder / "blue" / "broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["label", "--checkpoint", small_checkpoint, "--input", str(folder), "--output", str(out), "--batch-size",
            "4"]
    assert main([*args, "--embeddings"]) == 0
    rows = {Path(r["path"]).name: r for r in read_output(out)}
    assert len(rows["red_000.jpg"]["embedding"]) == 1024  # MobileNetV3-small's features before classifier.3
    assert rows["zz_copy.jpg"]["embedding"] == rows["red_000.jpg"]["embedding"] != rows["red_001.jpg"]["embedding"]
    assert rows["broken.jpg"]["embedding"] is None
    provenance = json.loads(pq.read_schema(label_files(out)[0]).metadata[b"imgjobs"])
    assert provenance["embeddings"] == 1024
    capsys.readouterr()
    assert main(args) == 2  # the files there have an embedding column
    assert "embeddings 1024 there, null now" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "0"], "--top-k 0: Input should be greater than or equal to 1"),
    (["--top-k", "3"], "--top-k 3 must be between 1"),
    (["--input", "no/such/dir"], "input no/such/dir not found"),
    (["--checkpoint", "pyproject.toml"], "checkpoint pyproject.toml"),
    (["--evaluate", "--input", str(REPO / "data" / "hymenoptera" / "val" / "ants")], "--evaluate: "),
])
def test_user_errors_are_one_line_exit_2_before_any_work(ray_local, small_checkpoint, tmp_path, capsys, extra,
                                                         message):
    out = tmp_path / "out"
    args = ["label", "--checkpoint", small_checkpoint, "--input", str(REPO / "data" / "hymenoptera" / "val"),
            "--output", str(out), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists() or not any(out.iterdir())


def test_checkpoint_whose_weights_do_not_fit_its_arch_is_exit_2(ray_local, small_checkpoint, tmp_path, capsys):
    state = checkpoint.load(small_checkpoint)
    state["model_state"] = build_model("resnet18", len(CLASSES), "none")[0].state_dict()
    wrong = checkpoint.save(state, str(tmp_path))
    out = tmp_path / "out"
    assert main(["label", "--checkpoint", wrong, "--input", str(REPO / "data/hymenoptera/val"),
                 "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "weights do not fit model.arch 'mobilenet_v3_small'" in err and err.count("\n") == 1
    assert not out.exists()


def test_read_crop_is_torchvision_resize_then_center_crop():
    reference = T.Compose([T.Resize(256), T.CenterCrop(224)])
    rng = np.random.default_rng(0)
    sizes = [(256, 256), (224, 300), (500, 375), (375, 500), (257, 1023), (1001, 333), (640, 480), (225, 225)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    images += [decode_image(p.read_bytes()) for p in sorted((REPO / "data/hymenoptera/val/bees").glob("*"))[:20]]
    for img in images:
        assert np.array_equal(np.asarray(resize_center_crop(img, 256, 224)), np.asarray(reference(img))), img.size


def test_read_workers_do_not_import_torch_and_predictors_not_torchvision():
    """Each is a process Ray starts per job: torch costs a read worker, torchvision or timm a predictor, seconds
    of start-up on a small machine."""
    code = ("import sys, pipeline.label.reading; assert 'torch' not in sys.modules; "
            "import pipeline.label.predictor; assert not {'torchvision', 'timm'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_cpu_and_gpu_payloads_hold_the_checkpoints_model(precision, tolerance):
    """CPU actors run the driver's TorchScript; GPU actors rebuild the model from the GPU payload, as
    predictor.eager_model does (here on the CPU: CI has no GPU). Both must compute the checkpoint's logits.
    ResNet18: its random-weight logits depend on the input (MobileNetV3's collapse to one value)."""
    state = random_weight_state("resnet18", CLASSES, input_size=64)
    gpu_payload = model_payload(state, from_checkpoint(state), precision, gpu=True)
    assert gpu_payload.device == "cuda" and gpu_payload.torchscript is None
    x = torch.rand(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    try:
        cpu_payload = model_payload(state, from_checkpoint(state), precision, gpu=False)
        scripted = torchscript_model(cpu_payload, batch_size=4)
        with torch.inference_mode():
            expected = from_checkpoint(state)(x)
            got = {"cpu": scripted(x).float(), "gpu": from_checkpoint(gpu_payload.trained)(x)}
    finally:
        torch.jit.enable_onednn_fusion(False)  # torchscript_model turns it on for the whole process
    for name, logits in got.items():
        error = (logits - expected).abs().max() / expected.abs().max()
        assert error <= tolerance, (name, error)


def test_kill_9_of_the_driver_then_rerun_labels_every_image_exactly_once(ray_local, small_checkpoint, s3_server,
                                                                           tmp_path):
    """Killed before its first file, after one and after three: the rerun labels the rest, once each. While a job
    runs, a second one into its output is refused, naming it; after a kill, the next one takes the dead job's lock
    over at once."""
    images = make_image_folder(tmp_path / "imgs", train_per_class=40, val_per_class=0)
    # Listed last, a unit of its own, this one keeps each job running until the test has killed it, however fast
    # the machine.
    held = HeldImage(s3_server, (images / "train" / "red" / "red_000.jpg").read_bytes())
    out = tmp_path / "out"
    args = ["--checkpoint", small_checkpoint, "--input", str(images), held.uri, "--output", str(out),
            "--rows-per-file", "8", "--batch-size", "4"]
    # Join the session's Ray instead of starting one per run; the killed driver's workers die with it.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    committed = 0

    def holds_the_lock(proc) -> bool:
        try:
            return json.loads((out / "_lock.json").read_text())["pid"] == proc.pid
        except (OSError, ValueError, KeyError):
            return False

    for new_files in (0, 1, 3):  # killed once the output folder exists but holds nothing, after one file, after three
        proc = start_label(args, env, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        # Blocks may bring several files at once: all 10 that the images before the held one fill may be there
        # already, so the last run is also waited for until it holds the lock, which the second job must find.
        while proc.poll() is None and time.time() < deadline and not (
            out.exists() and len(label_files(out)) >= min(committed + new_files, 10)
            and (new_files < 3 or holds_the_lock(proc))
        ):
            time.sleep(0.02)
        if new_files == 3:  # the last run: it goes on labeling meanwhile, up to the held image
            second = start_label(args, env)
            assert second.wait(timeout=120) == 2
            err = second.stderr.read()
            assert err.count("\n") == 1 and "is being written by label run " in err and f"pid {proc.pid})" in err
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        committed = len(label_files(out))
    (out / ".writing-part-left-over.parquet").write_bytes(b"half a file")  # what a kill mid-write leaves
    held.release()
    rerun = start_label(args, env, stderr=subprocess.STDOUT)
    try:
        said = rerun.communicate(timeout=300)[0]
    finally:
        held.close()
        if rerun.poll() is None:  # it failed: its actors must not hold the session's CPUs for the tests after it
            rerun.kill()
    assert rerun.returncode == 0, said
    assert "taking over the lock of label run" in said and f"its process {proc.pid} is gone" in said, said

    keys = [r["path"] for r in read_output(out)]
    assert sorted(keys) == sorted([*map(str, images.rglob("*.jpg")), held.key])  # no gaps and no duplicates
    assert not list(out.glob(".writing-*")) and not (out / "_lock.json").exists()
    summary = json.loads((out / "_summary.json").read_text())["runs"][-1]
    assert committed >= 4 and summary["skipped_existing"] == 8 * committed and summary["total"] == len(keys)
