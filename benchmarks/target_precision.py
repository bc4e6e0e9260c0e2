"""`imgjobs label --target-precision P` on a task that is hard on purpose: what precision the accepted rows reach, and
how many are accepted, beside the best single global score threshold chosen with hindsight on the same rows.

The task: K hue classes whose hues overlap (each image's hue is drawn around its class's with a spread that makes
neighbours confusable), so that accuracy lands near 0.85 and scores spread. The recipe is configs/demo.yaml's
backbone (EfficientNet-Lite0, ImageNet weights, frozen) with a random head, trained briefly; thresholds come from a
separate calibration tree (--calibration), and the figures from a test tree that neither training nor calibration
saw. Every command is the user's: `python -m jobs.cli`, each with its own local Ray.

    .venv/bin/python benchmarks/target_precision.py [--classes 4] [--per-class 300] [--work /tmp/target-precision]
"""

from __future__ import annotations

import argparse
import colorsys
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.hardware import cpu_model  # noqa: E402

TARGETS = (0.9, 0.95)
SPREAD = 0.25  # of the hue's standard deviation, in units of the gap between neighbouring classes


def hue_images(root: Path, classes: int, per_class: int, seed: int) -> None:
    """root/<class>/*.jpg: a disc of the image's hue on grey, with shapes of random colours over it."""
    rng = random.Random(seed)
    for c in range(classes):
        folder = root / f"hue{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            hue = (c + rng.gauss(0, SPREAD)) / classes % 1.0
            image = Image.new("RGB", (96, 96), (128, 128, 128))
            draw = ImageDraw.Draw(image)
            colour = tuple(round(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.8, 0.9))
            draw.ellipse((12, 12, 84, 84), fill=colour)
            for _ in range(5):
                x, y = rng.randrange(80), rng.randrange(80)
                draw.rectangle((x, y, x + 12, y + 12), fill=tuple(rng.randrange(256) for _ in range(3)))
            image.save(folder / f"{i:04d}.jpg", quality=90)


def imgjobs(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    if done.returncode:
        sys.exit(f"imgjobs {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def global_threshold(score: np.ndarray, right: np.ndarray, target: float) -> tuple[float, float, float]:
    """With hindsight: the lowest score threshold whose accepted rows reach `target` precision; (threshold, share
    accepted, precision). Rows sorted by score, best first: accepting the top n is a threshold."""
    order = np.argsort(-score, kind="stable")
    precision = np.cumsum(right[order]) / np.arange(1, len(order) + 1)
    reach = np.flatnonzero(precision >= target)
    if not len(reach):
        return 1.0, 0.0, float("nan")
    n = reach[-1] + 1
    return float(score[order][n - 1]), n / len(score), float(precision[n - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=300, help="calibration and test images per class")
    parser.add_argument("--work", type=Path, default=Path("/tmp/target-precision"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    for split, count, seed in (("train", 60, 1), ("val", 20, 2)):
        hue_images(args.work / "data" / split, args.classes, count, seed)
    hue_images(args.work / "calibration", args.classes, args.per_class, 3)
    hue_images(args.work / "test", args.classes, args.per_class, 4)
    config = {"name": "hues", "data": {"root": str(args.work / "data"), "calibration_fraction": 0},
              "model": {"arch": "efficientnet_lite0", "weights": "imagenet", "mode": "feature_extraction"},
              "train": {"epochs": 4, "batch_size": 16, "lr": 0.01, "step_size": 7, "gamma": 0.1},
              "storage": {"path": str(args.work / "runs")}}
    (args.work / "c.json").write_text(json.dumps(config))
    imgjobs("train", "-c", str(args.work / "c.json"))
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_model()}; {args.classes} hue classes, {args.per_class} calibration "
          f"and {args.per_class} test images per class\n")
    print("| target P | accuracy | accepted precision | accepted share | classes certified | global threshold "
          "(hindsight) | its share | its precision |\n|---|---|---|---|---|---|---|---|")
    for target in TARGETS:
        out = args.work / f"labels-{target}"
        imgjobs("label", "--checkpoint", str(args.work / "runs" / "hues"), "--input", str(args.work / "test"),
                "--output", str(out), "--target-precision", str(target), "--calibration",
                str(args.work / "calibration"), "--evaluate")
        run = json.loads((out / "_summary.json").read_text())["runs"][-1]
        rows = pq.read_table(out, columns=["path", "label", "score"]).to_pydict()
        right = np.array([Path(p).parent.name == label for p, label in zip(rows["path"], rows["label"])])
        threshold, share, precision = global_threshold(np.array(rows["score"]), right, target)
        certified = sum(1 for c in run["accepted_by_class"].values() if c["accepted"])
        print(f"| {target} | {run['accuracy']} | {run['accepted_precision']} | {run['accepted_share']} | "
              f"{certified}/{args.classes} | {threshold:.4f} | {share:.4f} | {precision:.4f} |")


if __name__ == "__main__":
    main()
