"""Training data from labels: a labels Parquet (what `imgjobs label` wrote, perhaps corrected by people, or any
table with `path` and `label` columns), as train and val splits like an image folder tree's.

Rows with an error, a `score` under `data.min_score`, or with `data.accepted_only` an `accepted` that is false
(imgjobs label --target-precision), are left out. A `split` column (`train` / `val`) decides
the split where there is one; otherwise a stratified, seeded `data.val_fraction` of each class goes to val.
Paths are what labeling writes: local paths, URIs, and `ARCHIVE!MEMBER` for members of .tar and .zip archives.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import UsageError
from pipeline.formats.keys import archive_kind
from pipeline.formats.labels_file import PROVENANCE_KEY, is_part
from pipeline.train.splits import Layout, Split, TrainingData, sort_by_source, split_keys, with_layout

REQUIRED = ("path", "label")
OPTIONAL = ("score", "error", "split", "accepted")


def is_labels(root: str) -> bool:
    """Whether data.root names a labels Parquet (a .parquet file, or a folder of them without train/)."""
    fs, base = storage.resolve(root)
    if base.endswith(".parquet"):
        return True
    info = fs.get_file_info(base)
    return info.type == pafs.FileType.Directory and fs.get_file_info(f"{base}/train").type == pafs.FileType.NotFound \
        and bool(_parquet_files(fs, base))


def scan_labels(root: str, min_score: float, val_fraction: float, seed: int,
                accepted_only: bool = False) -> TrainingData:
    fs, base = storage.resolve(root)
    files = [base] if base.endswith(".parquet") else _parquet_files(fs, base)
    table, classes = _read(fs, files, root, min_score, accepted_only)
    labels = table["label"]
    classes = classes or sorted(pc.unique(labels).to_pylist())
    unknown = pc.unique(labels.filter(pc.invert(pc.is_in(labels, pa.array(classes))))).to_pylist()
    if unknown:
        raise UsageError(f"data.root: {root} has labels {sorted(unknown)} outside its classes {classes}; fix those "
                         "rows")
    if len(classes) < 2:
        raise UsageError(f"data.root: {root} needs rows of at least two classes after filtering, found {classes}")
    table = table.set_column(table.schema.get_field_index("label"), "target",
                             pc.index_in(labels, pa.array(classes)).cast(pa.int16()))
    by_split = {name: with_layout(Split.from_table(rows)) for name, rows in _split(table, classes, val_fraction,
                                                                                      seed, root).items()}
    for name, split in by_split.items():
        missing = sorted(set(range(len(classes))) - set(np.unique(split.targets).tolist()))
        if missing:
            raise UsageError(f"data.root: {root} leaves no {name} image of class {classes[missing[0]]!r} (after "
                             f"data.min_score {min_score}); lower data.min_score or label more images")
        sources = split.sources.to_pylist()
        compressed = next((s for s in sources if archive_kind(s) == "tar" and not s.lower().endswith(".tar")), None)
        if compressed and split.layout is not Layout.LABELED_MEMBERS:
            raise UsageError(f"data.root: {root} mixes members of compressed tars ({compressed}) with loose files in "
                             f"its {name} split; compressed tars are streamed whole, which needs every {name} row to "
                             "be an archive member: label the loose files into an archive, or train on them apart")
    return TrainingData(root, classes, by_split["train"], by_split["val"])


def _parquet_files(fs: pafs.FileSystem, base: str) -> list[str]:
    return sorted(e.path for e in fs.get_file_info(pafs.FileSelector(base)) if is_part(e))


def _read(fs: pafs.FileSystem, files: list[str], root: str, min_score: float,
          accepted_only: bool) -> tuple[pa.Table, list[str] | None]:
    """The rows kept for training, as (source, name, label[, split]), a file at a time so that no full path column
    is held; and the classes in their order when imgjobs label wrote them (its provenance metadata). Rows with an
    error, a score under `min_score`, or with `accepted_only` an `accepted` that is false, are left out; a person's
    correction may carry no score or accepted, and is kept."""
    tables, classes = [], None
    for path in files:
        try:
            with fs.open_input_file(path) as f:
                schema = pq.read_schema(f)
                columns = [c for c in (*REQUIRED, *OPTIONAL) if c in schema.names]
                missing = [c for c in (*REQUIRED, *(["accepted"] if accepted_only else [])) if c not in columns]
                if missing:
                    raise UsageError(f"data.root: {path} has no {missing[0]!r} column; a labels table needs "
                                     "'path' and 'label' columns, and data.accepted_only an 'accepted' one (imgjobs "
                                     "label --target-precision writes it)")
                part = pq.read_table(f, columns=columns)
        except (pa.ArrowInvalid, OSError) as e:
            raise UsageError(f"data.root: {path} cannot be read as Parquet: {str(e).splitlines()[0]}") from None
        keep = pc.is_valid(part["label"])
        if "error" in part.column_names:
            keep = pc.and_(keep, pc.fill_null(pc.equal(part["error"], ""), True))
        if "score" in part.column_names and min_score > 0:
            keep = pc.and_(keep, pc.fill_null(pc.greater_equal(part["score"], min_score), True))
        if accepted_only:
            keep = pc.and_(keep, pc.fill_null(part["accepted"], True))
        part = part.filter(keep)
        keys = split_keys(part["path"].combine_chunks().cast(pa.string()))
        kept = {"source": pc.dictionary_encode(keys.field("source")), "name": keys.field("name"),
                "label": part["label"].cast(pa.string())}
        if "split" in part.column_names:
            kept["split"] = part["split"].cast(pa.string())
        tables.append(pa.table(kept))
        provenance = (schema.metadata or {}).get(PROVENANCE_KEY)
        if provenance and classes is None:
            classes = json.loads(provenance).get("classes")
    if not tables:
        raise UsageError(f"data.root: {root} holds no Parquet files")
    return pa.concat_tables(tables, promote_options="permissive").unify_dictionaries(), classes


def _split(table: pa.Table, classes: list[str], val_fraction: float, seed: int, root: str) -> dict[str, pa.Table]:
    """train and val rows: by the `split` column where there is one; otherwise a stratified, seeded val_fraction of
    each class goes to val, taken from the rows in path order, so the same table always splits the same way."""
    if "split" in table.column_names:
        bad = table.filter(pc.invert(pc.fill_null(pc.is_in(table["split"], pa.array(["train", "val"])), False)))
        if len(bad):
            row = bad.slice(0, 1).to_pylist()[0]
            raise UsageError(f"data.root: {root} has split {row['split']!r} for {row['source']}/{row['name']}; use "
                             "'train' or 'val'")
        return {name: table.filter(pc.equal(table["split"], name)).drop_columns(["split"])
                for name in ("train", "val")}
    order = sort_by_source(table)
    targets = order["target"].to_numpy()
    rng = np.random.default_rng(seed)
    in_val = np.zeros(len(order), dtype=bool)
    for index in range(len(classes)):
        rows = np.flatnonzero(targets == index)
        # Every class in val, while train keeps one.
        n_val = max(round(len(rows) * val_fraction), 1) if len(rows) > 1 else 0
        in_val[rng.permutation(rows)[:n_val]] = True
    mask = pa.array(in_val)
    return {"val": order.filter(mask), "train": order.filter(pc.invert(mask))}
