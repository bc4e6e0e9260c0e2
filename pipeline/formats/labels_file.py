"""The labels file: the Parquet schema that `imgjobs label` writes and training reads back, its provenance
metadata, and how an output folder's committed files are told apart from its temporaries and summary (those
start with `.` or `_`, which Parquet readers skip)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import UsageError

OUTPUT_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("label", pa.string()),
    ("label_index", pa.int32()),
    ("score", pa.float32()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_scores", pa.list_(pa.float32())),
    ("uncertain", pa.bool_()),
    ("error", pa.string()),
    # "decode": the bytes are bad; "too_large": over a cap (keys.Limits, --max-pixels); "unsupported": not a file
    # imgjobs reads (a FIFO, a device, a manifest line that is no image); "empty": an archive of no image members;
    # "io": the storage failed, and a rerun retries it.
    ("error_kind", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
])
EMBEDDING = "embedding"  # with --embeddings: fixed-size list<float32>, the model's pooled features
# With --target-precision, after `uncertain`: the top-1 score is at or over its class's threshold (false on error rows)
ACCEPTED = pa.field("accepted", pa.bool_())
PROVENANCE_KEY = b"imgjobs"
UNITS_KEY = b"imgjobs_units"  # the file's rows per unit and the units it completes (pipeline.label.units)


@dataclass(frozen=True)
class Decoding:
    exact: bool  # every image decoded at full size: --exact-decode, or GPU actors


@dataclass(frozen=True)
class Provenance:
    """Where a labels file's labels came from: its schema metadata under PROVENANCE_KEY (as_dict, whose keys keep
    the fields' order), and part of each run's summary."""

    imgjobs_version: str
    checkpoint: str  # the checkpoint file's path
    weights_sha256: str  # of the checkpoint file
    arch: str
    classes: list[str]
    precision: str  # --precision
    decode: Decoding
    top_k: int
    min_confidence: float
    embeddings: int | None  # the embedding size; None without --embeddings
    compute_precision: str  # what the actors compute in: --precision, or what auto chose
    decode_device: str  # "gpu" where GPU actors decoded, else "cpu"
    target_precision: float | None = None  # --target-precision
    thresholds: dict[str, float | None] | None = None  # each class's threshold for `accepted`; None accepts nothing
    # Where the thresholds come from: the held-out source, each class's counts behind its threshold and expected
    # accepted share, and the held-out histograms (calibration.HeldOut.as_dict) that the review page draws.
    held_out: dict | None = None

    def as_dict(self) -> dict:
        """Without --target-precision, without its fields: such files read as those of imgjobs before it."""
        found = asdict(self)
        if self.target_precision is None:
            for name in ("target_precision", "thresholds", "held_out"):
                del found[name]
        return found


@dataclass(frozen=True)
class RowRules:
    """What a label row holds besides its label, as the predictor makes it: how many top-k, which rows are
    uncertain, and with --target-precision which are accepted."""

    top_k: int
    min_confidence: float = 0.0
    thresholds: tuple[float, ...] | None = None  # by class index; inf where a class accepts nothing


def output_schema(embedding_size: int | None = None, accepted: bool = False) -> pa.Schema:
    """The labels' columns, with `accepted` and the embedding column when the job writes them."""
    schema = OUTPUT_SCHEMA
    if accepted:
        schema = schema.insert(schema.get_field_index("uncertain") + 1, ACCEPTED)
    if embedding_size:
        schema = schema.append(pa.field(EMBEDDING, pa.list_(pa.float32(), embedding_size)))
    return schema


def provenance_of(schema: pa.Schema, path: str) -> dict:
    """The provenance recorded in the schema metadata of the labels file `path`."""
    try:
        return json.loads((schema.metadata or {})[PROVENANCE_KEY])
    except (KeyError, ValueError) as e:
        reason = str(e).splitlines()[0] or "no provenance"
        raise UsageError(f"output folder holds {path}, which is not a labels file of this imgjobs version ({reason}); "
                         "use another --output, or --overwrite") from None


def units_record(schema: pa.Schema, path: str) -> dict:
    """The unit record in the schema metadata of the labels file `path`."""
    try:
        return json.loads(schema.metadata[UNITS_KEY])
    except (KeyError, ValueError):
        raise UsageError(f"output folder holds {path}, written by imgjobs 0.1, which kept no record of its "
                         "units; finish that output with the imgjobs that began it, or use another --output, or "
                         "--overwrite") from None


def io_errors(table: pa.Table) -> pa.ChunkedArray:
    """True for the rows whose input could not be read (error_kind "io"), false for the others."""
    return pc.fill_null(pc.equal(table.column("error_kind"), "io"), False)


def is_part(entry: pafs.FileInfo) -> bool:
    """A committed labels file: a visible .parquet file (temporaries and _summary.json start with . or _)."""
    return entry.type == pafs.FileType.File and entry.base_name.endswith(".parquet") and entry.base_name[0] not in "._"


def part_paths(fs: pafs.FileSystem, base: str) -> list[str]:
    """The committed labels files in the output folder `base`, in name order; none where it does not exist."""
    try:
        entries = fs.get_file_info(pafs.FileSelector(base))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(e.path for e in entries if is_part(e))


def read_table(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    try:
        return pq.read_table(path, columns=columns, filesystem=fs)
    except (pa.ArrowInvalid, KeyError) as e:
        raise UsageError(f"output folder holds {path}, which is not a labels file of this imgjobs version "
                         f"({str(e).splitlines()[0]}); use another --output, or --overwrite") from None
