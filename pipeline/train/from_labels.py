"""Training data from labels: a labels Parquet (what `imgjobs label` wrote, perhaps corrected by people, or any
table with `path` and `label` columns), as train and val splits like an image folder tree's.

Rows with an error, or a `score` under `data.min_score`, are left out. A `split` column (`train` / `val`) decides
the split where there is one; otherwise a stratified, seeded `data.val_fraction` of each class goes to val.
Paths are what labeling writes: local paths, URIs, and `ARCHIVE!MEMBER` for members of .tar and .zip archives.
"""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.keys import split_member
from pipeline.labels_file import PROVENANCE_KEY, is_part
from pipeline.train.splits import Split, TrainingData

REQUIRED = ("path", "label")
OPTIONAL = ("score", "error", "split")


def is_labels(root: str) -> bool:
    """Whether data.root names a labels Parquet (a .parquet file, or a folder of them without train/)."""
    fs, base = storage.resolve(root)
    if base.endswith(".parquet"):
        return True
    info = fs.get_file_info(base)
    return info.type == pafs.FileType.Directory and fs.get_file_info(f"{base}/train").type == pafs.FileType.NotFound \
        and bool(_parquet_files(fs, base))


def scan_labels(root: str, min_score: float, val_fraction: float, seed: int) -> TrainingData:
    fs, base = storage.resolve(root)
    files = [base] if base.endswith(".parquet") else _parquet_files(fs, base)
    table, classes = _read(fs, files, root)
    keep = pc.is_valid(table["label"])
    if "error" in table.column_names:
        keep = pc.and_(keep, pc.fill_null(pc.equal(table["error"], ""), True))
    if "score" in table.column_names and min_score > 0:  # a person's correction may carry no score: kept
        keep = pc.and_(keep, pc.fill_null(pc.greater_equal(table["score"], min_score), True))
    table = table.filter(keep)
    rows = table.select(["path", "label"] + (["split"] if "split" in table.column_names else [])).to_pylist()
    classes = classes or sorted({r["label"] for r in rows})
    unknown = sorted({r["label"] for r in rows} - set(classes))
    if unknown:
        raise UsageError(f"data.root: {root} has labels {unknown} outside its classes {classes}; fix those rows")
    if len(classes) < 2:
        raise UsageError(f"data.root: {root} needs rows of at least two classes after filtering, found {classes}")
    tar_gz = next((r["path"] for r in rows if (split_member(r["path"])[0] or "").endswith((".gz", ".tgz"))), None)
    if tar_gz:
        raise UsageError(f"data.root: {root} names members of compressed tar archives ({tar_gz}), which cannot be "
                         "read one by one; label the images from a .tar, a .zip or a folder instead")
    by_split = _split(rows, classes, val_fraction, seed, root)
    for name, split in by_split.items():
        missing = sorted(set(range(len(classes))) - set(split.targets))
        if missing:
            raise UsageError(f"data.root: {root} leaves no {name} image of class {classes[missing[0]]!r} (after "
                             f"data.min_score {min_score}); lower data.min_score or label more images")
    return TrainingData(root, classes, by_split["train"], by_split["val"], keys=True)


def _parquet_files(fs: pafs.FileSystem, base: str) -> list[str]:
    return sorted(e.path for e in fs.get_file_info(pafs.FileSelector(base)) if is_part(e))


def _read(fs: pafs.FileSystem, files: list[str], root: str) -> tuple[pa.Table, list[str] | None]:
    """The rows, and the classes in their order when imgjobs label wrote them (its provenance metadata)."""
    tables, classes = [], None
    for path in files:
        try:
            with fs.open_input_file(path) as f:
                schema = pq.read_schema(f)
                columns = [c for c in (*REQUIRED, *OPTIONAL) if c in schema.names]
                missing = [c for c in REQUIRED if c not in columns]
                if missing:
                    raise UsageError(f"data.root: {path} has no {missing[0]!r} column; a labels table needs "
                                     "'path' and 'label' columns")
                tables.append(pq.read_table(f, columns=columns))
        except (pa.ArrowInvalid, OSError) as e:
            raise UsageError(f"data.root: {path} cannot be read as Parquet: {str(e).splitlines()[0]}") from None
        provenance = (schema.metadata or {}).get(PROVENANCE_KEY)
        if provenance and classes is None:
            classes = json.loads(provenance).get("classes")
    if not tables:
        raise UsageError(f"data.root: {root} holds no Parquet files")
    return pa.concat_tables(tables, promote_options="permissive"), classes


def _split(rows: list[dict], classes: list[str], val_fraction: float, seed: int, root: str) -> dict[str, Split]:
    index = {name: i for i, name in enumerate(classes)}
    splits = {"train": Split([], []), "val": Split([], [])}
    if rows and "split" in rows[0]:
        for r in rows:
            if r["split"] not in splits:
                raise UsageError(f"data.root: {root} has split {r['split']!r} for {r['path']}; use 'train' or 'val'")
            splits[r["split"]].paths.append(r["path"])
            splits[r["split"]].targets.append(index[r["label"]])
        return splits
    rng = random.Random(seed)
    by_class = {name: [] for name in classes}
    for r in rows:
        by_class[r["label"]].append(r["path"])
    for name in classes:
        paths = sorted(by_class[name])
        rng.shuffle(paths)
        n_val = round(len(paths) * val_fraction) if len(paths) > 1 else 0
        n_val = max(n_val, 1) if len(paths) > 1 else n_val  # every class in val, while train keeps one
        for split, part in (("val", paths[:n_val]), ("train", paths[n_val:])):
            splits[split].paths += part
            splits[split].targets += [index[name]] * len(part)
    return splits
