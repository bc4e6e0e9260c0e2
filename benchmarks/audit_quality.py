"""`imgjobs audit` against known label errors. A share of each set's train images (10%, seeded) is moved to another
class's folder; the audit of the noisy set, by each audit.method asked for (linear heads on frozen features, or the
config's own training per fold), is scored against the moves (precision and recall of `suspect` among the train
images), and its time is put beside one `imgjobs train` of the same config. Then the same recipe trains on the clean
labels, on the noisy ones, and on the noisy ones less each audit's suspects (data.exclude), and each run's best
checkpoint labels the same clean val folder with --evaluate: the accuracies compare on the same images.

Sets: the full-resolution ants/bees photos (../shared/data/hymenoptera) with configs/demo.yaml's recipe, and a
generated set of five colour classes (tests.helpers.make_image_folder) with the same backbone and a random head.
Every command is the user's: subprocesses of `python -m jobs.cli`, each with its own local Ray, or with --nodes N
all on one local cluster of N worker nodes that share this machine's cores (where audit.method train runs its folds
side by side).

    .venv/bin/python benchmarks/audit_quality.py [--share 0.1] [--folds 5] [--methods linear,train]
        [--sets ants,colours] [--finetune] [--audit-only] [--nodes N] [--work /tmp/audit-quality]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.hardware import cpu_model  # noqa: E402
from tests.helpers import LocalCluster, make_image_folder  # noqa: E402

PHOTOS = REPO.parent / "shared" / "data" / "hymenoptera"


def linked_tree(source: Path, target: Path) -> list[Path]:
    """`target` mirrors `source`'s class folders with symlinks; returns the train links."""
    links = []
    for image in sorted(p for p in source.rglob("*") if p.is_file()):
        link = target / image.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(image.resolve())
        if link.relative_to(target).parts[0] == "train":
            links.append(link)
    return links


def move_labels(train: list[Path], share: float, seed: int) -> set[str]:
    """Move `share` of the train images to another class's folder (chosen at random); returns their new paths."""
    rng = random.Random(seed)
    classes = sorted({p.parent.name for p in train})
    moved = set()
    for link in rng.sample(train, round(share * len(train))):
        wrong = rng.choice([c for c in classes if c != link.parent.name])
        target = link.parent.parent / wrong / f"moved-{link.parent.name}-{link.name}"
        link.rename(target)
        moved.add(str(target))
    return moved


ENV = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # each command's: its own local Ray, or --nodes'


