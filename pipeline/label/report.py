"""OUTPUT/_report.html: one self-contained page to review a label output (`imgjobs report`, `imgjobs label --report`).
Its name starts with `_`, as every file of an output does that is not labels: Parquet readers skip such names, so
the folder reads as a dataset as it stands.

The page is built from what the output holds, the Parquet files and _summary.json, so it can be rebuilt at any
time: after resumes, after the job, on another machine. Its styles are inline and its thumbnails are data: URIs,
so it opens offline and can be mailed. Its size is bounded whatever the output's size: it shows at most
MAX_THUMBNAILS images, chosen by the rule the page states, and counts for everything else. So is its memory: it
reads the columns it needs one labels file at a time, and keeps counts and the few rows it may show (Tally).
"""

from __future__ import annotations

import time

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.confusion import confusion_matrix
from pipeline.console import timestamp
from pipeline.errors import UsageError
from pipeline.formats.calibration import EDGES, HeldOut
from pipeline.formats.keys import Reader
from pipeline.formats.labels_file import part_paths, provenance_of, read_table
from pipeline.label.evaluate import truth_and_prediction
from pipeline.label.output import LEGACY_REPORT, read_runs
from pipeline.thumbnails import Thumbnails

REPORT = "_report.html"
COLUMNS = ["path", "label", "label_index", "score", "topk_labels", "topk_scores", "uncertain", "error", "error_kind"]
PER_CLASS = 12  # least confident images shown per class...
CLASS_THUMBNAILS = 240  # ...and in all classes together: fewer per class, and only the largest, past 20 classes
UNCERTAIN_SHOWN = 48
MISTAKES_SHOWN = 48
MAX_THUMBNAILS = CLASS_THUMBNAILS + UNCERTAIN_SHOWN + MISTAKES_SHOWN
ERRORS_SHOWN = 10  # example rows per error reason
BINS = 20  # of the top-1 score histogram, over [0, 1], and of the reliability diagrams
DIAGRAMS = 48  # reliability diagrams shown, for the classes with the most labels
DIAGRAM_PX = 200


def write_report(output: str, log=print) -> str:
    """Build OUTPUT/_report.html from the output's files and return its path."""
    fs, base = storage.resolve(output)
    parts = part_paths(fs, base)
    if not parts:
        raise UsageError(f"{output} holds no labels files; pass the --output folder of an imgjobs label run")
    provenance = provenance_of(pq.read_schema(parts[0], filesystem=fs), parts[0])
    runs = read_runs(fs, base)  # none for a job killed before its end: its Parquet files are all the page needs
    evaluated = next((r["evaluated_roots"] for r in reversed(runs) if r.get("evaluated_roots")), None)
    tally = Tally(provenance["classes"], evaluated)
    columns = [*COLUMNS, *(["accepted"] if provenance.get("target_precision") is not None else [])]
    for part in parts:
        tally.add(read_table(fs, part, columns))
    path, query = storage.split_query(output)
    thumbnails = Thumbnails(Reader({storage.host(path): query} if storage.is_uri(path) and query else {}))
    page = render(Page(path, tally, provenance, runs, thumbnails))  # no query: it may hold credentials
    target = f"{base}/{REPORT}"
    storage.write_bytes(fs, target, page.encode())
    if fs.get_file_info(f"{base}/{LEGACY_REPORT}").type == pafs.FileType.File:
        fs.delete_file(f"{base}/{LEGACY_REPORT}")
    shown = storage.join(output, REPORT)
    log(f"report: {shown} ({len(page) / 2**20:.1f} MiB, {thumbnails.count} thumbnails, {tally.rows} rows)")
    return shown


