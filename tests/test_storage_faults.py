"""Storage that fails: transient failures are retried, unreadable inputs are kept as `io` rows that a rerun
retries, and a job whose reads mostly fail says so and exits 1."""

from __future__ import annotations

import json
import os
import subprocess
import time

from jobs.cli import main
from pipeline.storage import read_bytes, resolve
from tests.helpers import FlakyProxy, make_image_folder, read_output, start_label


def test_a_read_rides_out_storage_that_is_down_for_seconds(s3_server, tmp_path):
    """pyarrow's own retries give up after about 6 s of dropped connections (measured: pyarrow 26); imgjobs'
    backoff around them outlasts a 10 s outage (a restarting server, a network blip)."""
    folder = make_image_folder(tmp_path / "imgs", train_per_class=1, val_per_class=0) / "train"
    s3_server.upload(folder, "data/flaky")
    proxy = FlakyProxy(s3_server.endpoint, down_for=10.0)
    try:
        fs, path = resolve(f"s3://data/flaky/blue/blue_000.jpg?endpoint_override={proxy.endpoint}&scheme=http")
        started = time.monotonic()
        assert read_bytes(fs, path) == (folder / "blue" / "blue_000.jpg").read_bytes()
        assert proxy.dropped > 0 and time.monotonic() - started >= 10.0
    finally:
        proxy.stop()


def test_labeling_through_an_outage_loses_nothing(ray_local, s3_server, small_checkpoint, tmp_path):
    folder = make_image_folder(tmp_path / "imgs", train_per_class=4, val_per_class=0) / "train"
    s3_server.upload(folder, "data/flaky-label")
    proxy = FlakyProxy(s3_server.endpoint, down_for=10.0)
    uri = f"s3://data/flaky-label?endpoint_override={proxy.endpoint}&scheme=http"
    try:
        code = main(["label", "--checkpoint", small_checkpoint, "--output", str(tmp_path / "out"), "--input", uri])
    finally:
        proxy.stop()
    assert code == 0
    rows = read_output(tmp_path / "out")
    assert len(rows) == 8 and not [r for r in rows if r["error"]] and proxy.dropped > 0


def test_unreadable_inputs_exit_1_then_a_rerun_retries_and_replaces_their_rows(ray_local, small_checkpoint,
                                                                                 tmp_path):
    """A manifest whose files are mostly not there yet (a mount not up, a sync still running): one line, exit
    1, one `io` row per missing input. Once they are there, the same command labels them, one row per input."""
    folder = make_image_folder(tmp_path / "imgs", train_per_class=4, val_per_class=0) / "train"
    present = sorted(str(p) for p in folder.rglob("*.jpg"))[:3]
    later = [str(tmp_path / "later" / f"img_{i}.jpg") for i in range(5)]
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(present + later) + "\n")
    args = ["--checkpoint", small_checkpoint, "--input", str(manifest), "--output", str(tmp_path / "out"),
            "--rows-per-file", "3"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # no Ray start per run

    first = start_label(args, env)
    out, err = first.communicate(timeout=600)
    assert first.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("imgjobs label: error: ")]
    assert errors == [line for line in err.splitlines() if "rror" in line] and len(errors) == 1, err[-3000:]
    assert errors[0].startswith("imgjobs label: error: 5 of 8 inputs could not be read (first: ")
    rows = {r["path"]: r for r in read_output(tmp_path / "out")}
    assert set(rows) == set(present + later)
    assert {p for p, r in rows.items() if r["error_kind"] == "io"} == set(later)

    (tmp_path / "later").mkdir()
    for i, path in enumerate(later):
        subprocess.run(["cp", sorted(folder.rglob("*.jpg"))[i], path], check=True)
    second = start_label(args, env)
    out, err = second.communicate(timeout=600)
    assert second.returncode == 0, err[-3000:]
    rows = read_output(tmp_path / "out")
    assert sorted(r["path"] for r in rows) == sorted(present + later)  # each input exactly once
    assert not [r for r in rows if r["error"]]
    summary = json.loads((tmp_path / "out" / "_summary.json").read_text())["runs"][-1]
    assert summary["skipped_existing"] == 3 and summary["labeled"] == 5 and summary["io_errors"] == 0
