"""`imgjobs label` under faults and hostile inputs, with real processes: a killed predictor actor, a full
disk, an output folder that cannot be written, bad checkpoints, and a 20,000-image run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from jobs.cli import main
from pipeline import checkpoint
from tests.helpers import DEMO_DATA, make_image_folder, peak_memory, read_output, start_label


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
    while proc.poll() is None and time.time() < deadline and not list(out.glob("*.parquet")):
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
    committed = {p: digest(p) for p in out.glob("*.parquet")}
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


def tiny_jpegs(root: Path, count: int) -> list[Path]:
    """`count` 32×32 JPEGs in folders of 1000, copies of 16 distinct images (writing them is the fast part)."""
    blobs = []
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i * 16, 255 - i * 16, (i * 40) % 256)).save(buf, "JPEG")
        blobs.append(buf.getvalue())
    paths = []
    for i in range(count):
        folder = root / f"d{i // 1000:03d}"
        if i % 1000 == 0:
            folder.mkdir(parents=True)
        path = folder / f"img_{i:06d}.jpg"
        path.write_bytes(blobs[i % 16])
        paths.append(path)
    return paths


@pytest.mark.ray
def test_20000_images_in_one_run_each_exactly_once_with_flat_memory(ray_local, small_checkpoint, tmp_path):
    env = joined_env(ray_local)
    me = psutil.Process()
    figures = {}
    for count in (2_000, 20_000):
        paths = tiny_jpegs(tmp_path / f"imgs{count}", count)
        out = tmp_path / f"out{count}"
        start = time.perf_counter()
        proc = start_label(["--checkpoint", small_checkpoint, "--input", str(tmp_path / f"imgs{count}"),
                            "--output", str(out), "--rows-per-file", "5000"], env)
        # The whole job: the driver and every Ray process (raylet, GCS, dashboard, workers) under this test.
        with peak_memory(lambda: me.children(recursive=True)) as peak:
            stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout + stderr
        seconds = time.perf_counter() - start
        keys = [r["path"] for r in read_output(out)]
        assert len(keys) == len(set(keys)) == count and set(keys) == {str(p) for p in paths}
        assert [pq.ParquetFile(f).metadata.num_rows for f in sorted(out.glob("*.parquet"))].count(5000) == count // 5000
        figures[count] = {"seconds": round(seconds, 1), "peak_rss_mib": peak["rss"] >> 20,
                          "peak_pss_mib": peak["pss"] >> 20}
        shutil.rmtree(tmp_path / f"imgs{count}")
    print(f"\nlabel load: {json.dumps(figures)}")
    # Flat: ten times the images may not double the memory, most of which is Ray's own processes and the idle
    # workers of the session.
    for measure in ("peak_rss_mib", "peak_pss_mib"):
        assert figures[20_000][measure] <= 2 * figures[2_000][measure], figures
