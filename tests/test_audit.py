"""`imgjobs audit`: confident learning on known probabilities, stratified folds, and the whole job on a tiny real set
with moved images: found, written as a dataset and a page, resumed after kill -9, refused with another config, and
left out by data.exclude."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from jobs.cli import main
from pipeline.audit import trained_folds
from pipeline.audit.confident_learning import find_label_issues, stratified_folds
from pipeline.errors import UsageError
from pipeline.train.config import load_config
from pipeline.train.data import scan
from pipeline.train.rerun import check_continuable
from pipeline.train.splits import Layout, Split
from tests.helpers import CHROMIUM, REPO, fresh_env, make_image_folder, session_processes, write_config


def noisy_probabilities(n: int, classes: int, flipped_share: float, seed: int = 0):
    """(given labels, true labels, probabilities): a model that is right about the true class with a margin, and
    a share of given labels moved to another class."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes))
    logits[np.arange(n), truth] += 4
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = truth.copy()
    moved = rng.choice(n, int(flipped_share * n), replace=False)
    given[moved] = (truth[moved] + rng.integers(1, classes, len(moved))) % classes
    return given, truth, probs


def test_confident_learning_finds_moved_labels_and_spares_the_rest():
    given, truth, probs = noisy_probabilities(2000, 3, 0.1)
    found = find_label_issues(given, probs)
    moved = given != truth
    precision = (found.suspect & moved).sum() / found.suspect.sum()
    recall = (found.suspect & moved).sum() / moved.sum()
    assert precision > 0.9 and recall > 0.8, (precision, recall)
    # The calibrated joint estimates the counts: its off-diagonal is about the number moved.
    assert abs(found.joint.sum() - len(given)) < 1e-6
    assert abs(found.joint.sum() - np.trace(found.joint) - moved.sum()) < 0.25 * moved.sum()
    assert np.allclose(found.self_confidence, probs[np.arange(len(given)), given])
    assert not (found.suspect & (found.suggested == given)).any()  # a likeliest class that is the given one: never


def test_clean_labels_give_no_suspect():
    given, truth, probs = noisy_probabilities(500, 2, 0.0)
    assert not find_label_issues(given, probs).suspect.any()


