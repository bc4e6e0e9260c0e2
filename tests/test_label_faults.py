"""`imgjobs label` under faults and hostile inputs, with real processes: a killed predictor actor, a full
disk, an output folder that cannot be written, bad checkpoints, and 50,000 images in shards killed mid-shard."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from pipeline.formats import checkpoint
from pipeline.formats.labels_file import UNITS_KEY
from tests.helpers import DEMO_DATA, label_files, make_image_folder, read_output, start_label, tiny_jpeg_shards


def joined_env(ray_local) -> dict:
    """Drivers started from here join the session's Ray, as a driver on a cluster would."""
    return {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}


def predictor_actors() -> list[psutil.Process]:
    """The Ray Data actors of this test session's Ray that run pipeline.predictor.Predictor: process title
    ray::MapWorker(MapBatches(Predictor)), with a method name while busy. Ray turns pre-started idle workers
    into actors, so the process can be older than the job; other Rays on the machine are not ours."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith("ray::MapWorker(MapBatches(Predictor))"):
                found.append(p)
        except psutil.Error:
            pass
    return found


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_killed_predictor_actor_is_restarted_and_nothing_is_lost(ray_local, small_checkpoint, tmp_path):
    images = make_image_folder(tmp_path / "imgs", train_per_class=200, val_per_class=0, size=40)
    out = tmp_path / "out"
    args = ["--checkpoint", small_checkpoint, "--input", str(images), "--output", str(out),
            "--rows-per-file", "8", "--batch-size", "4"]
    before = {p.pid for p in predictor_actors()}  # an earlier test's pool, if its processes linger
    proc = start_label(args, joined_env(ray_local))
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not label_files(out):
        time.sleep(0.02)
    actors = [p for p in predictor_actors() if p.pid not in before]
    assert proc.poll() is None and actors, "the job finished, or had no predictor actor, before the kill"
    for actor in actors:
        actor.send_signal(signal.SIGKILL)
    killed = {a.pid for a in actors}
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout + stderr

    rows = read_output(out)
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in images.rglob("*.jpg"))  # exactly once
    assert [r for r in rows if r["error"]] == []  # the kill cost no input an error row
    assert killed.isdisjoint(p.pid for p in predictor_actors())  # the kill took: the pool was rebuilt, not reused
    summary = json.loads((out / "_summary.json").read_text())["runs"][-1]
    assert summary["total"] == summary["labeled"] == len(rows) == 400


def one_line_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("imgjobs label: error:")]
    assert len(errors) == 1, stderr
    return errors[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 24 KiB tmpfs: a real disk that fills up after a few Parquet files, and can be grown with remount.
    (RLIMIT_FSIZE can't stand in for it: it also limits Ray Data's session log, which every driver appends to.)"""
    disk = tmp_path / "disk"
    disk.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(disk)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {mount.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_disk_full_during_a_write_is_one_clear_line_and_a_rerun_completes(ray_local, small_checkpoint, tmp_path,
                                                                         small_disk):
    images = make_image_folder(tmp_path / "imgs", train_per_class=60, val_per_class=0, size=40)
    out = small_disk / "labels"
    env = joined_env(ray_local)
    args = ["--checkpoint", small_checkpoint, "--input", str(images), "--output", str(out),
            "--rows-per-file", "8", "--batch-size", "4"]
    full = start_label(args, env)
    stdout, stderr = full.communicate(timeout=300)
    assert full.returncode == 2, stdout + stderr
    line = one_line_error(stderr)
    assert "No space left on device" in line and "run the same command again" in line
    committed = {p: digest(p) for p in label_files(out)}
    assert 1 <= len(committed) < 15  # some files were complete before the disk filled, and not all of them
    for part in committed:  # each complete and readable: no half-written labels file
        assert pq.ParquetFile(part).metadata.num_rows == 8
    assert not list(out.glob(".writing-*"))  # the failed file's temporary was removed

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space freed
    rerun = start_label(args, env)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stdout + stderr
    keys = [r["path"] for r in read_output(out)]
    assert sorted(keys) == sorted(str(p) for p in images.rglob("*.jpg"))  # every input exactly once
    assert {p: digest(p) for p in committed} == committed  # the earlier files were kept as they were
    assert json.loads((out / "_summary.json").read_text())["runs"][-1]["skipped_existing"] == 8 * len(committed)


@pytest.mark.parametrize("variant", ["under-a-file", "immutable-folder"])
def test_output_folder_not_writable_is_one_line_exit_2_before_any_work(ray_local, small_checkpoint, tmp_path, capsys,
                                                                       variant):
    images = make_image_folder(tmp_path / "imgs", train_per_class=4, val_per_class=0)
    if variant == "under-a-file":
        (tmp_path / "plain-file").write_text("not a folder")
        out = tmp_path / "plain-file" / "labels"  # ENOTDIR, whoever runs it (root ignores permission bits)
    else:
        out = tmp_path / "labels"
        out.mkdir()
        if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not permitted here (needs CAP_LINUX_IMMUTABLE and a filesystem that has it)")
    try:
        code = main(["label", "--checkpoint", small_checkpoint, "--input", str(images), "--output", str(out)])
        err = capsys.readouterr().err
    finally:
        if variant == "immutable-folder":
            subprocess.run(["chattr", "-i", str(out)], check=True)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"output {out} cannot be written" in err
    assert not (out.is_dir() and any(out.iterdir()))


def test_checkpoint_of_an_unknown_arch_is_one_line_exit_2(ray_local, small_checkpoint, tmp_path, capsys):
    state = checkpoint.load(small_checkpoint)
    state["model"] = replace(state["model"], arch="resnet9000")
    state.pop("format")
    bogus = checkpoint.save(state, str(tmp_path))
    out = tmp_path / "out"
    assert main(["label", "--checkpoint", bogus, "--input", str(DEMO_DATA / "val"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown model.arch 'resnet9000'" in err and err.count("\n") == 1 and not out.exists()


class RunsCode:
    """Unpickling this runs os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's notice on reading the crafted file
def test_crafted_pickle_checkpoint_is_refused_and_its_code_never_runs(ray_local, tmp_path, capsys):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "checkpoint.pt"
    torch.save({"format": checkpoint.FORMAT, "payload": RunsCode(marker)}, crafted)
    with open(tmp_path / "plain.pkl", "wb") as f:  # the same payload as a bare pickle
        pickle.dump(RunsCode(marker), f)
    for path in (crafted, tmp_path / "plain.pkl"):
        out = tmp_path / "out"
        assert main(["label", "--checkpoint", str(path), "--input", str(DEMO_DATA / "val"), "--output", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"checkpoint {path}" in err and err.count("\n") == 1 and "Traceback" not in err
        assert not marker.exists() and not out.exists()
    # The payload is live: loading it the unsafe way does run it, so the assertions above mean something.
    torch.load(crafted, weights_only=False)
    assert marker.exists()


@pytest.mark.ray
def test_50000_images_in_shards_killed_mid_shard_then_resumed_each_exactly_once(ray_local, small_checkpoint, tmp_path):
    """20 shards of 2,500 images: killed once before its first file and once mid-shard. The rerun skips the finished
    shards without opening them (one is no tar any more by then: opened, it would give an error row), finishes the
    shards in progress from their done keys, and labels every image once."""
    shards = tiny_jpeg_shards(tmp_path / "shards", 20, 2500)
    out = tmp_path / "out"
    args = ["--checkpoint", small_checkpoint, "--input", str(tmp_path / "shards"), "--output", str(out),
            "--rows-per-file", "700"]  # not a divisor of 2,500: files end mid-shard
    env = joined_env(ray_local)
    for files in (0, 6):  # killed once its lock is taken but nothing is written, then after six files
        proc = start_label(args, env, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline and not (
            (out / "_lock.json").exists() and len(label_files(out)) >= files
        ):
            time.sleep(0.02)
        assert proc.poll() is None, proc.stdout.read()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    records = [json.loads(pq.read_schema(f).metadata[UNITS_KEY]) for f in label_files(out)]
    finished = {unit for record in records for unit in record["done"]}
    in_progress = {unit for record in records for unit in record["rows"]} - finished
    assert finished and in_progress and len(finished) < 20, records
    committed = sum(pq.ParquetFile(f).metadata.num_rows for f in label_files(out))
    Path(sorted(finished)[0]).write_bytes(b"no tar any more")

    rerun = start_label(args, env, stderr=subprocess.STDOUT)
    said = rerun.communicate(timeout=600)[0]
    assert rerun.returncode == 0, said
    assert f"{len(finished)} finished units skipped unopened" in said, said
    rows = read_output(out)
    keys = [r["path"] for r in rows]
    assert len(keys) == len(set(keys)) == 50_000 and not [r for r in rows if r["error"]]
    assert {k.split("!")[0] for k in keys} == {str(s) for s in shards}
    summary = json.loads((out / "_summary.json").read_text())["runs"][-1]
    assert summary["skipped_existing"] == committed and summary["labeled"] == 50_000 - committed
