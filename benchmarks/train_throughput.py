"""Training throughput: `imgjobs train` (Ray Train, DDP) against the notebook's loop, on loose files and on shards.

The notebook's loop is torchvision's ImageFolder and a DataLoader with the same loader processes, transforms and
model (ResNet18, random weights) in one process. imgjobs trains on the same images as an image folder tree and as
shard folders (.tar of 64 members, streamed). Each side reports its second epoch's images/s (the first warms up
caches and allocators) on two sets: the seed's own train/ (245 ants/bees photos), where what is paid once per epoch
weighs most, and train/ repeated 5 times (as links, 1,225 photos). Rounds alternate the sides, and each side's median
is compared; Ray's start-up is left out of the ratio and reported on its own (command start to first training step).

The ceiling is training steps of the model alone on ready tensors. It is measured again beside an idle local Ray
holding as many idle actors as a training job's helpers: their ratio is Ray's floor, what Ray's own processes take
from a small machine before imgjobs does anything. The plain loop too runs beside an idle Ray, in its own rounds:
that ratio is Ray's floor for the loop, which loads images in processes of its own and so loses more to Ray's
wakeups than the model alone does. Each imgjobs side prints how far under either floor it falls.

    .venv/bin/python benchmarks/train_throughput.py [--data DIR] [--cases 4x1,32x1] [--copies 1,5] [--rounds 3]

With --exact-decode-too, imgjobs on loose files also runs with data.exact_decode=true: on big photos that shows what
reduced-size decoding gives (the notebook's loop decodes at full size, as PyTorch does).

With --gpu, every side runs on this machine's first GPU (cases of one worker), under the autocast that
`train.amp=auto` chooses there (bf16 from sm_80 on, else fp16 with a GradScaler), in channels_last; imgjobs runs
with train.amp=auto and train.channels_last=true (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import cluster  # noqa: E402
from pipeline.hardware import cpu_model, gpu_capability, gpu_half_precision  # noqa: E402
from pipeline.models import build_model  # noqa: E402
from pipeline.train.data import scan_image_folder  # noqa: E402
from pipeline.train.transforms import train_transform  # noqa: E402

# The processes a 1-worker `imgjobs train` holds besides its worker and Ray's own daemons: Ray Train's controller,
# placement-group cleaner, synchronization actor, preemption watcher, dataset manager and autoscaling coordinator,
# the job's line queue, and an idle worker that Ray keeps started.
RAY_TRAIN_HELPERS = 8
PLAIN = ("plain", "plain beside an idle Ray")  # compare()'s sides that return images/s alone


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
    """The notebook's way: ImageFolder, DataLoader, SGD, in one process. Returns the last epoch's images/s."""
    from torchvision.datasets import ImageFolder

    torch.manual_seed(0)
    dataset = ImageFolder(f"{data_root}/train")
    model, spec = device.model(len(dataset.classes))
    dataset.transform = train_transform(spec)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=loader_workers,
                        pin_memory=device.type == "cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scaler = device.scaler()
    model.train()
    for _ in range(epochs):
        seen, start = 0, time.perf_counter()
        for images, targets in loader:
            device.step(model, optimizer, scaler, images, targets)
            seen += len(targets)
        device.synchronize()
        rate = seen / (time.perf_counter() - start)
    return rate


def training_copies(data_root: str, work: Path, copies: int, per_shard: int = 64) -> tuple[str, str]:
    """data_root with train/ repeated `copies` times (as links), as an image folder tree and as shard folders of
    `per_shard` members in class folders."""
    loose, shards = work / "loose", work / "shards"
    for split in ("train", "val"):
        files = sorted(p for p in Path(data_root, split).rglob("*") if p.is_file() and not p.name.startswith("."))
        members = []
        for copy in range(copies if split == "train" else 1):
            for path in files:
                member = path.relative_to(Path(data_root, split)).with_stem(f"{path.stem}-{copy}")
                (loose / split / member).parent.mkdir(parents=True, exist_ok=True)
                (loose / split / member).symlink_to(path.resolve())
                members.append(member)
        members.sort(key=lambda m: (m.name, str(m)))  # classes mixed within shards, as labeling writes them
        (shards / split).mkdir(parents=True)
        for n, first in enumerate(range(0, len(members), per_shard)):
            with tarfile.open(shards / split / f"{n:06d}.tar", "w", dereference=True) as tar:
                for member in members[first:first + per_shard]:
                    tar.add(loose / split / member, str(member))
    return str(loose), str(shards)


def model_only(batch_size: int, device: Device, seconds: float = 10.0) -> float:
    """The ceiling: forward, backward and SGD step on ready tensors, no data loading at all, for `seconds`."""
    torch.manual_seed(0)
    model, _ = device.model(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    scaler = device.scaler()
    images, targets = torch.randn(batch_size, 3, 224, 224), torch.randint(0, 2, (batch_size,))
    model.train()
    device.step(model, optimizer, scaler, images, targets)  # the first step warms up
    device.synchronize()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        device.step(model, optimizer, scaler, images, targets)
        steps += 1
    device.synchronize()
    return batch_size * steps / (time.perf_counter() - start)


@contextlib.contextmanager
def idle_ray(actors: int = RAY_TRAIN_HELPERS):
    """For the block, a local Ray as `imgjobs train` starts its own (pipeline.cluster.init_ray: nice-0 workers, a
    dashboard), holding `actors` idle actors: what Ray's own processes cost before the job does anything."""
    import ray

    @ray.remote(num_cpus=0)
    class Idle:  # defined here, so Ray ships it by value to workers that cannot import this script
        def ready(self) -> bool:
            return True

    cluster.init_ray(training=True)
    try:
        idle = [Idle.remote() for _ in range(actors)]
        ray.get([actor.ready.remote() for actor in idle])
        yield
    finally:
        ray.shutdown()