def command(*args: str) -> tuple[float, str]:
    """Run `imgjobs ARGS`; (seconds, stdout). Fails loudly: a figure from a failed run is no figure."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=ENV)
    if done.returncode:
        sys.exit(f"imgjobs {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def write_config(path: Path, name: str, root: Path, runs: Path, recipe: dict, audit: dict) -> Path:
    config = json.loads(json.dumps(recipe))
    config.update(name=name, data={**config.get("data", {}), "root": str(root)}, storage={"path": str(runs)},
                  audit=audit)
    path.write_text(json.dumps(config))
    return path


def accuracy(run: Path, val: Path, out: Path) -> float:
    command("label", "--checkpoint", str(run), "--input", str(val), "--output", str(out), "--evaluate")
    return json.loads((out / "_summary.json").read_text())["runs"][-1]["accuracy"]


def measure(name: str, clean: Path, recipe: dict, work: Path, share: float, folds: int, methods: list[str],
            retrain: bool = True) -> dict:
    work = work / name.split(",")[0].replace("/", "-").replace(" ", "-")
    noisy = work / "noisy"
    moved = move_labels(linked_tree(clean, noisy), share, seed=0)
    runs = work / "runs"
    configs = {kind: write_config(work / f"{kind}.json", kind, root, runs, recipe, {"folds": folds, "method": method})
               for kind, root, method in (("clean", clean, "linear"), ("noisy", noisy, "linear"),
                                          *((f"audit-{m}", noisy, m) for m in methods))}
    result = {"set": name, "moved": len(moved)}
    trains = {"clean": [], "noisy": []}
    for method in methods:
        seconds, _ = command("audit", "-c", str(configs[f"audit-{method}"]))
        rows = pd.read_parquet(runs / f"audit-{method}" / "audit")
        train = rows[rows["split"] == "train"]
        suspects = set(train.loc[train["suspect"], "path"])
        found = len(suspects & moved)
        result |= {"train images": len(train), f"{method}: suspects in train": len(suspects),
                   f"{method}: suspects in val (nothing moved there)": int(rows.loc[rows["split"] == "val",
                                                                                    "suspect"].sum()),
                   f"{method}: precision": round(found / max(1, len(suspects)), 3),
                   f"{method}: recall": round(found / len(moved), 3), f"{method}: audit s": round(seconds, 1)}
        trains[f"audit-{method}"] = [f"data.exclude={runs / f'audit-{method}' / 'audit'}"]
    if not retrain:
        return result
    seconds = {kind: command("train", "-c", str(configs[kind]), *extra)[0] for kind, extra in trains.items()}
    result |= {f"val acc, {kind} labels": accuracy(runs / kind, clean / "val", work / f"eval-{kind}")
               for kind in trains}
    return result | {"one `imgjobs train` of the noisy set, s": round(seconds["noisy"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.1, help="share of train images moved to a wrong class")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--methods", default="linear,train", help="audit.method values to compare")
    parser.add_argument("--sets", default="ants,colours", help="ants (full-resolution photos), colours (generated)")
    parser.add_argument("--finetune", action="store_true", help="the recipe with model.mode finetune: every layer")
    parser.add_argument("--audit-only", action="store_true", help="leave out the trainings on clean, noisy and "
                        "audited labels")
    parser.add_argument("--nodes", type=int, default=0, help="run on a local cluster of this many worker nodes, "
                        "which share the cores (0: each command starts its own local Ray)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/audit-quality"))
    args = parser.parse_args()
    if args.nodes:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stopped, it still stops its cluster
        cluster = LocalCluster({"num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1"},
                               [{"num_cpus": max(1, os.cpu_count() // args.nodes)}] * args.nodes)
        ENV.update(cluster.env())
        try:
            measure_all(args)
        finally:
            cluster.stop()
    else:
        measure_all(args)


def measure_all(args: argparse.Namespace) -> None:
    methods, sets = args.methods.split(","), args.sets.split(",")
    shutil.rmtree(args.work, ignore_errors=True)
    demo = json.loads(json.dumps(__import__("yaml").safe_load((REPO / "configs" / "demo.yaml").read_text())))
    if args.finetune:
        demo["model"]["mode"] = "finetune"
    colours = make_image_folder(args.work / "colours" / "clean", classes=("blue", "red", "green", "yellow", "purple"),
                                train_per_class=60, val_per_class=20, size=96)
    colour_recipe = {**demo, "model": {**demo["model"], "head_from_imagenet": None}}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, {cpu_model()}; {args.share:.0%} of train moved, {args.folds} folds, "
          f"audit.method {args.methods}; configs/demo.yaml's recipe on {demo['model']['arch']}, model.mode "
          f"{demo['model']['mode']}" + (f"; a local cluster of {args.nodes} worker nodes" if args.nodes else ""))
    results = [measure(*chosen, args.work, args.share, args.folds, methods, not args.audit_only) for key, *chosen in (
        ("ants", "ants/bees, full resolution", PHOTOS, demo),
        ("colours", "5 colours, generated", colours, colour_recipe)) if key in sets]
    print(f"| | {' | '.join(r['set'] for r in results)} |\n|---|{'---|' * len(results)}")
    for key in list(results[0])[1:]:
        print(f"| {key} | {' | '.join(str(r[key]) for r in results)} |")


if __name__ == "__main__":
    main()
