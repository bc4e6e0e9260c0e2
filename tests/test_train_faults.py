"""Training under bad input and faults: nothing crashes, nothing is lost, no epoch is run twice."""

import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from jobs.cli import main
from pipeline.errors import UsageError
from pipeline.models import build_model
from pipeline.train import shared_storage
from pipeline.train.data import scan_image_folder
from pipeline.train.dataset import ImageDataset
from pipeline.train.preemption import PreemptionClock
from pipeline.train.transforms import eval_transform
from tests.corpus import make_corpus
from tests.helpers import REPO, Clock, fresh_env, make_image_folder, train, wait_for_checkpoint, write_config


def test_bad_files_are_skipped_and_counted(ray_local, tmp_path, capfd):
    root = make_image_folder(tmp_path / "data", train_per_class=6, val_per_class=3)
    corpus = root / "train" / "blue" / "corpus"
    expected = make_corpus(corpus)
    summary = train(write_config(tmp_path / "c.yaml", "bad", root, tmp_path / "runs"))

    bad = {str(corpus / rel) for rel, kind in expected.items() if kind == "error"}
    good = sum(kind == "ok" for kind in expected.values())
    assert set(summary["skipped"]) == bad and summary["skipped_files"] == len(bad)
    assert summary["epochs"][0]["train_images"] == 12 + good  # every decodable file trained once, loop or not
    assert capfd.readouterr().out.count("warning: skipped") == len(bad)


def test_a_file_that_vanishes_after_listing_is_skipped(tmp_path):
    root = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=1)
    folder = scan_image_folder(str(root))
    os.remove(folder.val.key(0))
    transform = eval_transform(build_model("efficientnet_lite0", 2)[1])
    image, path, reason, target = ImageDataset(str(root), folder.val, transform)[0]
    assert image is None and path == folder.val.key(0) and "FileNotFoundError" in reason
    assert target == folder.val.target(0)  # its given label, for the audit's row


def test_a_worker_that_cannot_see_the_run_folder_raises_a_usage_error_that_survives_the_trip(tmp_path):
    """The storage check's error is a UsageError (one line, exit 2) of its own type, which the driver recognises
    when Ray Train hands it over: pickled on the worker, unpickled on the driver."""
    marker = shared_storage.write_marker(str(tmp_path / "run"), "runs")
    shared_storage.check_marker(marker, "runs")  # the driver's marker is there
    with pytest.raises(shared_storage.NotShared) as raised:
        shared_storage.check_marker({**marker, "token": "another run's"}, "runs")
    assert isinstance(raised.value, UsageError) and str(raised.value).startswith(
        "storage.path runs is not shared storage: a worker on ")
    passed = pickle.loads(pickle.dumps(raised.value))
    assert type(passed) is shared_storage.NotShared and str(passed) == str(raised.value)


def test_killed_worker_is_restarted_from_the_last_checkpoint(ray_local, tmp_path, capfd):
    root = make_image_folder(tmp_path / "data", train_per_class=40, val_per_class=10)
    config = write_config(tmp_path / "c.yaml", "kw", root, tmp_path / "runs", train={"epochs": 4})
    outcome, started = {}, time.time()
    runner = threading.Thread(target=lambda: outcome.update(code=main(["train", "-c", str(config)])))
    runner.start()
    wait_for_checkpoint(tmp_path / "runs" / "kw")
    workers = [
        p for p in psutil.process_iter(["name", "create_time"])
        if p.info["name"] == "ray::RayTrainWorker" and p.info["create_time"] >= started
    ]
    assert len(workers) == 1
    workers[0].send_signal(signal.SIGKILL)
    runner.join(timeout=600)
    assert outcome["code"] == 0

    out = capfd.readouterr().out
    assert "resuming after epoch" in out
    summary = train(config)  # already finished: re-running just rewrites the outputs
    assert [m["epoch"] for m in summary["epochs"]] == [1, 2, 3, 4]
    assert [m["lr"] for m in summary["epochs"]] == [0.01, 0.005, 0.0025, 0.00125]