def beside_idle_ray(measure):
    """What `measure()` returns when run beside an idle Ray."""
    with idle_ray():
        return measure()


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


def median_and_range(rates: list[float]) -> str:
    return f"{statistics.median(rates):.1f} ({min(rates):.1f}-{max(rates):.1f})"


def compare(loose: str, shards: str, batch: int, workers: int, floor: float, args, device: Device) -> None:
    """One case on one set: the sides in alternating rounds, each side's median against the plain loop's, and
    what is left of the gap once Ray's floor (the ceiling beside an idle Ray over the ceiling) or the loop's (the
    plain loop beside an idle Ray over the plain loop) is taken off."""
    def plain():
        return plain_loop(loose, batch, args.epochs, args.loader_workers, device)

    sides = dict(zip(PLAIN, (plain, lambda: beside_idle_ray(plain)), strict=True))
    for name, root, overrides in [("imgjobs", loose, ()), ("imgjobs, shards", shards, ())] + [
            ("imgjobs, exact decode", loose, ("data.exact_decode=true",))] * args.exact_decode_too:
        sides[name] = lambda root=root, overrides=overrides: imgjobs_train(
            root, batch, workers, args.epochs, args.loader_workers, args.gpu, *overrides)
    rates, startups = {name: [] for name in sides}, {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, run in sides.items():
            result = run()
            rates[name].append(result if name in PLAIN else result["images_per_s"])
            if name not in PLAIN:
                startups[name].append(result["startup_s"])
    plain = statistics.median(rates["plain"])
    loop_floor = min(1.0, statistics.median(rates["plain beside an idle Ray"]) / plain)
    print(f"  batch {batch}, {workers} worker(s): plain {median_and_range(rates['plain'])} img/s, beside an idle "
          f"Ray {median_and_range(rates['plain beside an idle Ray'])}: Ray's floor for the loop {loop_floor:.2f}x",
          flush=True)
    for name in [name for name in sides if name not in PLAIN]:
        ratio = statistics.median(rates[name]) / plain
        print(f"    {name}: {median_and_range(rates[name])} img/s, {ratio:.2f}x plain, {max(0, floor - ratio):.2f} "
              f"under Ray's floor of {floor:.2f}x, {max(0, loop_floor - ratio):.2f} under the loop's; start-up "
              f"{statistics.median(startups[name]):.1f} s", flush=True)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(f"    shards vs loose files: {medians['imgjobs, shards'] / medians['imgjobs']:.2f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "hymenoptera"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--cases", default="4x1,32x1", help="BATCHxWORKERS, comma-separated")
    parser.add_argument("--copies", default="1,5", help="train/ repeated this many times (1: the seed's own set), "
                                                        "comma-separated")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side; medians compared")
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--exact-decode-too", action="store_true",
                        help="also run imgjobs on loose files with data.exact_decode=true")
    parser.add_argument("--gpu", action="store_true", help="on this machine's first GPU, with train.amp=auto")
    args = parser.parse_args()
    device = Device(args.gpu)
    where = f"{cpu_model()}, {os.cpu_count()} cores"
    if args.gpu:
        amp, why = gpu_half_precision(gpu_capability())
        where = f"{torch.cuda.get_device_name(0)} ({amp}: {why}) beside {where}"
    print(f"{time.strftime('%Y-%m-%d %H:%M')} on {where}, torch {torch.__version__}; medians of {args.rounds} "
          "alternating rounds (range)", flush=True)
    cases = [tuple(map(int, case.split("x"))) for case in args.cases.split(",")]
    floors = {}  # batch -> what Ray's idle processes leave of the ceiling
    for batch in sorted({batch for batch, _ in cases}):
        alone, beside = [], []
        for _ in range(args.rounds):
            alone.append(model_only(batch, device))
            beside.append(beside_idle_ray(lambda: model_only(batch, device)))
        floors[batch] = min(1.0, statistics.median(beside) / statistics.median(alone))
        print(f"batch {batch}: ceiling {median_and_range(alone)} img/s, {median_and_range(beside)} beside an idle "
              f"local Ray with {RAY_TRAIN_HELPERS} idle actors: Ray's floor {floors[batch]:.2f}x", flush=True)
    for copies in map(int, args.copies.split(",")):
        with tempfile.TemporaryDirectory() as work:
            loose, shards = training_copies(args.data, Path(work), copies)
            print(f"{len(scan_image_folder(loose).train)} train images: {args.data}/train x {copies}", flush=True)
            for batch, workers in cases:
                compare(loose, shards, batch, workers, floors[batch], args, device)


if __name__ == "__main__":
    main()
