"""OUTPUT/report.html: one self-contained page to review a label output (`imgjobs report`, `imgjobs label --report`).

The page is built from what the output holds, the Parquet files and _summary.json, so it can be rebuilt at any
time: after resumes, after the job, on another machine. Its styles are inline and its thumbnails are data: URIs,
so it opens offline and can be mailed. Its size is bounded whatever the output's size: it shows at most
MAX_THUMBNAILS images, chosen by the rule the page states, and counts for everything else.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.console import timestamp
from pipeline.errors import UsageError
from pipeline.images import decode_image
from pipeline.label.evaluate import true_classes
from pipeline.label.output import part_paths, provenance_of, read_runs, read_table
from pipeline.metrics import confusion_matrix

REPORT = "report.html"
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
    """Build OUTPUT/report.html from the output's files and return its path."""
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
    page = Page(path, rows, provenance, runs, thumbnails).html()  # no query: it may hold credentials
    target = f"{base}/{REPORT}"
    storage.write_bytes(fs, target, page.encode())
    shown = storage.join(output, REPORT)
    log(f"report: {shown} ({len(page) / 2**20:.1f} MiB, {thumbnails.count} thumbnails, {rows.num_rows} rows)")
    return shown


class Thumbnails:
    """JPEG data: URIs of the images the page shows, THUMB_PX on the long side, read the way labeling reads."""

    def __init__(self, options: dict[str, str]):
        from pipeline.label.sources import Reader

        self.reader = Reader(options)
        self.count = 0

    def img(self, key: str) -> str:
        try:
            image = decode_image(self.reader.read_key(key), draft_size=THUMB_PX)
        except Exception as e:  # moved, deleted, or in a compressed archive: the row still shows, without a picture
            return f'<div class="thumb missing" title="{esc(str(e)[:200])}">no preview</div>'
        image.thumbnail((THUMB_PX, THUMB_PX))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=75)
        self.count += 1
        return f'<img class="thumb" alt="" src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}">'


