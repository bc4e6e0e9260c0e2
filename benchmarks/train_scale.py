"""`imgjobs train` at scale: 20k and 1M training samples of tiny JPEGs in tar shards of 10,000, given two ways: as
shard folders (train/ and val/ of shards, members in class folders) and as a labels table of their members (what
`imgjobs label` writes, a Parquet file per 10,000 rows). Each run trains a few steps (train.max_steps_per_epoch),
not an epoch of 1M on two cores, so what is measured is what grows with the samples: listing, splitting, handing
the samples to the workers.

    .venv/bin/python benchmarks/train_scale.py                       # 20k and 1M
    .venv/bin/python benchmarks/train_scale.py --sizes 20000 100000  # smaller

Jobs join one local Ray cluster that this script starts and stops. For each size and way: seconds from the command
to the first training step (the job's own startup_seconds); the driver's peak RSS, and the peak RSS of the training
worker's processes (the Ray Train worker, and its DataLoader processes, which fork from it); growth per sample over
the 20k run. Shard folders run twice: the first start counts the shards (writing their index), a second reads the
index. Nothing here is a pass/fail test: it prints numbers for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers import benchmark_cluster, tiny_jpeg_shards  # noqa: E402

PER_SHARD = 10_000
CLASSES = ("ants", "bees")
STEPS = 5


def train(config: Path, env: dict) -> dict:
    """Run `imgjobs train`: its summary, the driver's peak RSS and the training worker processes' peak RSS."""
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "train", "-c", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver, peak, done = psutil.Process(proc.pid), {"driver": 0, "worker": 0}, threading.Event()

    def sample():
        while not done.wait(0.2):
            try:
                peak["driver"] = max(peak["driver"], driver.memory_info().rss)
            except psutil.Error:
                pass
            for p in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                    try:
                        peak["worker"] = max(peak["worker"], p.memory_info().rss)
                    except psutil.Error:
                        pass

    threading.Thread(target=sample, daemon=True).start()
    out, _ = proc.communicate()
    done.set()
    if proc.returncode != 0:
        raise SystemExit(f"train failed:\n{out[-3000:]}")
    cfg = yaml.safe_load(config.read_text())
    summary = json.loads((Path(cfg["storage"]["path"]) / cfg["name"] / "summary.json").read_text())
    return {"first_step": summary["epochs"][0]["startup_seconds"], **peak}


def config(work: Path, name: str, root: Path) -> Path:
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "data": {"root": str(root)},
        "model": {"arch": "mobilenet_v3_small", "weights": "none"},
        "train": {"epochs": 1, "batch_size": 8, "max_steps_per_epoch": STEPS, "num_data_workers": 1},
        "scaling": {"num_workers": 1, "use_gpu": False}, "storage": {"path": str(work / "runs")},
    }))
    return path


def shard_folders(work: Path, shards: list[Path], size: int) -> Path:
    """train/ with the first size/10,000 shards, val/ with one: links, so the sizes share one set of files."""
    root = work / f"shards-{size}"
    for split, chosen in (("train", shards[:max(1, size // PER_SHARD)]), ("val", shards[-1:])):
        (root / split).mkdir(parents=True)
        for shard in chosen:
            (root / split / shard.name).symlink_to(shard)
    return root


def labels_table(work: Path, shards: list[Path], size: int) -> Path:
    """A labels folder naming every member of the first size/10,000 shards, a Parquet file per shard."""
    root = work / f"labels-{size}"
    root.mkdir()
    for n, shard in enumerate(shards[:max(1, size // PER_SHARD)]):
        members = [f"{CLASSES[i % 2]}/{n * PER_SHARD + i:09d}.jpg" for i in range(PER_SHARD)]
        pq.write_table(pa.table({"path": [f"{shard}!{m}" for m in members],
                                 "label": [m.split("/")[0] for m in members]}), root / f"part-{n:05d}.parquet")
    return root


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 1_000_000])
    args = parser.parse_args()
    with benchmark_cluster("train-scale") as (work, env):
        shards = tiny_jpeg_shards(work / "all", max(args.sizes) // PER_SHARD + 1, PER_SHARD, CLASSES)
        base = {}
        for size in sorted(args.sizes):
            runs = {}
            root = shard_folders(work, shards, size)
            runs["shard folders, first start"] = train(config(work, f"s{size}a", root), env)
            runs["shard folders, indexed"] = train(config(work, f"s{size}b", root), env)
            runs["labels table"] = train(config(work, f"l{size}", labels_table(work, shards, size)), env)
            for way, run in runs.items():
                base.setdefault(way, (size, run))
                size0, run0 = base[way]
                growth = "" if size == size0 else "; per sample over {:,}: driver {:+.1f} B, worker {:+.1f} B".format(
                    size0, *((run[k] - run0[k]) / (size - size0) for k in ("driver", "worker")))
                print(f"{size:>9,} samples, {way}: first step after {run['first_step']:.1f} s; peak RSS driver "
                      f"{run['driver'] / 2**20:.0f} MiB, worker {run['worker'] / 2**20:.0f} MiB{growth}", flush=True)


if __name__ == "__main__":
    main()
