"""OUTPUT/_report.html: one self-contained page to review a label output (`imgjobs report`, `imgjobs label --report`).
Its name starts with `_`, as every file of an output does that is not labels: Parquet readers skip such names, so
the folder reads as a dataset as it stands.

The page is built from what the output holds, the Parquet files and _summary.json, so it can be rebuilt at any
time: after resumes, after the job, on another machine. Its styles are inline and its thumbnails are data: URIs,
so it opens offline and can be mailed. Its size is bounded whatever the output's size: it shows at most
MAX_THUMBNAILS images, chosen by the rule the page states, and counts for everything else.
"""

from __future__ import annotations

import base64
import io
import time
from collections import Counter

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipeline import storage
from pipeline.console import timestamp
from pipeline.errors import UsageError
from pipeline.images import decode_image
from pipeline.keys import Reader
from pipeline.label.evaluate import true_classes
from pipeline.label.output import LEGACY_REPORT, read_runs
from pipeline.labels_file import part_paths, provenance_of, read_table
from pipeline.metrics import confusion_matrix

REPORT = "_report.html"
COLUMNS = ["path", "label", "label_index", "score", "topk_labels", "topk_scores", "uncertain", "error", "error_kind"]
THUMB_PX = 128
PER_CLASS = 12  # least confident images shown per class...
CLASS_THUMBNAILS = 240  # ...and in all classes together: fewer per class, and only the largest, past 20 classes
UNCERTAIN_SHOWN = 48
MISTAKES_SHOWN = 48
MAX_THUMBNAILS = CLASS_THUMBNAILS + UNCERTAIN_SHOWN + MISTAKES_SHOWN
ERRORS_SHOWN = 10  # example rows per error reason
BINS = 20  # of the top-1 score histogram, over [0, 1]


def write_report(output: str, log=print) -> str:
    """Build OUTPUT/_report.html from the output's files and return its path."""
    fs, base = storage.resolve(output)
    parts = part_paths(fs, base)
    if not parts:
        raise UsageError(f"{output} holds no labels files; pass the --output folder of an imgjobs label run")
    tables = [read_table(fs, path, COLUMNS) for path in parts]
    provenance = provenance_of(tables[0].schema, parts[0])
    rows = pa.concat_tables([t.replace_schema_metadata() for t in tables])
    runs = read_runs(fs, base)  # none for a job killed before its end: its Parquet files are all the page needs
    path, query = storage.split_query(output)
    thumbnails = Thumbnails({storage.host(path): query} if storage.is_uri(path) and query else {})
    page = render(Page(path, rows, provenance, runs, thumbnails))  # no query: it may hold credentials
    target = f"{base}/{REPORT}"
    storage.write_bytes(fs, target, page.encode())
    if fs.get_file_info(f"{base}/{LEGACY_REPORT}").type == pafs.FileType.File:
        fs.delete_file(f"{base}/{LEGACY_REPORT}")
    shown = storage.join(output, REPORT)
    log(f"report: {shown} ({len(page) / 2**20:.1f} MiB, {thumbnails.count} thumbnails, {rows.num_rows} rows)")
    return shown


class Thumbnails:
    """JPEG data: URIs of the images the page shows, THUMB_PX on the long side, read the way labeling reads."""

    def __init__(self, options: dict[str, str]):
        self.reader = Reader(options)
        self.count = 0

    def of(self, key: str) -> dict:
        """{"src": a data: URI} or, for an image that cannot be read now, {"error": why}."""
        try:
            image = decode_image(self.reader.read_key(key), draft_size=THUMB_PX)
        except Exception as e:  # moved, deleted, or in a compressed archive: the row still shows, without a picture
            return {"error": str(e)[:200]}
        image.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=75)
        self.count += 1
        return {"src": f"data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}"}


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.label"), autoescape=True,
                               undefined=jinja2.StrictUndefined)


def render(page: Page) -> str:
    return TEMPLATES.get_template("report.html.j2").render(page.context())


