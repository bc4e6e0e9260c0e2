"""`imgjobs audit` against known label errors. A share of each set's train images (10%, seeded) is moved to another
class's folder; the audit of the noisy set is scored against the moves (precision and recall of `suspect` among the
train images), and its time is put beside one `imgjobs train` of the same config. Then the same recipe trains on
the clean labels, on the noisy ones, and on the noisy ones less the audit's suspects (data.exclude), and each run's
best checkpoint labels the same clean val folder with --evaluate: the accuracies compare on the same images.

Sets: the full-resolution ants/bees photos (../shared/data/hymenoptera) with configs/demo.yaml's recipe, and a
generated set of five colour classes (tests.helpers.make_image_folder) with the same backbone and a random head.
Every command is the user's: subprocesses of `python -m jobs.cli`, each with its own local Ray.

    .venv/bin/python benchmarks/audit_quality.py [--share 0.1] [--folds 5] [--work /tmp/audit-quality]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.hardware import cpu_model  # noqa: E402
from tests.helpers import make_image_folder  # noqa: E402

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


def command(*args: str) -> tuple[float, str]:
    """Run `imgjobs ARGS`; (seconds, stdout). Fails loudly: a figure from a failed run is no figure."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    if done.returncode:
        sys.exit(f"imgjobs {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.perf_counter() - started, done.stdout


def write_config(path: Path, name: str, root: Path, runs: Path, recipe: dict, folds: int) -> Path:
    config = json.loads(json.dumps(recipe))
    config.update(name=name, data={**config.get("data", {}), "root": str(root)}, storage={"path": str(runs)},
                  audit={"folds": folds})
    path.write_text(json.dumps(config))
    return path


def accuracy(run: Path, val: Path, out: Path) -> float:
    command("label", "--checkpoint", str(run), "--input", str(val), "--output", str(out), "--evaluate")
    return json.loads((out / "_summary.json").read_text())["runs"][-1]["accuracy"]


def measure(name: str, clean: Path, recipe: dict, work: Path, share: float, folds: int) -> dict:
    work = work / name.split(",")[0].replace("/", "-").replace(" ", "-")
    noisy = work / "noisy"
    moved = move_labels(linked_tree(clean, noisy), share, seed=0)
    runs = work / "runs"
    configs = {kind: write_config(work / f"{kind}.json", kind, root, runs, recipe, folds)
               for kind, root in (("clean", clean), ("noisy", noisy), ("audited", noisy))}
    audit_seconds, _ = command("audit", "-c", str(configs["noisy"]))
    rows = pd.read_parquet(runs / "noisy" / "audit")
    train = rows[rows["split"] == "train"]
    suspects = set(train.loc[train["suspect"], "path"])
    found = len(suspects & moved)
    seconds = {}
    for kind in configs:
        extra = [f"data.exclude={runs / 'noisy' / 'audit'}"] if kind == "audited" else []
        seconds[kind], _ = command("train", "-c", str(configs[kind]), *extra)
    return {
        "set": name, "train images": len(train), "moved": len(moved), "suspects in train": len(suspects),
        "suspects in val": int(rows.loc[rows["split"] == "val", "suspect"].sum()),
        "precision": round(found / max(1, len(suspects)), 3), "recall": round(found / len(moved), 3),
        **{f"val acc, {kind} labels": accuracy(runs / kind, clean / "val", work / f"eval-{kind}")
           for kind in configs},
        "audit s": round(audit_seconds, 1), "train s (noisy)": round(seconds["noisy"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--share", type=float, default=0.1, help="share of train images moved to a wrong class")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/audit-quality"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    demo = json.loads(json.dumps(__import__("yaml").safe_load((REPO / "configs" / "demo.yaml").read_text())))
    colours = make_image_folder(args.work / "colours" / "clean", classes=("blue", "red", "green", "yellow", "purple"),
                                train_per_class=60, val_per_class=20, size=96)
    colour_recipe = {**demo, "model": {**demo["model"], "head_from_imagenet": None}}
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_model()}; {args.share:.0%} of train moved, {args.folds} folds, "
          f"features of {demo['model']['arch']} ({demo['model']['weights']})")
    results = [measure("ants/bees, full resolution", PHOTOS, demo, args.work, args.share, args.folds),
               measure("5 colours, generated", colours, colour_recipe, args.work, args.share, args.folds)]
    print(f"| | {' | '.join(r['set'] for r in results)} |\n|---|{'---|' * len(results)}")
    for key in list(results[0])[1:]:
        print(f"| {key} | {' | '.join(str(r[key]) for r in results)} |")


if __name__ == "__main__":
    main()