def test_folds_are_stratified_and_seeded():
    labels = np.repeat([0, 1, 2], [50, 31, 7])
    folds = stratified_folds(labels, 5, seed=3)
    for c in range(3):
        per_fold = np.bincount(folds[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    assert np.array_equal(folds, stratified_folds(labels, 5, seed=3))
    assert not np.array_equal(folds, stratified_folds(labels, 5, seed=4))


def test_audit_config_errors_are_one_line_exit_2(tmp_path, capsys):
    folder = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    config = write_config(tmp_path / "c.json", "a", folder, tmp_path / "runs")
    assert main(["audit", "-c", str(config), "audit.folds=1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit.folds" in err, err
    assert main(["audit", "-c", str(config), f"data.exclude={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no finished audit" in err, err
    assert main(["audit", "-c", str(config), "audit.folds=7"]) == 2  # 6 images
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit.folds 7 is more than the 6 images" in err, err
    assert main(["audit", "-c", str(config), "audit.method=train", "audit.checkpoint=x.pt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit.checkpoint: only audit.method linear uses it" in err, err


def wait_until_gone(session: int, timeout: float = 120) -> None:
    """Until no process of session `session` (a process started with start_new_session, and its Ray) is left."""
    deadline = time.time() + timeout
    while session_processes(session):
        assert time.time() < deadline, f"processes of session {session} outlived kill -9 by {timeout}s"
        time.sleep(0.1)


MOVED = {"train": [("blue", "red", 3), ("red", "blue", 5)], "val": [("blue", "red", 1)]}


def moved_folder(root, size: int = 64):
    """Two colour classes, MOVED's images in the other class's folder, and a truncated JPEG; (folder, moved paths,
    the truncated one)."""
    folder = make_image_folder(root, train_per_class=24, val_per_class=8, size=size)
    moved = []
    for split, entries in MOVED.items():
        for source, target, index in entries:
            name = f"{source}_{index:03d}.jpg"
            shutil.move(folder / split / source / name, folder / split / target / name)
            moved.append(str(folder / split / target / name))
    broken = folder / "train" / "red" / "truncated.jpg"  # keeps a row with its given label, and is never a suspect
    broken.write_bytes((folder / "train" / "red" / "red_000.jpg").read_bytes()[:300])
    return folder, moved, broken


def test_audit_finds_moved_images_resumes_after_kill_and_excludes_its_suspects(ray_local, tmp_path, capsys):
    """Colour classes that ImageNet's features tell apart; three images moved to the other class's folder. A first
    audit, a process with its own Ray, is killed (-9) once a part of its feature pass is written; the rerun (on the
    session's Ray) keeps that part and finishes."""
    folder, moved, broken = moved_folder(tmp_path / "data")
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.json", "noisy", folder, runs,
                          model={"arch": "efficientnet_lite0", "weights": "imagenet"},
                          audit={"folds": 2, "part_images": 8}, train={"num_data_workers": 0},
                          scaling={"num_workers": 1, "use_gpu": "auto"})
    audit_dir = runs / "noisy" / "audit"
    command = [sys.executable, "-m", "jobs.cli", "audit", "-c", str(config)]

    killed = subprocess.Popen(command, cwd=REPO, env=fresh_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while killed.poll() is None and not list((audit_dir / "_features").glob("*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    wait_until_gone(killed.pid)  # a task the kill caught mid-write may still finish its file until its process goes
    early = {p: p.stat().st_mtime_ns for p in (audit_dir / "_features").glob("*.parquet")}
    assert early and len(early) < 9, early  # 49 train and 16 val images in parts of 8: 9 parts, not all done

    capsys.readouterr()
    assert main(["audit", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in early} == early  # the finished parts were not redone
    assert out.count("features of") == 10 - len(early), out  # the first line, and each part left
    assert "audit: scaling.use_gpu auto: CPU workers (no GPU up" in out, out  # the session's Ray has none

    rows = pd.read_parquet(audit_dir)  # the folder reads as one dataset
    assert len(rows) == 65 and rows["path"].is_unique
    [unreadable] = rows[rows["error"].notna()].itertuples()
    assert (unreadable.path, unreadable.label, unreadable.suspect) == (str(broken), "red", False), unreadable
    assert pd.isna(unreadable.suggested_label) and pd.isna(unreadable.self_confidence), unreadable
    # The moved images are the worst three, and suspects; the colour blobs of a clean image or two may fool ImageNet's
    # features as well.
    worst = rows.sort_values("self_confidence")
    assert set(worst["path"][:3]) == set(moved), worst.head(6)
    suspects = set(rows.loc[rows["suspect"], "path"])
    assert set(moved) <= suspects and len(suspects) <= 2 * len(moved), worst.head(8)
    flagged = rows[rows["suspect"]]
    assert (flagged["suggested_label"] != flagged["label"]).all()
    assert duckdb.sql(f"select count(*) from '{audit_dir}/*.parquet' where suspect").fetchall() == [(len(suspects),)]
    summary = json.loads((audit_dir / "_summary.json").read_text())
    assert summary["suspects"] == len(suspects) and (summary["images"], summary["unreadable"]) == (65, 1)

    page = (audit_dir / "_report.html").read_text()
    if CHROMIUM is not None:  # what a browser shows: three suspects, each with its picture
        dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                              f"file://{audit_dir / '_report.html'}"], capture_output=True, text=True,
                             timeout=120).stdout
        assert dom.count('<img class="thumb"') == len(suspects), dom[:500]
    assert all(path in page for path in moved)

    # A fold whose file is gone is fitted again, and only that one; the result is the same.
    folds = sorted((audit_dir / "_folds").glob("*.parquet"))
    kept = folds[0].stat().st_mtime_ns
    folds[1].unlink()
    assert main(["audit", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "fold 2/2" in out and "fold 1/2" not in out and "part" not in out, out
    assert folds[0].stat().st_mtime_ns == kept
    assert pd.read_parquet(audit_dir).equals(rows)

    assert main(["audit", "-c", str(config), "audit.folds=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "audit.folds: 2 -> 3" in err, err

    lines = []
    cfg = load_config(str(config), [f"data.exclude={audit_dir}"])
    data = scan(cfg.data, lines.append)
    kept = set(data.train.keys()) | set(data.val.keys())
    assert len(kept) == 65 - len(suspects) and not suspects & kept
    left_out = [sum(f"/{split}/" in path for path in suspects) for split in ("train", "val")]
    assert lines == [f"data.exclude: left out {left_out[0]} train and {left_out[1]} val images that {audit_dir} marks "
                     "as suspects"]


def test_the_train_method_predicts_each_fold_by_a_run_that_never_saw_it(ray_local, tmp_path, capsys):
    """audit.method train: one imgjobs train run per fold, on the other fold, holding this one out as its val; its
    last checkpoint predicts the fold. A rerun keeps finished runs and redoes only a missing fold file."""
    folder, moved, broken = moved_folder(tmp_path / "data")
    runs = tmp_path / "runs"
    config = write_config(tmp_path / "c.json", "noisy", folder, runs,
                          model={"arch": "efficientnet_lite0", "weights": "imagenet", "mode": "feature_extraction"},
                          train={"epochs": 5, "step_size": 7, "lr": 0.003, "batch_size": 4, "num_data_workers": 0},
                          audit={"folds": 2, "method": "train"})
    audit_dir = runs / "noisy" / "audit"
    assert main(["audit", "-c", str(config)]) == 0
    out = capsys.readouterr().out

    rows = pd.read_parquet(audit_dir)
    assert len(rows) == 65 and rows["path"].is_unique
    [unreadable] = rows[rows["error"].notna()].itertuples()
    assert (unreadable.path, unreadable.label, unreadable.suspect) == (str(broken), "red", False), unreadable
    assert rows["self_confidence"].notna().sum() == 64
    folds = [pd.read_parquet(audit_dir / "_folds" / f"fold-{k}-of-2.parquet") for k in (1, 2)]
    assert set(folds[0]["path"]).isdisjoint(folds[1]["path"])
    assert set(folds[0]["path"]) | set(folds[1]["path"]) == set(rows["path"])
    for k, fold in enumerate(folds, 1):
        # The fold's run trained on the other fold's images and held this one out as its val split, and its last
        # checkpoint, not its best, predicted them.
        assert f"fold-{k}-of-2: {65 - len(fold)} train / {len(fold)} val images" in out, out
        latest = json.loads((audit_dir / "_runs" / f"fold-{k}-of-2" / "summary.json").read_text())["latest_checkpoint"]
        assert f"audit: fold {k}/2: {len(fold)} images predicted by {latest}" in out, out
    # Frozen ImageNet features and 5 epochs tell the colours apart: the two worst are moved images.
    worst = rows.sort_values("self_confidence")
    assert set(worst["path"][:2]) <= set(moved), worst.head(6)
    assert json.loads((audit_dir / "_summary.json").read_text())["method"] == "train"
    assert "2 folds (a training run each)" in (audit_dir / "_report.html").read_text()

    (audit_dir / "_folds" / "fold-2-of-2.parquet").unlink()
    assert main(["audit", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "fold 2/2" in out and "fold 1/2" not in out and "train /" not in out, out  # no run trained again
    assert pd.read_parquet(audit_dir).equals(rows)

    # A training can go on with another failure budget, but not with another shuffle or learning rate.
    assert main(["audit", "-c", str(config), "train.max_failures=5"]) == 0
    capsys.readouterr()
    for change, shown in (("train.lr=0.01", "train.lr: 0.003 -> 0.01"), ("data.shuffle_buffer=7", "shuffle_buffer")):
        assert main(["audit", "-c", str(config), change]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and shown in err, err


def test_fold_runs_side_by_side_run_at_once_and_stop_starting_after_an_error():
    """Two items that each wait for the other pass only if they run at once; one at a time, the wait times out."""
    met = threading.Barrier(2, timeout=60)
    started = []
    trained_folds.side_by_side(lambda item: started.append(item) or met.wait(), [0, 1], at_once=2)
    assert sorted(started) == [0, 1]

    def fails_at_1(item: int) -> None:
        started.append(item)
        if item == 1:
            raise RuntimeError("fold 1 failed")

    started.clear()
    with pytest.raises(RuntimeError, match="fold 1 failed"):
        trained_folds.side_by_side(fails_at_1, [0, 1, 2, 3], at_once=1)
    assert started == [0, 1]  # nothing started after the error


def test_the_train_method_refuses_shard_folders_which_name_no_image(tmp_path):
    named = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    data = scan(load_config(str(write_config(tmp_path / "c.json", "a", named, tmp_path / "runs"))).data)
    assert data.names_each_image()
    trained_folds.check(data)
    shards = replace(data, train=Split(pa.array(["train/a.tar"]), np.array([4]), layout=Layout.SHARD_FOLDERS))
    assert not shards.names_each_image()
    with pytest.raises(UsageError, match="shard folders of .* name no image one by one.*audit.method=linear"):
        trained_folds.check(shards)


def test_a_training_rerun_ignores_the_audit_keys_only(tmp_path):
    folder = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    before = load_config(str(write_config(tmp_path / "c.json", "a", folder, tmp_path / "runs"))).model_dump(mode="json")
    check_continuable(before, {**before, "audit": {**before["audit"], "folds": 3}}, "runs/a")
    with pytest.raises(UsageError, match="train.seed: 0 -> 1"):
        check_continuable(before, {**before, "train": {**before["train"], "seed": 1}}, "runs/a")
