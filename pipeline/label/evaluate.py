"""`imgjobs label --evaluate`: accuracy of the labels of class-folder inputs (root/<class>/...)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.keys import split_member
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


def true_classes(paths: list[str], roots: list[str], classes: list[str]) -> list[int | None]:
    """The class index each path's folder names (root/<class>/...), None for paths outside the class folders. An
    archive's member takes its class from its own folder inside the archive (root/shard.tar!<class>/...), else
    from the archive's folder (root/<class>/shard.tar!...)."""
    index = {name: i for i, name in enumerate(classes)}
    prefixes = [storage.split_query(r)[0].rstrip("/") + "/" for r in roots]
    found = []
    for path in paths:
        prefix = next((p for p in prefixes if path.startswith(p)), None)
        if prefix is None:
            found.append(None)
            continue
        archive, member = split_member(path)
        inner, _, in_folder = member.partition("/") if archive else ("", "", "")
        folder, _, rest = path[len(prefix):].partition("/")
        found.append(index[inner] if in_folder and inner in index else index[folder] if folder in index and rest
                     else None)
    return found


def evaluate(rows: pa.Table, roots: list[str], classes: list[str]) -> dict:
    """Accuracy and confusion matrix over the labeled images of the class-folder inputs among `rows` (path and
    label_index columns). The job passes every row of the output, earlier runs' included, so a resumed job
    reports the whole collection."""
    targets = true_classes(rows.column("path").to_pylist(), roots, classes)
    pairs = [(t, p) for t, p in zip(targets, rows.column("label_index").to_pylist()) if t is not None]
    labeled = [(t, p) for t, p in pairs if p is not None]
    correct = sum(t == p for t, p in labeled)
    return {
        "accuracy": round(correct / len(labeled), 4) if labeled else None,
        "evaluated": len(labeled),
        "evaluated_errors": len(pairs) - len(labeled),
        "evaluated_roots": roots,
        "confusion_matrix": confusion_matrix([t for t, _ in labeled], [p for _, p in labeled], len(classes)),
    }