class Page:
    def __init__(self, output: str, rows: pa.Table, provenance: dict, runs: list[dict], thumbnails: Thumbnails):
        self.output, self.rows, self.provenance, self.runs = output, rows, provenance, runs
        self.thumbnails = thumbnails
        self.classes = provenance["classes"]
        self.ok = rows.filter(pc.is_null(rows.column("error")))
        self.evaluated = next((r for r in reversed(runs) if r.get("evaluated_roots")), None)

    def html(self) -> str:
        sections = [self.totals(), self.class_counts(), self.histogram(), self.evaluation(), self.least_confident(),
                    self.uncertain(), self.errors()]
        return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Labels: {esc(self.output)}'
                f'</title><style>{STYLE}</style></head><body><h1>Labels of {esc(self.output)}</h1>'
                + "".join(s for s in sections if s) + "</body></html>")

    def totals(self) -> str:
        total, ok = self.rows.num_rows, self.ok.num_rows
        uncertain = pc.sum(pc.fill_null(self.rows.column("uncertain"), False)).as_py() or 0
        p = self.provenance
        facts = [("rows", total), ("labeled", ok), ("errors", total - ok), ("uncertain", uncertain),
                 ("checkpoint", p["checkpoint"]), ("model", f"{p['arch']}, {p.get('compute_precision', '?')}"),
                 ("classes", len(self.classes)), ("page built", timestamp(time.time()))]
        runs = [[r.get("run_id"), r.get("started"), r.get("labeled"), r.get("errors"), r.get("skipped_existing"),
                 r.get("seconds"), r.get("images_per_s"), r.get("images_per_s_after_startup")] for r in self.runs]
        return ("<section><h2>Totals</h2>" + dl(facts)
                + (table(["run", "started", "labeled", "errors", "already done", "seconds", "images/s",
                          "images/s after start-up"], runs) if runs else "<p>No _summary.json: the last run did not "
                                                                         "end; the page counts its committed rows.</p>")
                + "</section>")

    def class_counts(self) -> str:
        counts = Counter(self.ok.column("label").to_pylist())
        peak = max(counts.values(), default=1)
        body = [[esc(name), n, bar(n / peak)] for name, n in counts.most_common()]
        return "<section><h2>Images per class</h2>" + table(["class", "images", ""], body, escape=False) + "</section>"

    def histogram(self) -> str:
        scores = self.ok.column("score").to_numpy()
        counts, _ = np.histogram(scores, bins=BINS, range=(0.0, 1.0))
        peak = max(counts.max(initial=0), 1)
        bars = "".join(f'<div class="col" title="{i / BINS:.2f}–{(i + 1) / BINS:.2f}: {n}">'
                       f'<div style="height:{100 * n / peak:.1f}%"></div></div>' for i, n in enumerate(counts))
        threshold = self.provenance.get("min_confidence") or 0
        note = f"; rows under {threshold:g} are marked uncertain (--min-confidence)" if threshold else ""
        return (f'<section><h2>Top-1 scores</h2><p>{len(scores)} labeled images in {BINS} bins from 0 to 1{note}.</p>'
                f'<div class="hist">{bars}</div><div class="axis"><span>0</span><span>0.5</span><span>1</span></div>'
                "</section>")

    def evaluation(self) -> str:
        if not self.evaluated:
            return ""
        roots = self.evaluated["evaluated_roots"]
        targets = true_classes(self.ok.column("path").to_pylist(), roots, self.classes)
        predicted = self.ok.column("label_index").to_pylist()
        pairs = [(t, p) for t, p in zip(targets, predicted) if t is not None]
        matrix = confusion_matrix([t for t, _ in pairs], [p for _, p in pairs], len(self.classes))
        evaluated = sum(map(sum, matrix))
        correct = sum(matrix[i][i] for i in range(len(self.classes)))
        wrong = [i for i, (t, p) in enumerate(zip(targets, predicted)) if t is not None and t != p]
        wrong.sort(key=lambda i: -self.ok.column("score")[i].as_py())  # the most confident mistakes first
        cards = [self.card(i, self.ok, f"true: {self.classes[targets[i]]}") for i in wrong[:MISTAKES_SHOWN]]
        body = [[f"<b>{esc(name)}</b>", *row] for name, row in zip(self.classes, matrix)]
        return (f"<section><h2>Evaluation</h2><p>Accuracy {correct / max(evaluated, 1):.4f} on {evaluated} images "
                f"of the class folders {esc(', '.join(roots))}; rows are true classes, columns predicted.</p>"
                + table(["true / predicted", *map(esc, self.classes)], body, escape=False)
                + f"<h3>Misclassified: {len(wrong)}</h3><p>The {min(len(wrong), MISTAKES_SHOWN)} most confident "
                  f"mistakes.</p><div class=\"cards\">{''.join(cards)}</div></section>")

    def least_confident(self) -> str:
        counts = Counter(self.ok.column("label_index").to_pylist())
        shown_per_class = min(PER_CLASS, max(1, CLASS_THUMBNAILS // max(len(counts), 1)))
        largest = [c for c, _ in counts.most_common(CLASS_THUMBNAILS // shown_per_class)]
        ordered = self.ok.sort_by([("label_index", "ascending"), ("score", "ascending")])
        starts = np.searchsorted(ordered.column("label_index").to_numpy(), largest)
        parts = []
        for cls, start in zip(largest, starts):
            take = range(start, start + min(shown_per_class, counts[cls]))
            parts.append(f"<h3>{esc(self.classes[cls])} ({counts[cls]} images)</h3><div class=\"cards\">"
                         + "".join(self.card(i, ordered) for i in take) + "</div>")
        return ("<section><h2>Least confident, per class</h2>"
                f"<p>At most {MAX_THUMBNAILS} images on this page, whatever the output's size: the "
                f"{shown_per_class} lowest-scored of each of the {len(largest)} largest classes here, the "
                f"{UNCERTAIN_SHOWN} lowest-scored uncertain rows and the {MISTAKES_SHOWN} most confident mistakes "
                "(with --evaluate).</p>" + "".join(parts) + "</section>")

    def uncertain(self) -> str:
        threshold = self.provenance.get("min_confidence") or 0
        if not threshold:
            return ""
        rows = self.ok.filter(pc.fill_null(self.ok.column("uncertain"), False)).sort_by("score")
        cards = [self.card(i, rows) for i in range(min(rows.num_rows, UNCERTAIN_SHOWN))]
        return (f"<section><h2>Uncertain: {rows.num_rows}</h2><p>Top-1 score under {threshold:g} "
                f"(--min-confidence); the {len(cards)} lowest shown. They have <code>uncertain</code> true in the "
                f"Parquet files, for review.</p><div class=\"cards\">{''.join(cards)}</div></section>")

    def errors(self) -> str:
        errors = self.rows.filter(pc.is_valid(self.rows.column("error")))
        if not errors.num_rows:
            return "<section><h2>Errors</h2><p>None.</p></section>"
        groups: dict[str, list[tuple[str, str]]] = {}
        for path, error, kind in zip(*(errors.column(c).to_pylist() for c in ("path", "error", "error_kind"))):
            groups.setdefault(f"{kind}: {error.split(':', 1)[0]}", []).append((path, error))
        parts = []
        for reason, items in sorted(groups.items(), key=lambda g: -len(g[1])):
            parts.append(f"<h3>{esc(reason)}: {len(items)}</h3>"
                         + table(["path", "error"], [list(item) for item in items[:ERRORS_SHOWN]]))
        return (f"<section><h2>Errors: {errors.num_rows}</h2><p>Grouped by kind (io: could not be read, and a rerun "
                "retries it; decode: the bytes are not an image; too_large: an archive member over the cap) and "
                f"reason; up to {ERRORS_SHOWN} of each.</p>" + "".join(parts) + "</section>")

    def card(self, i: int, rows: pa.Table, note: str = "") -> str:
        row = {c: rows.column(c)[i].as_py() for c in ("path", "label", "score", "topk_labels", "topk_scores")}
        topk = ", ".join(f"{esc(label)} {score:.2f}" for label, score in zip(row["topk_labels"], row["topk_scores"]))
        return (f'<figure>{self.thumbnails.img(row["path"])}<figcaption><b>{esc(row["label"])}</b> '
                f'{row["score"]:.3f}{"<br><i>" + esc(note) + "</i>" if note else ""}<br><small>{topk}</small>'
                f'<br><small class="path">{esc(row["path"])}</small></figcaption></figure>')


def esc(text) -> str:
    return html.escape(str(text))


def dl(facts: list[tuple[str, object]]) -> str:
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in facts) + "</dl>"


def table(header: list[str], rows: list[list], escape: bool = True) -> str:
    cell = esc if escape else str
    return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{cell('' if v is None else v)}</td>" for v in row) + "</tr>"
                      for row in rows) + "</table>")


def bar(fraction: float) -> str:
    return f'<div class="bar" style="width:{200 * fraction:.0f}px"></div>'


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px}h2{font-size:17px;border-bottom:1px solid #ddd;padding-top:12px}h3{font-size:15px}
dl{display:grid;grid-template-columns:max-content auto;gap:2px 16px}dt{color:#666}dd{margin:0}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.bar{height:12px;background:#4a7fc1}
.hist{display:flex;align-items:flex-end;height:140px;width:600px;border-bottom:1px solid #999;gap:2px}
.col{flex:1;height:100%;display:flex;align-items:flex-end}.col div{width:100%;background:#4a7fc1}
.axis{display:flex;justify-content:space-between;width:600px;color:#666}
.cards{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:150px}
.thumb{width:128px;height:128px;object-fit:contain;background:#f3f3f3;display:block}
.missing{display:flex;align-items:center;justify-content:center;color:#999}
figcaption{font-size:12px;overflow-wrap:anywhere}.path{color:#777}
"""
