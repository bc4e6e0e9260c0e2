"""`imgjobs label --evaluate`: accuracy of the labels of class-folder inputs (root/<class>/...)."""

from __future__ import annotations

import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.label.output import LabelWriter
from pipeline.metrics import confusion_matrix


def check_class_folders(roots: list[str], classes: list[str]) -> None:
    if not roots:
        raise UsageError("--evaluate needs a directory input with one folder per class, e.g. data/hymenoptera/val")
    for root in roots:
        fs, base = storage.resolve(root)
        folders = {
            e.base_name for e in fs.get_file_info(pafs.FileSelector(base))
            if e.type == pafs.FileType.Directory and not e.base_name.startswith(".")
        }
        if not folders or not folders <= set(classes):
            raise UsageError(
                f"--evaluate: {root} has folders {sorted(folders)}, not a subset of the checkpoint's classes {classes}"
            )


def evaluate(writer: LabelWriter, roots: list[str], classes: list[str]) -> dict:
    """Accuracy and confusion matrix over every labeled image of the class-folder inputs in the output,
    earlier runs' rows included, so a resumed job reports the whole collection."""
    rows = writer.read_all(["path", "label_index"])
    index = {name: i for i, name in enumerate(classes)}
    prefixes = [storage.split_query(r)[0].rstrip("/") + "/" for r in roots]
    targets, predictions, unlabeled = [], [], 0
    for path, predicted in zip(rows.column("path").to_pylist(), rows.column("label_index").to_pylist()):
        prefix = next((p for p in prefixes if path.startswith(p)), None)
        folder, _, rest = path[len(prefix):].partition("/") if prefix else (None, "", "")
        if folder not in index or not rest:  # not inside a class folder of an evaluated tree
            continue
        if predicted is None:
            unlabeled += 1
            continue
        targets.append(index[folder])
        predictions.append(predicted)
    correct = sum(t == p for t, p in zip(targets, predictions))
    return {
        "accuracy": round(correct / len(targets), 4) if targets else None,
        "evaluated": len(targets),
        "evaluated_errors": unlabeled,
        "confusion_matrix": confusion_matrix(targets, predictions, len(classes)),
    }