class Page:
    """What the page shows, worked out from the output's rows: the template (templates/report.html.j2) lays it out."""

    def __init__(self, output: str, rows: pa.Table, provenance: dict, runs: list[dict], thumbnails: Thumbnails):
        self.output, self.rows, self.provenance, self.runs = output, rows, provenance, runs
        self.thumbnails = thumbnails
        self.classes = provenance["classes"]
        self.ok = rows.filter(pc.is_null(rows.column("error")))
        self.threshold = provenance.get("min_confidence") or 0
        self.evaluated = next((r for r in reversed(runs) if r.get("evaluated_roots")), None)

    def context(self) -> dict:
        return {
            "output": self.output,
            "classes": self.classes,
            "threshold": self.threshold,
            "facts": self.facts(),
            "runs": [[r.get(key) for key in ("run_id", "started", "labeled", "errors", "skipped_existing", "seconds",
                                             "images_per_s", "images_per_s_after_startup")] for r in self.runs],
            "class_counts": self.class_counts(),
            "histogram": self.histogram(),
            "evaluation": self.evaluation(),
            "least": self.least_confident(),
            "limits": {"total": MAX_THUMBNAILS, "per_class": self.shown_per_class(), "uncertain": UNCERTAIN_SHOWN,
                       "mistakes": MISTAKES_SHOWN},
            "uncertain": self.uncertain(),
            "errors": self.errors(),
        }

    def facts(self) -> list[tuple[str, object]]:
        total, ok = self.rows.num_rows, self.ok.num_rows
        uncertain = pc.sum(pc.fill_null(self.rows.column("uncertain"), False)).as_py() or 0
        p = self.provenance
        return [("rows", total), ("labeled", ok), ("errors", total - ok), ("uncertain", uncertain),
                ("checkpoint", p["checkpoint"]), ("model", f"{p['arch']}, {p.get('compute_precision', '?')}"),
                ("classes", len(self.classes)), ("page built", timestamp(time.time()))]

    def class_counts(self) -> list[tuple[str, int, str]]:
        """(class, images, bar width in px), the largest first."""
        counts = Counter(self.ok.column("label").to_pylist())
        peak = max(counts.values(), default=1)
        return [(name, n, f"{200 * n / peak:.0f}") for name, n in counts.most_common()]

    def histogram(self) -> dict:
        scores = self.ok.column("score").to_numpy()
        counts, _ = np.histogram(scores, bins=BINS, range=(0.0, 1.0))
        peak = max(counts.max(initial=0), 1)
        return {"scored": len(scores),
                "bins": [{"range": f"{i / BINS:.2f}–{(i + 1) / BINS:.2f}", "count": int(n),
                          "height": f"{100 * n / peak:.1f}"} for i, n in enumerate(counts)]}

    def evaluation(self) -> dict | None:
        if not self.evaluated:
            return None
        roots = self.evaluated["evaluated_roots"]
        targets = true_classes(self.ok.column("path").to_pylist(), roots, self.classes)
        predicted = self.ok.column("label_index").to_pylist()
        pairs = [(t, p) for t, p in zip(targets, predicted) if t is not None]
        matrix = confusion_matrix([t for t, _ in pairs], [p for _, p in pairs], len(self.classes))
        evaluated = sum(map(sum, matrix))
        correct = sum(matrix[i][i] for i in range(len(self.classes)))
        wrong = [i for i, (t, p) in enumerate(zip(targets, predicted)) if t is not None and t != p]
        wrong.sort(key=lambda i: -self.ok.column("score")[i].as_py())  # the most confident mistakes first
        return {"accuracy": correct / max(evaluated, 1), "evaluated": evaluated, "roots": roots,
                "matrix": list(zip(self.classes, matrix)), "wrong": len(wrong),
                "mistakes": [self.card(i, self.ok, f"true: {self.classes[targets[i]]}")
                             for i in wrong[:MISTAKES_SHOWN]]}

    def shown_per_class(self) -> int:
        classes = len(set(self.ok.column("label_index").to_pylist()))
        return min(PER_CLASS, max(1, CLASS_THUMBNAILS // max(classes, 1)))

    def least_confident(self) -> list[dict]:
        counts = Counter(self.ok.column("label_index").to_pylist())
        per_class = self.shown_per_class()
        largest = [c for c, _ in counts.most_common(CLASS_THUMBNAILS // per_class)]
        ordered = self.ok.sort_by([("label_index", "ascending"), ("score", "ascending")])
        starts = np.searchsorted(ordered.column("label_index").to_numpy(), largest)
        return [{"name": self.classes[cls], "count": counts[cls],
                 "cards": [self.card(i, ordered) for i in range(start, start + min(per_class, counts[cls]))]}
                for cls, start in zip(largest, starts)]

    def uncertain(self) -> dict:
        rows = self.ok.filter(pc.fill_null(self.ok.column("uncertain"), False)).sort_by("score")
        return {"count": rows.num_rows, "cards": [self.card(i, rows) for i in range(min(rows.num_rows,
                                                                                          UNCERTAIN_SHOWN))]}

    def errors(self) -> dict:
        errors = self.rows.filter(pc.is_valid(self.rows.column("error")))
        groups: dict[str, list[tuple[str, str]]] = {}
        for path, error, kind in zip(*(errors.column(c).to_pylist() for c in ("path", "error", "error_kind"))):
            groups.setdefault(f"{kind}: {error.split(':', 1)[0]}", []).append((path, error))
        return {"count": errors.num_rows, "shown": ERRORS_SHOWN,
                "groups": [{"reason": reason, "count": len(items), "examples": items[:ERRORS_SHOWN]}
                           for reason, items in sorted(groups.items(), key=lambda g: -len(g[1]))]}

    def card(self, i: int, rows: pa.Table, note: str = "") -> dict:
        row = {c: rows.column(c)[i].as_py() for c in ("path", "label", "score", "topk_labels", "topk_scores")}
        topk = ", ".join(f"{label} {score:.2f}" for label, score in zip(row["topk_labels"], row["topk_scores"]))
        return {"thumb": self.thumbnails.of(row["path"]), "label": row["label"], "score": row["score"],
                "note": note, "topk": topk, "path": row["path"]}
