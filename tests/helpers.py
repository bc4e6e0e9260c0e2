"""Helpers that tests and benchmarks share: checkpoints with random weights, a labeling command in its own
process, and a peak-memory sampler."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import torch

from pipeline.train import checkpoint
from pipeline.train.models import build_model

REPO = Path(__file__).resolve().parents[1]


def random_weight_state(arch: str, classes: list[str], input_size: int | None = None) -> dict:
    """A checkpoint's contents in the training job's format, with random weights; optionally at a smaller
    input size (resized to 9/8 of it, as ImageNet presets do)."""
    torch.manual_seed(0)
    model, spec = build_model(arch, len(classes), "none")
    if input_size:
        spec |= {"input_size": input_size, "resize_size": input_size * 9 // 8}
    return {"model": spec, "classes": classes, "model_state": model.eval().state_dict()}


def random_weight_checkpoint(arch: str, classes: list[str], folder: Path, input_size: int | None = None) -> str:
    return checkpoint.save(random_weight_state(arch, classes, input_size), str(folder))


def start_label(args: list, env: dict, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen) -> subprocess.Popen:
    """`imgjobs label ARGS` as its own process, as a user runs it."""
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "label", *args], cwd=REPO, env=env,
                            stdout=stdout, stderr=stderr, text=True, **popen)


@contextlib.contextmanager
def peak_memory(processes):
    """Yields a dict whose "rss" and "pss" (bytes) become the peak sums over `processes()`, sampled every 0.5 s.
    PSS splits pages that processes share (torch's libraries, mapped by every worker) among them; RSS counts
    them once per process."""
    peak = {"rss": 0, "pss": 0}
    stop = threading.Event()

    def sample():
        while not stop.wait(0.5):
            now = {"rss": 0, "pss": 0}
            for p in processes():
                try:
                    info = p.memory_full_info()
                except psutil.Error:  # exited meanwhile
                    continue
                now["rss"] += info.rss
                now["pss"] += info.pss
            peak.update({k: max(peak[k], now[k]) for k in peak})

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join()


def read_output(out: Path) -> list[dict]:
    """Every row of a label output folder."""
    files = sorted(out.glob("*.parquet"))
    return pq.read_table(files).to_pylist() if files else []
