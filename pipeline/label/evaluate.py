"""`imgjobs label --evaluate`: accuracy of the labels of class-folder inputs (root/<class>/...)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.confusion import confusion_matrix
from pipeline.errors import UsageError
from pipeline.formats.keys import split_member


def check_class_folders(roots: list[str], classes: list[str], option: str) -> None:
    """That `option`'s directories hold one folder per class, each named as one of `classes`."""
    if not roots:
        raise UsageError(f"{option} needs a directory with one folder per class, e.g. data/hymenoptera/val")
    for root in roots:
        fs, base = storage.resolve(root)
        folders = {
            e.base_name for e in fs.get_file_info(pafs.FileSelector(base))
            if e.type == pafs.FileType.Directory and not e.base_name.startswith(".")
        }
        if not folders or not folders <= set(classes):
            raise UsageError(
                f"{option}: {root} has folders {sorted(folders)}, not a subset of the checkpoint's classes {classes}"
            )


def true_classes(paths: list[str], roots: list[str], classes: list[str]) -> np.ndarray:
    """The class index each path's folder names (root/<class>/...), -1 for paths outside the class folders. An
    archive's member takes its class from its own folder inside the archive (root/shard.tar!<class>/...), else
    from the archive's folder (root/<class>/shard.tar!...)."""
    index = {name: i for i, name in enumerate(classes)}
    prefixes = [storage.split_query(r)[0].rstrip("/") + "/" for r in roots]
    found = np.full(len(paths), -1, dtype=np.int64)
    for i, path in enumerate(paths):
        prefix = next((p for p in prefixes if path.startswith(p)), None)
        if prefix is None:
            continue
        archive, member = split_member(path)
        inner, _, in_folder = member.partition("/") if archive else ("", "", "")
        folder, _, rest = path[len(prefix):].partition("/")
        if in_folder and inner in index:
            found[i] = index[inner]
        elif folder in index and rest:
            found[i] = index[folder]
    return found


def truth_and_prediction(rows: pa.Table, roots: list[str], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `rows` (path and label_index columns): its true class (-1 outside the class folders) and the
    predicted one (-1 for error rows)."""
    predicted = pc.fill_null(rows.column("label_index"), -1).to_numpy().astype(np.int64)
    return true_classes(rows.column("path").to_pylist(), roots, classes), predicted


def evaluate(tables: Iterable[pa.Table], roots: list[str], classes: list[str]) -> dict:
    """Accuracy and confusion matrix over the labeled images of the class-folder inputs among the rows of `tables`
    (path and label_index columns, and `accepted` where the labels have it), one labels file at a time. The job
    passes every file of the output, earlier runs' included, so a resumed job reports the whole collection."""
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    errors = 0
    marked = False  # the labels have an `accepted` column (--target-precision)
    accepted = np.zeros(len(classes), dtype=np.int64)  # per predicted class: the accepted rows
    accepted_right = np.zeros(len(classes), dtype=np.int64)  # and those of them that are right
    for rows in tables:
        truth, predicted = truth_and_prediction(rows, roots, classes)
        inside = truth >= 0
        errors += int((inside & (predicted < 0)).sum())
        labeled = inside & (predicted >= 0)
        matrix += confusion_matrix(truth[labeled], predicted[labeled], len(classes))
        if "accepted" in rows.column_names:
            marked = True
            taken = labeled & rows.column("accepted").to_numpy(zero_copy_only=False)
            accepted += np.bincount(predicted[taken], minlength=len(classes))
            accepted_right += np.bincount(predicted[taken & (truth == predicted)], minlength=len(classes))
    evaluated = int(matrix.sum())
    found = {
        "accuracy": round(int(np.trace(matrix)) / evaluated, 4) if evaluated else None,
        "evaluated": evaluated,
        "evaluated_errors": errors,
        "evaluated_roots": roots,
        "confusion_matrix": matrix.tolist(),
    }
    if marked:
        found |= realized(accepted, accepted_right, matrix, classes)
    return found


def realized(accepted: np.ndarray, right: np.ndarray, matrix: np.ndarray, classes: list[str]) -> dict:
    """--target-precision's outcome on labeled class folders: the precision of the accepted rows and the share
    accepted, overall and per predicted class."""
    predicted = matrix.sum(axis=0)
    per_class = {name: {"accepted": int(a), "precision": round(int(r) / int(a), 4) if a else None,
                        "accepted_share": round(int(a) / int(p), 4) if p else None}
                 for name, a, r, p in zip(classes, accepted, right, predicted, strict=True)}
    total = int(accepted.sum())
    return {"accepted_precision": round(int(right.sum()) / total, 4) if total else None,
            "accepted_share": round(total / int(matrix.sum()), 4) if matrix.sum() else None,
            "accepted_by_class": per_class}
