"""Both jobs on S3 alone, against a real S3 API server on 127.0.0.1: the endpoint in pyarrow's URI query form
and in AWS_ENDPOINT_URL, training from S3 into S3, labeling an S3 prefix and an S3 tar into S3, a rerun, and
--evaluate."""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile

import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline import storage
from pipeline.train.config import DataConfig
from pipeline.train.data import scan
from pipeline.train.splits import Layout
from tests.helpers import make_image_folder, start_label, write_config


@pytest.fixture(scope="module")
def s3_run(ray_local, s3_server, tmp_path_factory) -> dict:
    """A 1-epoch training with data.root and storage.path on S3 (the endpoint in the URIs)."""
    tmp = tmp_path_factory.mktemp("s3run")
    folder = make_image_folder(tmp / "data", train_per_class=8, val_per_class=4)
    data = s3_server.upload(folder, "data/colours")
    config = write_config(tmp / "c.json", "s3run", folder, tmp, train={"epochs": 1, "batch_size": 4})
    assert main(["train", "-c", str(config), f"data.root={data}", f"storage.path={s3_server.uri('runs')}"]) == 0
    fs = s3_server.filesystem()
    with fs.open_input_stream("runs/s3run/summary.json") as f:
        summary = json.loads(f.read())
    return {"summary": summary, "folder": folder, "data": data, "config": config}


def test_training_from_s3_into_s3(s3_run, s3_server):
    summary = s3_run["summary"]
    assert summary["best_checkpoint"].startswith("s3://runs/s3run/checkpoint_")
    assert summary["best_checkpoint"].endswith(f"/checkpoint.pt?endpoint_override={s3_server.endpoint}&scheme=http")
    fs = s3_server.filesystem()
    for name in ("metrics.csv", "curves.png", "predictions.png"):
        assert fs.get_file_info(f"runs/s3run/{name}").size > 0
    assert summary["classes"] == ["blue", "red"] and [e["epoch"] for e in summary["epochs"]] == [1]


def test_labeling_an_s3_prefix_and_tar_into_s3_exactly_once(s3_run, s3_server, tmp_path, capsys):
    folder = s3_run["folder"]
    shard = io.BytesIO()
    with tarfile.open(fileobj=shard, mode="w") as tar:
        for path in sorted((folder / "train" / "red").glob("*.jpg"))[:3]:
            tar.add(path, arcname=f"shard/{path.name}")
    (tmp_path / "shard.tar").write_bytes(shard.getvalue())
    archive = s3_server.upload(tmp_path / "shard.tar", "data/shard.tar")
    args = ["label", "--checkpoint", s3_run["summary"]["best_checkpoint"],
            "--input", storage.join(s3_run["data"], "val"), archive, "--output", s3_server.uri("labels/colours"),
            "--evaluate"]
    assert main(args) == 0
    rows = s3_server.labels("labels/colours")
    val = sorted(f"s3://data/colours/val/{p.parent.name}/{p.name}" for p in (folder / "val").rglob("*.jpg"))
    reds = sorted((folder / "train" / "red").glob("*.jpg"))[:3]
    members = sorted(f"s3://data/shard.tar!shard/{p.name}" for p in reds)
    assert sorted(r["path"] for r in rows) == sorted(val + members)  # clean keys: no query string in the paths
    assert not [r for r in rows if r["error"]]
    assert "accuracy" in capsys.readouterr().out

    assert main(args) == 0  # the rerun finds everything done
    rows = s3_server.labels("labels/colours")
    assert sorted(r["path"] for r in rows) == sorted(val + members)
    with s3_server.filesystem().open_input_stream("labels/colours/_summary.json") as f:
        summary = json.loads(f.read())["runs"][-1]
    assert summary["skipped_existing"] == len(rows) and summary["evaluated"] == len(val)


def test_an_audit_of_s3_data_into_s3_resumes_from_its_files_there(s3_run, s3_server, capsys):
    """imgjobs audit reading S3 and writing its parts, folds and outputs to S3 (no rename there: each object is
    uploaded whole), and a rerun that finds them all and redoes none."""
    args = ["audit", "-c", str(s3_run["config"]), f"data.root={s3_run['data']}",
            f"storage.path={s3_server.uri('runs')}", f"audit.checkpoint={s3_run['summary']['best_checkpoint']}",
            "audit.folds=2", "audit.part_images=8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("features of") == 1 + 3 and out.count("audit: fold") == 2, out  # 16 train and 8 val images
    fs = s3_server.filesystem()
    rows = pq.read_table("runs/s3run/audit", filesystem=fs).to_pylist()
    folder = s3_run["folder"]
    images = {f"s3://data/colours/{p.relative_to(folder)}": p.parent.name for p in folder.rglob("*.jpg")}
    assert {row["path"]: row["label"] for row in rows} == images and len(rows) == len(images) == 24
    assert {row["split"] for row in rows} == {"train", "val"} and not [row for row in rows if row["error"]]
    for name in ("_summary.json", "_report.html"):
        assert fs.get_file_info(f"runs/s3run/audit/{name}").size > 0

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "features of" in out and "part" not in out and "audit: fold" not in out, out  # nothing redone
    assert pq.read_table("runs/s3run/audit", filesystem=fs).to_pylist() == rows


def test_endpoint_from_the_environment(s3_run, s3_server, ray_local, tmp_path):
    """Plain s3:// URIs, the endpoint in AWS_ENDPOINT_URL: a separate command joining the session's Ray, whose
    workers get the endpoint from the job."""
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://{s3_server.endpoint}",
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    checkpoint = storage.split_query(s3_run["summary"]["best_checkpoint"])[0]
    proc = start_label(["--checkpoint", checkpoint, "--input", "s3://data/colours/train",
                        "--output", "s3://labels/from-env"], env, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out[-3000:]
    rows = s3_server.labels("labels/from-env")
    assert len(rows) == 16 and not [r for r in rows if r["error"]]


def test_an_image_folder_tree_on_s3_is_listed_once_and_told_from_shards_in_class_folders(s3_server, tmp_path):
    """Telling an image folder tree from shard folders takes no listing of its own: on S3 a million keys take
    minutes to list, so no key of a tree is listed twice."""
    tree = make_image_folder(tmp_path / "tree", train_per_class=3, val_per_class=2)
    for images in tree.glob("*/*/"):  # a shard per class folder, its members in no folder of their own
        shard = tmp_path / "shards" / images.relative_to(tree) / "000000.tar"
        shard.parent.mkdir(parents=True)
        with tarfile.open(shard, "w") as tar:
            for path in sorted(images.glob("*.jpg")):
                tar.add(path, path.name)
    for name, folder in [("tree", tree), ("shards", tmp_path / "shards")]:
        root = s3_server.upload(folder, f"data/listed-once-{name}")
        since = len(s3_server.log.read_text().splitlines())
        data = scan(DataConfig(root=root), line=lambda text: None)
        assert data.classes == ["blue", "red"] and (len(data.train), len(data.val)) == (6, 4)
        assert data.train.layout is (Layout.SHARD_FOLDERS if name == "shards" else Layout.FILES)
        if name == "tree":
            listed = s3_server.listings(since)
            assert listed and not [(a, b) for a in listed for b in listed if a is not b and b.startswith(a)], listed