class Tally:
    """What the page needs of the output's rows, gathered one labels file at a time: counts, and only the rows it
    may show (the lowest-scored of each class, of the uncertain rows, the most confident mistakes, examples of each
    error)."""

    def __init__(self, classes: list[str], evaluated_roots: list[str] | None):
        self.classes, self.roots = classes, evaluated_roots
        self.rows = self.ok = self.uncertain_count = self.wrong = 0
        self.class_counts = np.zeros(len(classes), dtype=np.int64)
        self.accepted = np.zeros(len(classes), dtype=np.int64)  # by predicted class, with --target-precision
        self.histogram = np.zeros(BINS, dtype=np.int64)
        self.matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
        self.least = self.uncertain = self.mistakes = None  # tables of candidate rows
        self.errors: dict[str, list] = {}  # reason -> [count, examples]

    def add(self, rows: pa.Table) -> None:
        rows = rows.replace_schema_metadata()
        ok = rows.filter(pc.is_null(rows.column("error")))
        self.rows, self.ok = self.rows + rows.num_rows, self.ok + ok.num_rows
        labels = ok.column("label_index").to_numpy()
        self.class_counts += np.bincount(labels, minlength=len(self.classes))
        if "accepted" in ok.column_names:
            taken = ok.column("accepted").to_numpy(zero_copy_only=False)
            self.accepted += np.bincount(labels[taken], minlength=len(self.classes))
        self.histogram += np.histogram(ok.column("score").to_numpy(), bins=BINS, range=(0.0, 1.0))[0]
        self.least = _lowest_per_class(_concat(self.least, ok), PER_CLASS)
        uncertain = ok.filter(pc.fill_null(ok.column("uncertain"), False))
        self.uncertain_count += uncertain.num_rows
        self.uncertain = _concat(self.uncertain, uncertain).sort_by("score").slice(0, UNCERTAIN_SHOWN)
        if self.roots:
            truth, predicted = truth_and_prediction(ok, self.roots, self.classes)
            inside = truth >= 0
            self.matrix += confusion_matrix(truth[inside], predicted[inside], len(self.classes))
            wrong = inside & (truth != predicted)
            self.wrong += int(wrong.sum())
            mistakes = ok.filter(pa.array(wrong)).append_column("true", pa.array(truth[wrong]))
            self.mistakes = _concat(self.mistakes, mistakes).sort_by([("score", "descending")]).slice(0, MISTAKES_SHOWN)
        errors = rows.filter(pc.is_valid(rows.column("error")))
        for path, error, kind in zip(*(errors.column(c).to_pylist() for c in ("path", "error", "error_kind"))):
            group = self.errors.setdefault(f"{kind}: {error.split(':', 1)[0]}", [0, []])
            group[0] += 1
            if len(group[1]) < ERRORS_SHOWN:
                group[1].append((path, error))


def reliability(right: np.ndarray, wrong: np.ndarray, threshold: float | None) -> dict:
    """A reliability diagram's marks, in pixels of a DIAGRAM_PX square (y grows downwards): per BINS-th of the score
    axis that holds held-out rows, a dot at (the bin's middle, the share of them that were right), its area by its
    rows, titled with its counts; the threshold's vertical line, if any."""
    uniform = np.minimum((EDGES * BINS).astype(int), BINS - 1)  # the plotted bin of each calibration bin
    right_in, wrong_in = (np.bincount(uniform, weights=w, minlength=BINS) for w in (right, wrong))
    rows = right_in + wrong_in
    peak = max(rows.max(initial=0), 1)
    dots = [{"x": round((b + 0.5) / BINS * DIAGRAM_PX, 1), "y": round((1 - right_in[b] / rows[b]) * DIAGRAM_PX, 1),
             "r": round(2 + 5 * np.sqrt(rows[b] / peak), 1),
             "title": f"scores {b / BINS:.2f}–{(b + 1) / BINS:.2f}: {int(right_in[b])} right, {int(wrong_in[b])} wrong"}
            for b in np.flatnonzero(rows)]
    return {"dots": dots, "threshold_x": None if threshold is None else round(threshold * DIAGRAM_PX, 1)}


def _concat(kept: pa.Table | None, more: pa.Table) -> pa.Table:
    return more if kept is None else pa.concat_tables([kept, more])


def _lowest_per_class(rows: pa.Table, n: int) -> pa.Table:
    """The `n` lowest-scored rows of each class, by class then score."""
    rows = rows.sort_by([("label_index", "ascending"), ("score", "ascending")])
    labels = rows.column("label_index").to_numpy()
    rank = np.arange(len(labels)) - np.searchsorted(labels, labels)  # position within its class
    return rows.filter(pa.array(rank < n))


TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.label"), autoescape=True,
                               undefined=jinja2.StrictUndefined)


def render(page: Page) -> str:
    return TEMPLATES.get_template("report.html.j2").render(page.context())


