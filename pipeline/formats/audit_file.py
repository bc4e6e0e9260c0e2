"""The output of `imgjobs audit`, <storage.path>/<name>/audit/: one Parquet file with a row per training image,
`_summary.json` and `_report.html` beside it, and its work in `_features/`, `_runs/` and `_folds/`, which Parquet
readers (pandas, pyarrow, DuckDB) pass over, as they pass over every name starting with `_`.

Training reads it back for `data.exclude`: the keys of the suspects. No torch or Ray here.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline import storage
from pipeline.errors import UsageError

FILE = "audit.parquet"
SUMMARY = "_summary.json"
REPORT = "_report.html"
CONFIG = "_config.json"  # what the audit was started with: a rerun with another is refused
FEATURES = "_features"  # one file per part of the feature pass, each written once
FOLDS = "_folds"  # one file per fold's out-of-fold probabilities, each written once
RUNS = "_runs"  # audit.method train: one imgjobs train run per fold

SCHEMA = pa.schema([
    ("path", pa.string()),  # the image's key, as training names it (FOLDER/NAME or ARCHIVE!MEMBER)
    ("split", pa.string()),  # train or val
    ("label", pa.string()),  # the given label
    ("suggested_label", pa.string()),  # the likeliest class out of fold; null for an image that did not decode
    ("self_confidence", pa.float32()),  # the out-of-fold probability of the given label
    ("suspect", pa.bool_()),  # confident learning says the given label is likely wrong
    ("error", pa.string()),  # why the image could not be read or decoded; null for the others
])


def fold_file(fold: int, folds: int) -> str:
    """Fold `fold`'s (from 0) file of out-of-fold probabilities."""
    return f"{FOLDS}/fold-{fold + 1}-of-{folds}.parquet"


def suspect_keys(audit_dir: str) -> pa.Array:
    """The keys of the images an audit marks as suspects, for data.exclude."""
    fs, base = storage.resolve(audit_dir)
    try:
        table = ds.dataset(f"{base}/{FILE}", filesystem=fs, format="parquet").to_table(
            columns=["path"], filter=pc.field("suspect"))
    except (FileNotFoundError, pa.ArrowInvalid) as e:
        raise UsageError(f"data.exclude: {audit_dir} holds no finished audit ({str(e).splitlines()[0]}); run "
                         "imgjobs audit with the same config first, or name its <storage.path>/<name>/audit "
                         "folder") from None
    return table["path"].combine_chunks()
