"""Throughput of `imgjobs label` against the plain PyTorch way and model-only ceilings, in one run.

    .venv/bin/python benchmarks/label_throughput.py                      # all cases
    .venv/bin/python benchmarks/label_throughput.py --cases main 12mp    # some of them

Cases:
  main      3,000+ real photos (../shared/data/hymenoptera copied 8 times), ResNet18 checkpoint:
            (a) the plain PyTorch way, (b) model-only ceilings, then the job at fp32 and bf16; ratios,
            label/score agreement and start-up (command start to first labeled batch).
  12mp      200 of the photos upscaled to ~12 MP, 3 copies: plain way vs the job by default (reduced-size
            decoding, precision auto) and with --exact-decode, fp32 and bf16.
  accuracy  the demo's trained checkpoint (runs/demo) on the full-resolution val set:
            fp32 vs bf16, exact and reduced-size decoding.
  memory    peak memory (PSS and RSS of the driver and all Ray processes) labeling 3k and 30k images.
Nothing here is a pass/fail test: it prints numbers for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.formats import checkpoint  # noqa: E402
from pipeline.hardware import cpu_model  # noqa: E402
from pipeline.images import decode_image, is_image_name  # noqa: E402
from pipeline.label.plan import CPU_BATCH, model_payload  # noqa: E402
from pipeline.label.predictor import torchscript_model  # noqa: E402
from pipeline.models import from_checkpoint  # noqa: E402
from pipeline.train.transforms import eval_transform  # noqa: E402
from tests.helpers import fresh_env, peak_memory, random_weight_checkpoint, start_label  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "hymenoptera"
BATCH = 32


def replicate(src: Path, dst: Path, copies: int) -> list[str]:
    """`copies` hard-linked copies of every image under src (same bytes, distinct paths)."""
    files = sorted(p for p in src.rglob("*") if p.is_file() and is_image_name(p.name))
    out = []
    for c in range(copies):
        for p in files:
            target = dst / f"copy{c}" / p.relative_to(src)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, target)
            out.append(str(target))
    return out


class Files(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.transform(decode_image(Path(self.paths[i]).read_bytes())), i
        except Exception:
            return torch.zeros(3, 224, 224), -1


def plain_pytorch(ckpt: str, paths: list[str], workers: int, out: Path) -> tuple[float, np.ndarray, np.ndarray]:
    """(a): file list, PIL decode, torchvision transforms, DataLoader, eager fp32 at batch 32, one Parquet file.
    Returns (images/s end to end, labels, scores)."""
    start = time.perf_counter()
    state = checkpoint.load(ckpt)
    model = from_checkpoint(state)
    spec = state["model"]
    loader = torch.utils.data.DataLoader(
        Files(paths, eval_transform(spec)),
        batch_size=BATCH, num_workers=workers,
    )
    labels, scores = [], []
    with torch.inference_mode():
        for x, _ in loader:
            p = model(x).softmax(1)
            s, i = p.max(1)
            labels.append(i.numpy())
            scores.append(s.numpy())
    labels, scores = np.concatenate(labels), np.concatenate(scores)
    pq.write_table(pa.table({"path": paths, "label_index": labels, "score": scores}), out)
    return len(paths) / (time.perf_counter() - start), labels, scores


def ceilings(ckpt: str) -> dict:
    """(b): model-only images/s on ready tensors, batch 32, 2 threads; then the models imgjobs' CPU actors run,
    at their batch size: each job's own ceiling. Built one at a time, in this order: imgjobs' models turn on
    oneDNN Graph fusion for the whole process, which optimize_for_inference's model does not survive."""
    state = checkpoint.load(ckpt)
    x = torch.randn(BATCH, 3, 224, 224)
    xcl = x.contiguous(memory_format=torch.channels_last)

    def channels_last():
        return from_checkpoint(state).to(memory_format=torch.channels_last)

    def autocast_bf16():
        model = channels_last()

        def forward(t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(t)
        return forward

    variants = {
        "eager fp32": (lambda: from_checkpoint(state), x),
        "channels_last fp32": (channels_last, xcl),
        "torch.jit.optimize_for_inference": (
            lambda: torch.jit.optimize_for_inference(torch.jit.trace(from_checkpoint(state), x[:1])), x),
        "channels_last + bf16 autocast": (autocast_bf16, xcl),
        f"imgjobs fp32 model, batch {CPU_BATCH}": (lambda: imgjobs_cpu_model(state, "fp32", CPU_BATCH),
                                                   xcl[:CPU_BATCH]),
        f"imgjobs bf16 model, batch {CPU_BATCH}": (lambda: imgjobs_cpu_model(state, "bf16", CPU_BATCH),
                                                   xcl[:CPU_BATCH]),
    }
    return {name: rows_per_s(build(), batch, 8) for name, (build, batch) in variants.items()}


def imgjobs_cpu_model(state: dict, precision: str, batch_size: int):
    """The TorchScript model that imgjobs' CPU predictor actors run for this checkpoint."""
    return torchscript_model(model_payload(state, from_checkpoint(state), precision, gpu=False), batch_size)


def rows_per_s(forward, batch: torch.Tensor, seconds: float) -> float:
    """Rows/s of `forward` called on `batch` for `seconds`, after two warm-up calls."""
    with torch.inference_mode():
        forward(batch), forward(batch)
        rows, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            forward(batch)
            rows += len(batch)
    return rows / (time.perf_counter() - start)


def label_job(ckpt: str, inputs: list[str], out: Path, *extra: str) -> tuple[dict, dict]:
    """Run `imgjobs label` as a fresh command (its own local Ray), as a user would. Returns (summary, peak GiB):
    the peak sums of RSS and of PSS over the command and its descendants (its Ray processes and workers), not
    over other Ray clusters on the machine."""
    shutil.rmtree(out, ignore_errors=True)
    proc = start_label(["--checkpoint", ckpt, "--input", *inputs, "--output", str(out), *extra], fresh_env(),
                       stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    with peak_memory(lambda: [root, *root.children(recursive=True)]) as peak:
        output = proc.communicate()[0]
    if proc.returncode:
        sys.exit(f"label failed:\n{output}")
    return json.loads((out / "_summary.json").read_text())["runs"][-1], {k: v / 2**30 for k, v in peak.items()}


def job_labels(out: Path, paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    table = pq.read_table(sorted(out.glob("*.parquet")), columns=["path", "label_index", "score"]).to_pylist()
    rows = {r["path"]: r for r in table}
    return (np.array([rows[p]["label_index"] for p in paths]), np.array([rows[p]["score"] for p in paths]))


def report_job(name: str, summary: dict, plain: float) -> None:
    steady = summary["images_per_s_after_startup"]
    print(f"  {name:<28} {steady:7.1f} images/s after start-up ({steady / plain:.2f}x plain), "
          f"{summary['images_per_s']:.1f} end to end ({summary['images_per_s'] / plain:.2f}x), "
          f"start-up {summary['startup_seconds']:.1f}s")


def case_main(tmp: Path, ckpt: str, worker_counts: list[int]) -> None:
    paths = replicate(SHARED, tmp / "photos", 8)
    print(f"main: {len(paths)} photos (hymenoptera x8), ResNet18, batch {BATCH}, "
          f"torch threads {torch.get_num_threads()}")
    plain = {}
    for workers in worker_counts:
        plain[workers] = plain_pytorch(ckpt, paths, workers, tmp / "plain.parquet")
        print(f"  (a) plain PyTorch, {workers} DataLoader worker(s): {plain[workers][0]:.1f} images/s")
    best = max(plain.values(), key=lambda r: r[0])
    rate, ref_labels, ref_scores = best
    for name, value in ceilings(ckpt).items():
        print(f"  (b) {name:<32} {value:6.1f} images/s ({value / rate:.2f}x plain)")
    inputs = [str(tmp / "photos")]
    fp32, _ = label_job(ckpt, inputs, tmp / "out-fp32", "--precision", "fp32", "--exact-decode")
    report_job("imgjobs label (fp32, --exact-decode)", fp32, rate)
    labels, scores = job_labels(tmp / "out-fp32", paths)
    print(f"    fp32 labels equal plain's: {(labels == ref_labels).mean() * 100:.2f}%, "
          f"max |score diff| {np.abs(scores - ref_scores).max():.2e}")
    bf16, _ = label_job(ckpt, inputs, tmp / "out-bf16", "--precision", "bf16")
    report_job("imgjobs label (bf16)", bf16, rate)
    labels16, _ = job_labels(tmp / "out-bf16", paths)
    print(f"    bf16 labels equal fp32's: {(labels16 == labels).mean() * 100:.2f}%")
    default, _ = label_job(ckpt, inputs, tmp / "out-default")
    report_job("imgjobs label (default: precision auto, reduced-size decoding)", default, rate)


def case_12mp(tmp: Path, ckpt: str, worker_counts: list[int], count: int = 200, copies: int = 3) -> None:
    """`count` photos upscaled to ~12 MP, labeled `copies` times over, so that the throughput after start-up is
    measured over more than the first few batches."""
    photos = sorted(SHARED.rglob("*.jpg"))
    sources = photos[:: max(1, len(photos) // count)][:count]
    upscaled = tmp / "12mp-source"
    upscaled.mkdir()
    for i, p in enumerate(sources):
        img = decode_image(p.read_bytes())
        scale = (12e6 / (img.width * img.height)) ** 0.5
        img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC).save(
            upscaled / f"{i:04d}.jpg", quality=90)
    folder = tmp / "12mp"
    paths = sorted(replicate(upscaled, folder, copies))
    print(f"12mp: {len(paths)} photos upscaled to ~12 MP ({count} distinct, {copies} copies)")
    rate = max(plain_pytorch(ckpt, paths, w, tmp / "plain12.parquet")[0] for w in worker_counts)
    print(f"  (a) plain PyTorch (best of {worker_counts} DataLoader workers): {rate:.1f} images/s")
    for name, extra in (("default", ()), ("fp32, --exact-decode", ("--precision", "fp32", "--exact-decode")),
                        ("fp32", ("--precision", "fp32")), ("bf16", ("--precision", "bf16"))):
        summary, _ = label_job(ckpt, [str(folder)], tmp / "out12", *extra)
        report_job(f"imgjobs label ({name})", summary, rate)


def case_accuracy(tmp: Path, demo_ckpt: str) -> None:
    print(f"accuracy: {demo_ckpt} on {SHARED / 'val'} (full resolution)")
    base = None
    for name, extra in (("fp32 --exact-decode", ("--precision", "fp32", "--exact-decode")),
                        ("bf16 --exact-decode", ("--precision", "bf16", "--exact-decode")),
                        ("fp32", ("--precision", "fp32")), ("bf16", ("--precision", "bf16"))):
        out = tmp / "acc"
        summary, _ = label_job(demo_ckpt, [str(SHARED / "val")], out, "--evaluate", *extra)
        labels = pq.read_table(sorted(out.glob("*.parquet")), columns=["path", "label_index"]).to_pydict()
        labels = dict(zip(labels["path"], labels["label_index"]))
        base = base or labels
        agree = np.mean([labels[k] == base[k] for k in base]) * 100
        print(f"  {name:<20} accuracy {summary['accuracy']:.4f}, labels equal fp32's {agree:.1f}%")


def case_memory(tmp: Path, ckpt: str) -> None:
    small = REPO / "data" / "hymenoptera"
    for copies in (8, 80):
        inputs = tmp / f"mem{copies}"
        replicate(small, inputs, copies)
        summary, peak = label_job(ckpt, [str(inputs)], tmp / "outmem", "--precision", "bf16")
        print(f"memory: {summary['total']} images: peak of driver + Ray processes {peak['pss']:.2f} GiB PSS, "
              f"{peak['rss']:.2f} GiB RSS ({summary['images_per_s']:.1f} images/s)")
        shutil.rmtree(inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["main", "12mp", "accuracy", "memory"],
                        choices=["main", "12mp", "accuracy", "memory"])
    parser.add_argument("--plain-workers", type=int, nargs="+", default=[1, 2],
                        help="DataLoader worker counts to try for the plain way; the best one is the reference")
    parser.add_argument("--demo-checkpoint", help="trained checkpoint or run folder for the accuracy case "
                        "(default: runs/demo, the best checkpoint of `make demo`)")
    args = parser.parse_args()
    if not SHARED.is_dir():
        sys.exit(f"needs the full-resolution photos in {SHARED}")
    torch.set_num_threads(os.cpu_count())
    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "|", cpu_model(), "|", os.cpu_count(), "CPUs |",
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB | torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ckpt = random_weight_checkpoint("resnet18", ["ants", "bees"], tmp)  # throughput does not depend on weights
        if "main" in args.cases:
            case_main(tmp, ckpt, args.plain_workers)
        if "12mp" in args.cases:
            case_12mp(tmp, ckpt, args.plain_workers)
        if "accuracy" in args.cases:
            case_accuracy(tmp, args.demo_checkpoint or str(REPO / "runs" / "demo"))
        if "memory" in args.cases:
            case_memory(tmp, ckpt)


if __name__ == "__main__":
    main()
