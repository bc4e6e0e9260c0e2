"""Run outputs: summary.json, metrics.csv, the terminal table, PNG plots and TensorBoard event files."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline import storage
from pipeline.formats.keys import Reader
from pipeline.images import decode_image, resize_center_crop
from pipeline.train.splits import TrainingData

TENSORBOARD = "tensorboard"
METRIC_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds", "images_per_s"]


def epoch_table(history: list[dict]) -> str:
    """The seed's per-epoch table: Epoch | Train Acc | Val Acc | losses | lr | time."""
    header = (f"{'Epoch':>5} | {'Train Acc':>9} | {'Val Acc':>7} | {'Train Loss':>10} | {'Val Loss':>8} | "
              f"{'LR':>8} | {'Time':>6}")
    rows = [header, "-" * len(header)]
    for m in history:
        rows.append(
            f"{m['epoch']:>5} | {m['train_acc']:>9.4f} | {m['val_acc']:>7.4f} | {m['train_loss']:>10.4f} | "
            f"{m['val_loss']:>8.4f} | {m['lr']:>8.2g} | {m['epoch_seconds']:>5.1f}s"
        )
    return "\n".join(rows)


def write_run_outputs(run_dir: str, summary: dict, best: dict, dataset: TrainingData) -> None:
    fs, base = storage.resolve(run_dir)
    history = summary["epochs"]
    storage.write_bytes(fs, f"{base}/summary.json", json.dumps(summary, indent=2).encode())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    storage.write_bytes(fs, f"{base}/metrics.csv", buf.getvalue().encode())
    storage.write_bytes(fs, f"{base}/curves.png", _png(_curves(history)))
    confusion = _confusion(summary["confusion_matrix"], dataset.classes)
    storage.write_bytes(fs, f"{base}/confusion_matrix.png", _png(confusion))
    grid = _prediction_grid(best["val"]["examples"], dataset)
    grid.canvas.draw()
    pixels = np.asarray(grid.canvas.buffer_rgba())[..., :3].copy()
    storage.write_bytes(fs, f"{base}/predictions.png", _png(grid))
    _tensorboard(fs, f"{base}/{TENSORBOARD}", history, pixels, summary["best_epoch"])


def _tensorboard(fs, folder: str, history: list[dict], predictions, best_epoch: int) -> None:
    """Event files with the per-epoch scalars and the prediction grid, for `tensorboard --logdir <storage.path>`.
    Written whole at the end of each run (a resumed run's replace the earlier ones) in a local folder, then
    copied, so that the run folder may be on S3."""
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        for m in history:
            for split in ("train", "val"):
                writer.add_scalar(f"loss/{split}", m[f"{split}_loss"], m["epoch"])
                writer.add_scalar(f"accuracy/{split}", m[f"{split}_acc"], m["epoch"])
            writer.add_scalar("lr", m["lr"], m["epoch"])
            writer.add_scalar("images_per_s", m["images_per_s"], m["epoch"])
        writer.add_image("predictions (best checkpoint)", predictions, best_epoch, dataformats="HWC")
        writer.close()
        if fs.get_file_info(folder).type == pafs.FileType.Directory:
            fs.delete_dir(folder)
        for event_file in Path(tmp).iterdir():
            storage.write_bytes(fs, f"{folder}/{event_file.name}", event_file.read_bytes())


def _figure(**options) -> Figure:
    """A figure drawn to pixels, not pyplot's: no global state, so runs side by side (an audit's) plot at once."""
    fig = Figure(**options)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _curves(history: list[dict]):
    epochs = [m["epoch"] for m in history]
    fig = _figure(figsize=(10, 4))
    acc, loss = fig.subplots(1, 2)
    for ax, metric in ((acc, "acc"), (loss, "loss")):
        ax.plot(epochs, [m[f"train_{metric}"] for m in history], marker="o", label="train")
        ax.plot(epochs, [m[f"val_{metric}"] for m in history], marker="o", label="val")
        ax.set_xlabel("epoch")
        ax.set_title("accuracy" if metric == "acc" else "loss")
        ax.legend()
        ax.grid(alpha=0.3)
    return fig


def _confusion(matrix: list[list[int]], classes: list[str]):
    n = len(classes)
    fig = _figure(figsize=(2 + 0.8 * n, 2 + 0.8 * n))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    peak = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            ax.text(j, i, matrix[i][j], ha="center", va="center", color="white" if matrix[i][j] > peak / 2 else "black")
    ax.set_title("val confusion matrix (best checkpoint)")
    return fig


def _prediction_grid(examples: list, dataset: TrainingData, count: int = 16):
    """Val images with predicted vs true labels, from the best epoch's (key, true, predicted) examples:
    misclassifications first, in red, then correct ones of every class. Members of archives are read from them."""
    wrong = [e for e in examples if e[1] != e[2]][: count // 2]
    right = [e for e in examples if e[1] == e[2]]
    # Take evenly spaced correct ones so every class shows, not just the first folder.
    right = right[:: max(1, len(right) // (count - len(wrong)))][: count - len(wrong)]
    shown = wrong + right
    reader = Reader.for_root(dataset.root)
    cols = 4
    rows = max(1, (len(shown) + cols - 1) // cols)
    fig = _figure(figsize=(3 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (key, true, predicted) in zip(axes.flat, shown):
        ax.imshow(resize_center_crop(decode_image(reader.read_key(key)), 128, 128))
        ax.set_title(
            f"{'WRONG ' if true != predicted else ''}pred: {dataset.classes[predicted]}\n"
            f"true: {dataset.classes[true]}",
            color="red" if true != predicted else "green",
            fontsize=10,
        )
    return fig
