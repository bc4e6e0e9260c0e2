"""<audit>/_report.html: the suspects, worst first (lowest probability of their given label), each with its
thumbnail, its given label against the suggested one, and its path; then the counts per class and the confident
joint. Self-contained like the label review page (pipeline.label.report), and bounded: at most SHOWN thumbnails."""

from __future__ import annotations

import jinja2
import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.formats import audit_file
from pipeline.formats.keys import Reader
from pipeline.thumbnails import Thumbnails

SHOWN = 240

TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("pipeline.audit"), autoescape=True,
                               undefined=jinja2.StrictUndefined)


def write_report(place, root: str, table: pa.Table, summary: dict, line=print) -> str:
    """Write the page beside the audit's Parquet (`place`: pipeline.audit.place.Place); returns its path."""
    suspects = table.filter(pc.field("suspect")).sort_by([("self_confidence", "ascending"), ("path", "ascending")])
    thumbnails = Thumbnails(Reader.for_root(root))
    cards = [{**row, "thumb": thumbnails.of(row["path"])} for row in suspects.slice(0, SHOWN).to_pylist()]
    classes = summary["classes"]
    page = TEMPLATES.get_template("report.html.j2").render(
        audit=storage.split_query(place.path)[0],  # no query: it may hold credentials
        summary=summary, cards=cards, shown=len(cards),
        given=pc.value_counts(table["label"].drop_null()).to_pylist(),
        joint=[[name, *[f"{v:g}" for v in row]] for name, row in zip(classes, summary["confident_joint"])])
    path = f"{place.base}/{audit_file.REPORT}"
    storage.write_bytes(place.fs, path, page.encode())
    shown = storage.join(place.path, audit_file.REPORT)
    line(f"audit: review page {shown} ({len(cards)} of {len(suspects)} suspects shown)")
    return shown
