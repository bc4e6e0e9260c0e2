"""Start-up: seconds from a command's start to its first labeled batch or first training step, for imgjobs against
the plain PyTorch way and against bare Ray, in one run.

    .venv/bin/python benchmarks/startup.py [--rounds 3] [--jobs label train]

For each job, three commands, each a fresh process, alternating over the rounds (medians, with every run):
  plain     the same work in one process without Ray: import torch and torchvision, load the checkpoint (labeling)
            or build the model (training), decode a first batch with a 2-worker DataLoader, run it (a step).
  bare Ray  the least a Ray script can do, none of it imgjobs: ray.init as imgjobs does it for the job, then a Ray
            Data pipeline of read tasks (PIL decoding) into one actor that imports torch (labeling), or a
            TorchTrainer whose one CPU worker imports torch and takes an SGD step of a linear model (training).
            What Ray itself costs on this machine: imgjobs can get close to it, not under it.
  imgjobs   `imgjobs label` of 16 photos with a ResNet18 checkpoint; `imgjobs train -c configs/train.yaml` with
            random weights, one epoch of a small folder.
Each is timed from its script's first line (time.time() there, as imgjobs' own figure is) to its first batch or
step. The photos are full-resolution ones from ../shared/data/hymenoptera. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import time

STARTED = time.time()  # before any import: the children's figures count from here, as imgjobs' own do

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PHOTOS = REPO.parent / "shared" / "data" / "hymenoptera"
CLASSES = ["ants", "bees"]


def first(kind: str) -> None:
    """A child's result line: seconds since its start."""
    print(f"FIRST {kind} {time.time() - STARTED:.3f}", flush=True)


# ---- the children: each runs in a fresh process (main runs them with --child NAME ARGS) ----

def plain_label(checkpoint: str, folder: str) -> None:
    import torch
    import torchvision
    from PIL import Image
    from torchvision import transforms as T

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = torchvision.models.resnet18(num_classes=len(state["classes"]))
    model.load_state_dict(state["model_state"])
    model.eval()
    transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    files = sorted(str(p) for p in Path(folder).iterdir())

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return transform(Image.open(files[i]).convert("RGB"))

    with torch.inference_mode():
        for batch in torch.utils.data.DataLoader(Files(), batch_size=8, num_workers=2):
            model(batch).softmax(1)
            first("label")
            break


def plain_train(folder: str) -> None:
    import torch
    import torchvision
    from torchvision import transforms as T

    transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = torchvision.datasets.ImageFolder(f"{folder}/train", transform)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Linear(model.fc.in_features, len(data.classes))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    for images, targets in torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, num_workers=2):
        torch.nn.functional.cross_entropy(model(images), targets).backward()
        optimizer.step()
        first("train")
        break


def bare_ray_label(folder: str) -> None:
    import numpy as np
    import ray
    from PIL import Image

    class Model:
        def __init__(self):
            import torch

            self.torch = torch

        def __call__(self, batch):
            return {"n": [len(batch["pixels"])]}

    def read(batch):
        images = [Image.open(path).convert("RGB").resize((224, 224)) for path in batch["path"]]
        return {"pixels": np.stack([np.asarray(image) for image in images])}

    ray.init(include_dashboard=False, logging_level="WARNING")
    files = sorted(str(p) for p in Path(folder).iterdir())
    dataset = (ray.data.from_items([{"path": f} for f in files], override_num_blocks=2)
               .map_batches(read, batch_size=None, num_cpus=0.5)
               .map_batches(Model, batch_size=None, compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1.5))
    for _ in dataset.iter_batches(batch_size=None):
        first("label")
        break


def bare_ray_train(out: str) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def loop(config):
        import torch

        model = torch.nn.Linear(10, 2)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(4, 10)).sum().backward()
        optimizer.step()
        Path(config["out"]).write_text(str(time.time() - config["started"]))

    ray.init(include_dashboard=True, logging_level="WARNING")  # Ray Train's placement-group cleaner needs it
    TorchTrainer(loop, train_loop_config={"out": out, "started": STARTED}, scaling_config=ScalingConfig(num_workers=1),
                 run_config=RunConfig(storage_path=str(Path(out).parent / "ray_results"))).fit()
    print(f"FIRST train {Path(out).read_text()}", flush=True)  # the worker's figure


