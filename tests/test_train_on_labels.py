"""Training on labels: a labels Parquet as training data, from the filter rules to a real label-then-train run."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.cli import main
from pipeline.errors import UsageError
from pipeline.formats.keys import Reader
from pipeline.train.config import DataConfig
from pipeline.train.data import scan
from pipeline.train.from_labels import scan_labels
from tests.helpers import REPO, write_config


def write_labels(path, rows: list[dict], classes: list[str] | None = None) -> None:
    table = pa.Table.from_pylist(rows)
    if classes:
        table = table.replace_schema_metadata({b"imgjobs": json.dumps({"classes": classes})})
    pq.write_table(table, path)


def test_errors_and_low_scores_are_left_out_and_the_split_is_stratified_and_seeded(tmp_path):
    rows = [{"path": f"/img/{c}{i}.jpg", "label": c, "score": 0.5 + i / 100, "error": None}
            for c in ("ants", "bees") for i in range(40)]
    rows += [{"path": "/img/broken.jpg", "label": None, "score": None, "error": "truncated"},
             {"path": "/img/person.jpg", "label": "bees", "score": None, "error": None}]  # a reviewer's fix
    write_labels(tmp_path / "labels.parquet", rows, classes=["bees", "ants"])
    folder = scan_labels(str(tmp_path / "labels.parquet"), min_score=0.7, val_fraction=0.25, seed=3)
    assert folder.classes == ["bees", "ants"]  # the labeling checkpoint's class order
    paths = [*folder.train.keys(), *folder.val.keys()]
    kept = {r["path"] for r in rows if r["error"] is None and (r["score"] is None or r["score"] >= 0.7)}
    assert sorted(paths) == sorted(kept) and len(paths) == len(set(paths))
    val_per_class = [int((folder.val.targets == i).sum()) for i in range(2)]
    assert val_per_class == [round(21 * 0.25), round(20 * 0.25)]  # bees 20 scored + 1 reviewed, ants 20
    again = scan_labels(str(tmp_path / "labels.parquet"), min_score=0.7, val_fraction=0.25, seed=3)
    other = scan_labels(str(tmp_path / "labels.parquet"), min_score=0.7, val_fraction=0.25, seed=4)
    assert [*again.val.keys()] == [*folder.val.keys()] != [*other.val.keys()]


def test_a_split_column_decides_and_mistakes_are_one_line(tmp_path):
    rows = [{"path": f"/img/{c}{i}.jpg", "label": c, "split": "val" if i < 2 else "train"}
            for c in ("cat", "dog") for i in range(5)]
    write_labels(tmp_path / "a.parquet", rows)
    folder = scan(DataConfig(root=str(tmp_path)))  # a folder of Parquet files, without train/
    assert folder.classes == ["cat", "dog"] and len(folder.val) == 4 and len(folder.train) == 6

    write_labels(tmp_path / "a.parquet", [{**r, "split": "test"} for r in rows])
    with pytest.raises(UsageError, match="has split 'test' for /img/cat0.jpg; use 'train' or 'val'"):
        scan_labels(str(tmp_path), 0.0, 0.2, 0)
    write_labels(tmp_path / "a.parquet", [{"path": r["path"], "class": r["label"]} for r in rows])
    with pytest.raises(UsageError, match="has no 'label' column; a labels table needs 'path' and 'label' columns"):
        scan_labels(str(tmp_path), 0.0, 0.2, 0)
    write_labels(tmp_path / "a.parquet", [{"path": "/x.tar.gz!a.jpg", "label": "cat", "split": "train"}, *rows])
    with pytest.raises(UsageError, match=r"mixes members of compressed tars \(/x.tar.gz\) with loose files in its "
                                         "train split"):
        scan_labels(str(tmp_path), 0.0, 0.2, 0)


def test_archive_members_are_read_one_by_one(tmp_path):
    tar_path, zip_path = tmp_path / "a!b.tar", tmp_path / "c.zip"  # a '!' in the archive's own name too
    with tarfile.open(tar_path, "w") as tar:
        for name in ("x.jpg", "dir/y!z.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("w.jpg", b"zip member")
    reader = Reader()
    assert reader.read_key(f"{tar_path}!dir/y!z.jpg") == b"dir/y!z.jpg"
    assert reader.read_key(f"{tar_path}!x.jpg") == b"x.jpg"
    assert reader.read_key(f"{zip_path}!w.jpg") == b"zip member"
    with pytest.raises(FileNotFoundError, match="missing.jpg is not in"):
        reader.read_key(f"{tar_path}!missing.jpg")


@pytest.mark.ray
def test_label_the_ants_and_bees_then_train_on_those_labels(ray_local, demo_run, tmp_path):
    """The loop a bulk-labeling user runs: label photos with a checkpoint, then train a model on the output,
    here with the photos in a .tar, so the labels' paths are archive members."""
    photos = REPO / "data" / "hymenoptera" / "val"
    shard = tmp_path / "photos.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(photos, arcname="val")
    labels = tmp_path / "labels"
    assert main(["label", "--checkpoint", demo_run["run_dir"], "--input", str(shard), "--output", str(labels)]) == 0
    rows = pq.read_table(labels).to_pylist()
    assert rows and all("!val/" in r["path"] for r in rows)

    config = write_config(tmp_path / "c.yaml", "relabeled", labels, tmp_path / "runs", train={"epochs": 1})
    assert main(["train", "-c", str(config), "data.min_score=0.6"]) == 0
    summary = json.loads((tmp_path / "runs" / "relabeled" / "summary.json").read_text())
    confident = [r for r in rows if r["error"] is None and r["score"] >= 0.6]
    [epoch] = summary["epochs"]
    assert summary["classes"] == ["ants", "bees"] and summary["skipped_files"] == 0
    held = summary["calibration_images"]  # val's calibration share, for imgjobs label --target-precision
    assert epoch["train_images"] + epoch["val_images"] + held == len(confident) and held
    assert epoch["val_images"] + held == sum(round(n * 0.2) for n in (
        sum(r["label"] == c for r in confident) for c in ("ants", "bees")))
    assert (tmp_path / "runs" / "relabeled" / "predictions.png").stat().st_size > 0
