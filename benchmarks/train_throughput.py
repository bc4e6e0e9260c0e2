"""Training throughput: `imgjobs train` (Ray Train, DDP) against a plain single-process PyTorch loop.

Images/s, with the model-only ceiling (training steps on ready tensors) beside them.
Same data (data/hymenoptera train), same transforms, ResNet18 with random weights, same cores. Both sides
report their second epoch's images/s (the first warms up caches and allocators); Ray's start-up is left
out of the ratio and reported on its own (command start to first training step).

    .venv/bin/python benchmarks/train_throughput.py [--epochs 2] [--cases 4x1,32x1,4x2,32x2]

With --exact-decode-too, each case also runs with data.exact_decode=true: on big photos (--data a folder of
12 MP JPEGs) that shows what reduced-size decoding gives (the plain loop decodes at full size, as PyTorch does).

With --gpu, every side runs on this machine's first GPU (cases of one worker), under the autocast that
`train.amp=auto` chooses there (bf16 from sm_80 on, else fp16 with a GradScaler), in channels_last; imgjobs runs
with train.amp=auto and train.channels_last=true (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.hardware import cpu_model, gpu_capability, gpu_half_precision  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.train.data import scan_image_folder  # noqa: E402
from pipeline.train.dataset import ImageDataset, collate_skipping  # noqa: E402
from pipeline.train.transforms import train_transform  # noqa: E402


class Device:
    """Where the plain loop and the ceiling run: the CPU in fp32, or the first GPU under train.amp=auto's autocast."""

    def __init__(self, gpu: bool):
        self.type = "cuda" if gpu else "cpu"
        amp = gpu_half_precision(gpu_capability())[0] if gpu else None
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.format = torch.channels_last if gpu else torch.contiguous_format

    def model(self, classes: int):
        model, spec = build_model("resnet18", classes, "none")
        return model.to(self.type, memory_format=self.format), spec

    def autocast(self):
        return torch.autocast(self.type, dtype=self.dtype, enabled=self.dtype is not None)

    def scaler(self):
        return torch.amp.GradScaler(self.type, enabled=self.dtype is torch.float16)

    def step(self, model, optimizer, scaler, images, targets) -> None:
        images = images.to(self.type, non_blocking=True).contiguous(memory_format=self.format)
        targets = targets.to(self.type, non_blocking=True)
        optimizer.zero_grad()
        with self.autocast():
            loss = torch.nn.functional.cross_entropy(model(images).float(), targets)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def synchronize(self) -> None:
        if self.type == "cuda":
            torch.cuda.synchronize()


def plain_loop(data_root: str, batch_size: int, epochs: int, loader_workers: int, device: Device) -> float:
    """The notebook way: one process, DataLoader, SGD. Returns the last epoch's images/s."""
    torch.manual_seed(0)
    folder = scan_image_folder(data_root)
    model, spec = device.model(len(folder.classes))
    dataset = ImageDataset(data_root, folder.train, train_transform(spec))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=loader_workers,
                        collate_fn=collate_skipping, pin_memory=device.type == "cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scaler = device.scaler()
    model.train()
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        for images, targets, _, _ in loader:
            device.step(model, optimizer, scaler, images, targets)
            seen += len(targets)
        device.synchronize()
        rate = seen / (time.perf_counter() - start)
    return rate


def model_only(batch_size: int, device: Device, steps: int = 5) -> float:
    """The ceiling: forward, backward and SGD step on ready tensors, no data loading at all."""
    torch.manual_seed(0)
    model, _ = device.model(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scaler = device.scaler()
    images, targets = torch.randn(batch_size, 3, 224, 224), torch.randint(0, 2, (batch_size,))
    model.train()
    for step in range(steps + 1):
        if step == 1:  # the first step warms up
            device.synchronize()
            start = time.perf_counter()
        device.step(model, optimizer, scaler, images, targets)
    device.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


def imgjobs_train(data_root: str, batch_size: int, workers: int, epochs: int, loader_workers: int, gpu: bool,
                  *overrides: str) -> dict:
    on = ["scaling.use_gpu=true", "train.amp=auto", "train.channels_last=true"] if gpu else ["scaling.use_gpu=false"]
    with tempfile.TemporaryDirectory() as storage:
        cmd = [
            sys.executable, "-m", "jobs.cli", "train", "-c", str(REPO / "configs" / "train.yaml"),
            "name=bench", f"data.root={data_root}", "model.weights=none", f"train.epochs={epochs}",
            f"train.batch_size={batch_size}", f"scaling.num_workers={workers}", *on,
            f"train.num_data_workers={loader_workers}", f"storage.path={storage}", *overrides,
        ]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO)
        summary = json.loads((Path(storage) / "bench" / "summary.json").read_text())
    return {"images_per_s": summary["epochs"][-1]["images_per_s"], "startup_s": summary["epochs"][0]["startup_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO / "data" / "hymenoptera"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cases", default="4x1,32x1,4x2,32x2", help="BATCHxWORKERS, comma-separated")
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--exact-decode-too", action="store_true",
                        help="also run each case with data.exact_decode=true")
    parser.add_argument("--gpu", action="store_true", help="on this machine's first GPU, with train.amp=auto")
    args = parser.parse_args()
    device = Device(args.gpu)
    where = f"{cpu_model()}, {os.cpu_count()} cores"
    if args.gpu:
        amp, why = gpu_half_precision(gpu_capability())
        where = f"{torch.cuda.get_device_name(0)} ({amp}: {why}) beside {where}"
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {where}, torch {torch.__version__}")
    print(f"{'batch':>5} {'workers':>7} {'ceiling':>8} {'plain':>6} {'imgjobs':>7} {'vs plain':>8} "
          f"{'vs ceiling':>10} {'start-up s':>10}")
    plain, ceiling = {}, {}
    for case in args.cases.split(","):
        batch, workers = map(int, case.split("x"))
        if batch not in plain:
            ceiling[batch] = model_only(batch, device)
            plain[batch] = plain_loop(args.data, batch, args.epochs, args.loader_workers, device)
        for overrides in [()] + [("data.exact_decode=true",)] * args.exact_decode_too:
            job = imgjobs_train(args.data, batch, workers, args.epochs, args.loader_workers, args.gpu, *overrides)
            rate = job["images_per_s"]
            print(f"{batch:>5} {workers:>7} {ceiling[batch]:>8.1f} {plain[batch]:>6.1f} {rate:>7.1f} "
                  f"{rate / plain[batch]:>8.2f} {rate / ceiling[batch]:>10.2f} {job['startup_s']:>10.1f} "
                  f"{' '.join(overrides)}", flush=True)


if __name__ == "__main__":
    main()
