"""`imgjobs label` at scale: 10k, 100k and 1M tiny JPEGs in tar shards of 10,000, with a near-free model, so
that what is measured is the job's own machinery (listing, bookkeeping, resume), not the model.

    .venv/bin/python benchmarks/scale.py                          # 10k, 100k and 1M
    .venv/bin/python benchmarks/scale.py --sizes 10000 100000     # smaller

Jobs join one local Ray cluster that this script starts and stops, as jobs on a cluster do, with the same
--rows-per-file and --commit-every at every size. For each size, a fresh job: rows/s after start-up, its rate over
the first and the last 10% of its rows (from its files' commit times), the driver's peak RSS. At the largest
size also: a rerun of the finished job (seconds to exit), and a job killed once half its rows are committed, then
rerun: its first new batch against the fresh job's (both from command start). The driver's RSS per input is taken
against a 20,000-image job. `imgjobs report` runs on each size's output: its peak RSS. In the same run, on the 100k
shards: the plain PyTorch way (a DataLoader over the shards, webdataset style, two workers, the same model) and the
ceiling (decoding alone on every core), as ratios. Nothing here is a pass/fail test: it prints numbers for
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.formats import checkpoint  # noqa: E402
from pipeline.models import from_checkpoint  # noqa: E402
from tests.helpers import (  # noqa: E402
    benchmark_cluster,
    label_files,
    random_weight_checkpoint,
    start_label,
    tiny_jpeg_shards,
)

PER_SHARD = 10_000
ROWS_PER_FILE = 10_000
INPUT_SIZE = 32


def label(shards: Path, out: Path, ckpt: str, env: dict, kill_at: int | None = None) -> dict:
    """Run a job to its end (or SIGKILL it once `kill_at` rows are committed): its summary entry, the driver's peak
    RSS and its RSS at each quarter of the run, wall seconds, its first-batch seconds as it printed them, and its
    files' (commit time, rows)."""
    args = ["--checkpoint", ckpt, "--input", str(shards), "--output", str(out), "--rows-per-file", str(ROWS_PER_FILE),
            "--commit-every", "60"]
    start = time.time()
    proc = start_label(args, env, stderr=subprocess.STDOUT)
    driver, peak, done, curve = psutil.Process(proc.pid), [0], threading.Event(), []

    def sample():
        while not done.wait(0.2):
            try:
                curve.append(driver.memory_info().rss)
            except psutil.Error:
                return
            peak[0] = max(peak[0], curve[-1])

    threading.Thread(target=sample, daemon=True).start()
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    if kill_at:
        while proc.poll() is None and committed_rows(out) < kill_at:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    done.set()
    reader.join(5)
    seconds = time.time() - start
    said = "".join(lines)
    if not kill_at and proc.returncode != 0:
        raise SystemExit(f"label failed:\n{said[-3000:]}")
    first = re.search(r"first labeled batch after ([\d.]+)s", said)
    runs = json.loads((out / "_summary.json").read_text())["runs"] if (out / "_summary.json").exists() else []
    files = sorted((f.stat().st_mtime, pq.ParquetFile(f).metadata.num_rows) for f in label_files(out))
    quarters = [curve[min(len(curve) - 1, len(curve) * q // 4)] for q in (1, 2, 3, 4)] if curve else []
    return {"summary": runs[-1] if runs and not kill_at else None, "peak_rss": peak[0], "quarters": quarters,
            "seconds": seconds,
            "first_batch_s": float(first.group(1)) if first else None, "files": files, "started": start}


def peak_rss(command: list[str], env: dict) -> int:
    """The peak RSS of a command's process, sampled every 0.1 s."""
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak, process = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.1)
    return peak


def committed_rows(out: Path) -> int:
    rows = 0
    for f in label_files(out) if out.exists() else []:
        try:
            rows += pq.ParquetFile(f).metadata.num_rows
        except OSError:  # renamed or rewritten meanwhile
            pass
    return rows


def tenth_rates(files: list[tuple[float, int]]) -> tuple[float, float] | None:
    """Rows/s over the first and the last tenth of the files (commit times), after the first file: start-up
    excluded."""
    if len(files) < 21:
        return None
    tenth = len(files) // 10
    first = files[1 : 1 + tenth + 1]
    last = files[-tenth - 1 :]

    def rate(span):
        return sum(rows for _, rows in span[1:]) / (span[-1][0] - span[0][0])

    return rate(first), rate(last)


def shard_samples(shards: list[Path]):
    """(tensor, 0) per member of the shards, split among DataLoader workers: the webdataset way."""

    class Shards(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            mine = shards[info.id :: info.num_workers] if info else shards
            for path in mine:
                with tarfile.open(path, "r|") as tar:
                    for member in tar:
                        yield decode(tar.extractfile(member).read()), 0

    return Shards()


def decode(data: bytes) -> torch.Tensor:
    image = Image.open(io.BytesIO(data)).convert("RGB").resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(INPUT_SIZE, INPUT_SIZE, 3)


def plain_pytorch(shards: list[Path], ckpt: str) -> float:
    """Images/s of a DataLoader over the shards (two workers) into the same model, eager, fp32."""
    model = from_checkpoint(checkpoint.load(ckpt)).eval()
    loader = torch.utils.data.DataLoader(shard_samples(shards), batch_size=64, num_workers=2)
    start, count = time.perf_counter(), 0
    with torch.inference_mode():
        for pixels, _ in loader:
            model(pixels.permute(0, 3, 1, 2).float().div(255))
            count += len(pixels)
    return count / (time.perf_counter() - start)


def decode_shard(path: Path) -> int:
    count = 0
    with tarfile.open(path, "r|") as tar:
        for member in tar:
            decode(tar.extractfile(member).read())
            count += 1
    return count


def ceiling(shards: list[Path]) -> float:
    """Images/s of reading and decoding alone, one process per core: no model, no framework."""
    start = time.perf_counter()
    with mp.Pool(os.cpu_count()) as pool:
        count = sum(pool.map(decode_shard, shards))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--resume-only", action="store_true", help="only the kill at half and the rerun, at the "
                        "largest size")
    args = parser.parse_args()
    with benchmark_cluster("scale") as (work, env):
        ckpt = random_weight_checkpoint("mobilenet_v3_small", ["a", "b"], work, input_size=INPUT_SIZE)
        largest = max(args.sizes)
        all_shards = tiny_jpeg_shards(work / "all", largest // PER_SHARD, PER_SHARD)
        if not args.resume_only:
            fresh_runs(work, all_shards, args.sizes, ckpt, env)
        kill_and_resume(work, link_shards(work / "killed", all_shards, PER_SHARD, largest), largest, ckpt, env)


def fresh_runs(work: Path, all_shards: list[Path], sizes: list[int], ckpt: str, env: dict) -> None:
    base = label(link_shards(work / "s20k", all_shards[:2], per_shard=PER_SHARD, total=20_000), work / "o20k",
                 ckpt, env)
    print(f"20,000 images: driver peak RSS {base['peak_rss'] / 2**20:.0f} MiB", flush=True)
    for size in sizes:
        shards = link_shards(work / f"s{size}", all_shards, per_shard=PER_SHARD, total=size)
        fresh = label(shards, work / f"o{size}", ckpt, env)
        s = fresh["summary"]
        rates = tenth_rates(fresh["files"])
        growth = (fresh["peak_rss"] - base["peak_rss"]) / (size - 20_000) if size > 20_000 else None
        print(f"{size:>9,} images in {max(1, size // PER_SHARD)} shards: {s['images_per_s_after_startup']:,.0f} "
              f"rows/s after start-up ({s['startup_seconds']:.1f} s start-up, {fresh['seconds']:.0f} s in all); "
              f"driver peak RSS {fresh['peak_rss'] / 2**20:.0f} MiB"
              + (f", {growth:+.1f} bytes per input over the 20,000-image job" if growth is not None else "")
              + (f"; first 10% {rates[0]:,.0f} rows/s, last 10% {rates[1]:,.0f} rows/s "
                 f"(ratio {rates[1] / rates[0]:.2f})" if rates else ""), flush=True)
        print(f"  driver RSS at each quarter of the job: {', '.join(f'{r / 2**20:.0f}' for r in fresh['quarters'])} "
              "MiB", flush=True)
        if size == 100_000 or size == max(sizes) and 100_000 not in sizes:
            plain, top = plain_pytorch(shards_of(shards), ckpt), ceiling(shards_of(shards))
            job = s["images_per_s_after_startup"]
            print(f"  plain PyTorch (DataLoader, 2 workers) {plain:,.0f} images/s; decoding alone on "
                  f"{os.cpu_count()} cores {top:,.0f} images/s; imgjobs/plain {job / plain:.2f}, "
                  f"imgjobs/ceiling {job / top:.2f}", flush=True)
        report = peak_rss([sys.executable, "-m", "jobs.cli", "report", str(work / f"o{size}")], env)
        print(f"  imgjobs report on its {size:,} rows: peak RSS {report / 2**20:.0f} MiB", flush=True)
        if size == max(sizes):
            again = label(shards, work / f"o{size}", ckpt, env)
            print(f"  rerun of the finished job: exit after {again['seconds']:.1f} s", flush=True)


def kill_and_resume(work: Path, shards: Path, size: int, ckpt: str, env: dict) -> None:
    """A fresh job killed once half its rows are committed, then the same command again."""
    out = work / "killed-out"
    killed = label(shards, out, ckpt, env, kill_at=size // 2)
    resumed = label(shards, out, ckpt, env)
    r = resumed["summary"]
    keys = pq.read_table(label_files(out), columns=["path"]).column("path")
    print(f"  killed at {r['skipped_existing']:,} rows committed; the rerun's first new batch after "
          f"{r['startup_seconds']:.1f} s against {killed['first_batch_s']:.1f} s for the fresh job "
          f"({r['startup_seconds'] - killed['first_batch_s']:+.1f} s); driver peak RSS "
          f"{resumed['peak_rss'] / 2**20:.0f} MiB; rows {len(keys):,}, distinct {pc.count_distinct(keys).as_py():,}",
          flush=True)


def link_shards(folder: Path, shards: list[Path], per_shard: int, total: int) -> Path:
    """A folder of the first total/per_shard shards, as links: the sizes share one set of files."""
    folder.mkdir()
    for shard in shards[: max(1, total // per_shard)]:
        (folder / shard.name).symlink_to(shard)
    return folder


def shards_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.tar"))


if __name__ == "__main__":
    main()