def test_killed_driver_then_rerun_resumes(ray_local, tmp_path, capfd):
    root = make_image_folder(tmp_path / "data", train_per_class=40, val_per_class=10)
    config = write_config(tmp_path / "c.yaml", "kd", root, tmp_path / "runs", train={"epochs": 3})
    # The driver runs in its own session with its own local Ray; kill -9 all of it, like a lost machine.
    driver = subprocess.Popen([sys.executable, "-m", "jobs.cli", "train", "-c", str(config)], cwd=REPO,
                              env=fresh_env(), start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        wait_for_checkpoint(tmp_path / "runs" / "kd")
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (tmp_path / "runs" / "kd" / "summary.json").exists()

    capfd.readouterr()
    summary = train(config)  # the rerun, on the session's Ray
    out = capfd.readouterr().out
    assert "resuming after epoch" in out and "epoch 1/3" not in out
    assert [m["epoch"] for m in summary["epochs"]] == [1, 2, 3]


def test_two_workers_on_mostly_broken_files_take_the_same_steps(ray_local, tmp_path):
    """A step whose whole batch fails on one rank is skipped by both, so DDP's ranks never fall out of step (they
    used to die with gloo's "Connection reset by peer", or hang until its timeout)."""
    root = make_image_folder(tmp_path / "data", train_per_class=6, val_per_class=2)
    for i in range(60):
        (root / "train" / ("red", "blue")[i % 2] / f"empty_{i:02d}.jpg").write_bytes(b"")
    config = write_config(tmp_path / "c.yaml", "desync", root, tmp_path / "runs", data={"max_unreadable": 1.0},
                          scaling={"num_workers": 2}, train={"epochs": 2, "batch_size": 4})
    summary = train(config)
    assert summary["skipped_files"] == 60 and [m["epoch"] for m in summary["epochs"]] == [1, 2]
    assert all(0 < m["train_images"] <= 12 for m in summary["epochs"])


def test_training_whose_reads_mostly_fail_stops_with_one_line(ray_local, tmp_path, capfd):
    """More than data.max_unreadable of a split unreadable (a dead mount, wrong credentials) ends the run with
    one line and exit 1 after the first epoch, instead of a run that reports the accuracy of no data."""
    root = make_image_folder(tmp_path / "data", train_per_class=2, val_per_class=2)
    for i in range(10):
        (root / "train" / "red" / f"empty_{i:02d}.jpg").write_bytes(b"")
    config = write_config(tmp_path / "c.yaml", "dead", root, tmp_path / "runs", train={"epochs": 3})
    assert main(["train", "-c", str(config)]) == 1
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("imgjobs train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("imgjobs train: error: training failed: 10 of 14 train files could not be read or "
                               "decoded, more than data.max_unreadable=0.5 of them (first: "), lines


def looks(step_seconds: float, steps: int, every: float = 5.0) -> list[int]:
    """The steps after which the workers look for a preemption notice, with steps of `step_seconds`."""
    clock, looked = Clock(), []
    preemption = PreemptionClock(every, clock=clock)
    for epoch in range(2):
        preemption.start_epoch(last_step=steps)
        clock.now += 3.0  # from the epoch's start to its first batch: validation, a checkpoint, the loader's start
        for step in range(1, steps + 1):
            wanted = preemption.wants(step)  # asked once the step's batch is loaded, before it runs
            clock.now += step_seconds
            if wanted:
                looked.append((epoch, step))
                preemption.looked()
    return looked


def test_workers_look_for_a_preemption_notice_every_few_seconds_and_after_every_long_step():
    # After the run's first step (its length unknown), then every 5 s, the 3 s between epochs included, and after
    # each epoch's last step.
    assert looks(1.0, 12) == [(0, 1), (0, 6), (0, 11), (0, 12), (1, 2), (1, 7), (1, 12)]
    assert looks(6.0, 3) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]  # steps over 5 s: after each one
    assert looks(0.1, 7) == [(0, 1), (0, 7), (1, 7)]  # epochs of fewer than 10 quick steps still look
    assert looks(0.1, 3, every=0) == [(e, s) for e in range(2) for s in (1, 2, 3)]