class Page:
    """What the page shows, worked out from the output's tally: the template (templates/report.html.j2) lays it out."""

    def __init__(self, output: str, tally: Tally, provenance: dict, runs: list[dict], thumbnails: Thumbnails):
        self.output, self.tally, self.provenance, self.runs = output, tally, provenance, runs
        self.thumbnails = thumbnails
        self.classes = provenance["classes"]
        self.threshold = provenance.get("min_confidence") or 0

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
            "acceptance": self.acceptance(),
            "least": self.least_confident(),
            "limits": {"total": MAX_THUMBNAILS, "per_class": self.shown_per_class(), "uncertain": UNCERTAIN_SHOWN,
                       "mistakes": MISTAKES_SHOWN},
            "uncertain": {"count": self.tally.uncertain_count, "cards": self.cards(self.tally.uncertain)},
            "errors": self.errors(),
        }

    def facts(self) -> list[tuple[str, object]]:
        t, p = self.tally, self.provenance
        return [("rows", t.rows), ("labeled", t.ok), ("errors", t.rows - t.ok), ("uncertain", t.uncertain_count),
                ("checkpoint", p["checkpoint"]), ("model", f"{p['arch']}, {p.get('compute_precision', '?')}"),
                ("classes", len(self.classes)), ("page built", timestamp(time.time()))]

    def class_counts(self) -> list[tuple[str, int, str]]:
        """(class, images, bar width in px), the largest first."""
        counts = self.tally.class_counts
        peak = max(int(counts.max(initial=0)), 1)
        return [(self.classes[i], int(counts[i]), f"{200 * counts[i] / peak:.0f}")
                for i in np.argsort(-counts, kind="stable") if counts[i]]

    def histogram(self) -> dict:
        counts = self.tally.histogram
        peak = max(int(counts.max(initial=0)), 1)
        return {"scored": int(counts.sum()),
                "bins": [{"range": f"{i / BINS:.2f}–{(i + 1) / BINS:.2f}", "count": int(n),
                          "height": f"{100 * n / peak:.1f}"} for i, n in enumerate(counts)]}

    def evaluation(self) -> dict | None:
        t = self.tally
        if not t.roots:
            return None
        evaluated = int(t.matrix.sum())
        mistakes = t.mistakes
        notes = [f"true: {self.classes[i]}" for i in mistakes.column("true").to_pylist()]
        return {"accuracy": int(np.trace(t.matrix)) / max(evaluated, 1), "evaluated": evaluated, "roots": t.roots,
                "matrix": list(zip(self.classes, t.matrix.tolist())), "wrong": t.wrong,
                "mistakes": self.cards(mistakes, notes)}

    def acceptance(self) -> dict | None:
        """With --target-precision: per class its threshold, the share of its labels accepted (expected from the
        held-out images, and found here), and a reliability diagram of the held-out scores."""
        target = self.provenance.get("target_precision")
        if target is None:
            return None
        held = self.provenance["held_out"]
        histograms = HeldOut.of_dict(held["histograms"])
        counts = self.tally.class_counts
        rows = []
        for c, name in enumerate(self.classes):
            stats = held["classes"][name]
            rows.append({"name": name, **stats, "labels": int(counts[c]), "accepted": int(self.tally.accepted[c]),
                         "found_share": self.tally.accepted[c] / counts[c] if counts[c] else None})
        drawn = [int(c) for c in np.argsort(-counts, kind="stable")[:DIAGRAMS]]
        return {"target": target, "confidence": held["confidence"], "source": held["source"], "images": held["images"],
                "classes": rows, "px": DIAGRAM_PX,
                "diagrams": [{"name": self.classes[c], **reliability(histograms.right[c], histograms.wrong[c],
                                                                     rows[c]["threshold"])} for c in drawn]}

    def shown_per_class(self) -> int:
        classes = int((self.tally.class_counts > 0).sum())
        return min(PER_CLASS, max(1, CLASS_THUMBNAILS // max(classes, 1)))

    def least_confident(self) -> list[dict]:
        counts = self.tally.class_counts
        per_class = self.shown_per_class()
        largest = [int(c) for c in np.argsort(-counts, kind="stable")[:CLASS_THUMBNAILS // per_class] if counts[c]]
        least = self.tally.least  # by class, then score
        labels = least.column("label_index").to_numpy()
        groups = []
        for c in largest:
            start, end = np.searchsorted(labels, c), np.searchsorted(labels, c, side="right")
            groups.append({"name": self.classes[c], "count": int(counts[c]),
                           "cards": self.cards(least.slice(int(start), int(min(end - start, per_class))))})
        return groups

    def errors(self) -> dict:
        groups = sorted(self.tally.errors.items(), key=lambda g: -g[1][0])
        return {"count": self.tally.rows - self.tally.ok, "shown": ERRORS_SHOWN,
                "groups": [{"reason": reason, "count": count, "examples": examples}
                           for reason, (count, examples) in groups]}

    def cards(self, rows: pa.Table | None, notes: list[str] | None = None) -> list[dict]:
        if rows is None:
            return []
        cards = []
        for i, row in enumerate(rows.select(["path", "label", "score", "topk_labels", "topk_scores"]).to_pylist()):
            topk = ", ".join(f"{label} {score:.2f}" for label, score in zip(row["topk_labels"], row["topk_scores"]))
            cards.append({"thumb": self.thumbnails.of(row["path"]), "label": row["label"], "score": row["score"],
                          "note": notes[i] if notes else "", "topk": topk, "path": row["path"]})
        return cards