CHILDREN = {"plain_label": plain_label, "plain_train": plain_train, "bare_ray_label": bare_ray_label,
            "bare_ray_train": bare_ray_train}


# ---- the parent ----

def env() -> dict:
    """A user's shell, with the repo importable by the children."""
    from tests.helpers import fresh_env

    return fresh_env() | {"PYTHONPATH": str(REPO)}


def child(name: str, *args: str) -> list[str]:
    return [sys.executable, __file__, "--child", name, *args]


def measure(command: list[str], tmp: Path, kind: str) -> float:
    """Run `command` and return its start-up figure in seconds."""
    done = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} failed:\n{(done.stdout + done.stderr)[-3000:]}")
    for line in done.stdout.splitlines():
        if line.startswith(f"FIRST {kind}"):
            return float(line.split()[2])
    if kind == "label":  # imgjobs label: its run's entry in _summary.json
        return json.loads((tmp / "labels" / "_summary.json").read_text())["runs"][-1]["startup_seconds"]
    summary = json.loads((tmp / "runs" / "startup" / "summary.json").read_text())
    return summary["epochs"][0]["startup_seconds"]


def commands(job: str, tmp: Path, checkpoint: str) -> dict[str, list[str]]:
    photos, folder = str(tmp / "photos"), str(tmp / "folder")
    if job == "label":
        return {
            "plain": child("plain_label", checkpoint, photos),
            "bare Ray": child("bare_ray_label", photos),
            "imgjobs": [sys.executable, "-m", "jobs.cli", "label", "--checkpoint", checkpoint, "--input", photos,
                        "--output", str(tmp / "labels"), "--overwrite"],
        }
    return {
        "plain": child("plain_train", folder),
        "bare Ray": child("bare_ray_train", str(tmp / "bare_ray_first_step")),
        "imgjobs": [sys.executable, "-m", "jobs.cli", "train", "-c", "configs/train.yaml", "--fresh", "name=startup",
                    f"data.root={folder}", "model.weights=none", "train.epochs=1", f"storage.path={tmp / 'runs'}"],
    }


def prepare(tmp: Path) -> str:
    """16 photos to label; a folder of 8 train and 4 val photos per class to train on; a ResNet18 checkpoint."""
    from tests.helpers import random_weight_checkpoint

    (tmp / "photos").mkdir()
    for name in sorted((PHOTOS / "val" / "ants").iterdir())[:16]:
        shutil.copy(name, tmp / "photos")
    for split, count in (("train", 8), ("val", 4)):
        for cls in CLASSES:
            (tmp / "folder" / split / cls).mkdir(parents=True)
            for name in sorted((PHOTOS / split / cls).iterdir())[:count]:
                shutil.copy(name, tmp / "folder" / split / cls)
    return str(random_weight_checkpoint("resnet18", CLASSES, tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", nargs="+", choices=["label", "train"], default=["label", "train"])
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        CHILDREN[args.child[0]](*args.child[1:])
        return
    sys.path.insert(0, str(REPO))
    from pipeline.hardware import cpu_model

    print(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "|", cpu_model(), "|", os.cpu_count(), "CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = prepare(tmp)
        for job in args.jobs:
            runs: dict[str, list[float]] = {}
            for _ in range(args.rounds):
                for name, command in commands(job, tmp, checkpoint).items():
                    runs.setdefault(name, []).append(measure(command, tmp, job))
            median = {name: statistics.median(times) for name, times in runs.items()}
            what = "first labeled batch" if job == "label" else "first training step"
            print(f"\n{job}: seconds from the command to its {what} (median of {args.rounds}; every run)")
            for name, times in runs.items():
                print(f"  {name:<9} {median[name]:6.1f}  {median[name] / median['plain']:5.2f}x plain  "
                      f"{median[name] / median['bare Ray']:5.2f}x bare Ray   ({', '.join(f'{t:.1f}' for t in times)})")


if __name__ == "__main__":
    main()
