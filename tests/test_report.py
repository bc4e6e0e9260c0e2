"""The review page: `imgjobs label --report` and `imgjobs report OUTPUT`, checked in the Parquet it summarises and
in a real browser (headless Chromium, which .ci/run installs)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tracemalloc
from collections import Counter

import duckdb
import numpy as np
import pandas
import pyarrow as pa
import pyarrow.dataset
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.cli import main
from pipeline.formats.labels_file import OUTPUT_SCHEMA, PROVENANCE_KEY
from pipeline.label.report import CLASS_THUMBNAILS, MISTAKES_SHOWN, PER_CLASS, UNCERTAIN_SHOWN, write_report
from tests.helpers import CHROMIUM, REPO, read_output

# Appended to a copy of the page: the browser writes into the title how many images decoded and how many broke.
COUNT_IMAGES = ("<script>addEventListener('load', () => { const imgs = [...document.images]; document.title = "
                "`loaded=${imgs.filter(i => i.complete && i.naturalWidth > 0).length} "
                "broken=${imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length}`; });</script>")


@pytest.fixture(scope="module")
def reviewed(demo_run, tmp_path_factory) -> dict:
    """The demo checkpoint labels a copy of the ants/bees val set with two broken files, --evaluate and --report."""
    root = tmp_path_factory.mktemp("review")
    val = root / "val"
    shutil.copytree(REPO / "data" / "hymenoptera" / "val", val)
    (val / "ants" / "not-a-photo.jpg").write_bytes(b"\x89PNG but not really" * 10)
    (val / "bees" / "empty.jpg").write_bytes(b"")
    out = root / "labels"
    assert main(["label", "--checkpoint", demo_run["run_dir"], "--input", str(val), "--output", str(out),
                 "--evaluate", "--min-confidence", "0.9", "--report"]) == 0
    return {"val": val, "out": out, "rows": read_output(out),
            "summary": json.loads((out / "_summary.json").read_text())["runs"][-1]}


def test_evaluate_the_demo_checkpoint_on_the_ants_bees_val_set(reviewed, demo_run):
    summary, val = reviewed["summary"], reviewed["val"]
    assert summary["checkpoint"] == demo_run["best_checkpoint"]  # the run folder stands for its best checkpoint
    images = len(list(val.rglob("*.jpg"))) - 2
    assert summary["accuracy"] >= 0.93 and summary["evaluated"] == images == summary["labeled"]
    assert summary["evaluated_errors"] == 2 and summary["evaluated_roots"] == [str(val)]
    assert sum(map(sum, summary["confusion_matrix"])) == images and summary["classes"] == ["ants", "bees"]


def expected_sections(rows: list[dict], val) -> dict[str, set[str]]:
    """What the page's rule says it shows, worked out from the Parquet rows themselves."""
    ok = [r for r in rows if r["error"] is None]
    by_class = {}
    for r in sorted(ok, key=lambda r: r["score"]):
        by_class.setdefault(r["label"], []).append(r["path"])
    per_class = min(PER_CLASS, CLASS_THUMBNAILS // len(by_class))
    wrong = [r for r in ok if not r["path"].startswith(f"{val}/{r['label']}/")]
    return {
        "least": {p for paths in by_class.values() for p in paths[:per_class]},
        "uncertain": set([r["path"] for r in sorted(ok, key=lambda r: r["score"]) if r["uncertain"]][:UNCERTAIN_SHOWN]),
        "mistakes": {r["path"] for r in sorted(wrong, key=lambda r: -r["score"])[:MISTAKES_SHOWN]},
    }


def section(page: str, title: str) -> str:
    return page.split(f"<h2>{title}")[1].split("<h2>")[0]


def shown_paths(html: str) -> set[str]:
    return set(re.findall(r'<small class="path">([^<]*)</small>', html))


def test_the_report_shows_what_the_parquet_holds_in_one_bounded_self_contained_file(reviewed):
    rows, val = reviewed["rows"], reviewed["val"]
    page = (reviewed["out"] / "_report.html").read_text()
    # Self-contained: nothing is fetched from anywhere, every image is inline.
    assert not re.search(r"<script|<link|@import|url\(|src=\"(?!data:)|href=", page)
    expect = expected_sections(rows, val)
    assert shown_paths(section(page, "Least confident, per class")) == expect["least"]
    assert shown_paths(section(page, "Uncertain")) == expect["uncertain"] and expect["uncertain"]
    assert shown_paths(section(page, "Evaluation")) == expect["mistakes"] and expect["mistakes"]
    assert page.count('src="data:image/jpeg;base64,') == sum(map(len, expect.values()))
    counts = Counter(r["label"] for r in rows if r["label"])
    for label, n in counts.items():
        assert f"<tr><td>{label}</td><td>{n}</td>" in section(page, "Images per class")
    summary = reviewed["summary"]
    assert f"Accuracy {summary['accuracy']:.4f} on {summary['evaluated']} images" in page
    assert f"{summary['images_per_s']}" in section(page, "Totals")
    errors = section(page, "Errors: 2")
    assert "decode: UnidentifiedImageError: 1" in errors and "decode: ValueError: 1" in errors
    assert str(val / "bees" / "empty.jpg") in errors
    histogram = re.findall(r'<div class="col" title="[^"]*: (\d+)">', page)
    assert len(histogram) == 20 and sum(map(int, histogram)) == summary["labeled"]


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package, which .ci/run installs")
def test_the_report_renders_its_thumbnails_in_a_real_browser(reviewed, tmp_path):
    page = (reviewed["out"] / "_report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", COUNT_IMAGES + "</body>"))
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--virtual-time-budget=5000", "--dump-dom", f"file://{probe}"],
                         capture_output=True, text=True, timeout=120).stdout
    images = page.count("<img ")
    assert f"<title>loaded={images} broken=0</title>" in dom, dom[:300]
    shot = tmp_path / "review-page.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1200,1800", f"file://{reviewed['out']}/_report.html"],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as img:
        top = img.convert("RGB").crop((0, 0, 1200, 1800))
        # Text, lines and bars are a few hundred colours; photos are tens of thousands.
        assert len(top.getcolors(maxcolors=1 << 24)) > 10_000


def test_imgjobs_report_rebuilds_the_page_from_an_output_on_s3(reviewed, s3_server, capsys):
    uri = s3_server.upload(reviewed["out"], "labels/reviewed")
    fs = s3_server.filesystem()
    fs.delete_file("labels/reviewed/_report.html")
    assert main(["report", uri]) == 0
    assert "_report.html" in capsys.readouterr().out
    with fs.open_input_stream("labels/reviewed/_report.html") as f:
        rebuilt = f.read().decode()
    local = (reviewed["out"] / "_report.html").read_text()
    drop_time = re.compile(r"<dt>page built</dt><dd>[^<]*</dd>|Labels(:| of) [^<]*")
    assert drop_time.sub("", rebuilt) == drop_time.sub("", local)


def test_the_output_folder_is_a_dataset_for_every_parquet_reader(reviewed):
    """Every file beside the labels starts with `_` or `.`: pandas, pyarrow's datasets and DuckDB read the folder as
    it stands, with no options."""
    out = reviewed["out"]
    assert sorted(p.name for p in out.iterdir() if p.suffix != ".parquet") == ["_report.html", "_summary.json"]
    expected = sorted(r["path"] for r in reviewed["rows"])
    assert sorted(pandas.read_parquet(out)["path"]) == expected
    assert sorted(pyarrow.dataset.dataset(out).to_table(columns=["path"])["path"].to_pylist()) == expected
    assert sorted(path for path, in duckdb.sql(f"select path from read_parquet('{out}/*.parquet')").fetchall()) \
        == expected


def test_label_and_report_remove_the_report_html_of_an_older_version(reviewed, demo_run, tmp_path, capsys):
    out = tmp_path / "labels"
    shutil.copytree(reviewed["out"], out)
    (out / "report.html").write_text("<html>imgjobs 0.1's page</html>")
    assert main(["report", str(out)]) == 0
    assert not (out / "report.html").exists() and (out / "_report.html").exists()
    (out / "report.html").write_text("<html>imgjobs 0.1's page</html>")
    assert main(["label", "--checkpoint", demo_run["run_dir"], "--input", str(reviewed["val"]), "--output", str(out),
                 "--evaluate", "--min-confidence", "0.9"]) == 0  # a rerun with nothing left to label
    assert not (out / "report.html").exists()
    assert "0 labeled" in capsys.readouterr().out


def test_imgjobs_report_of_a_folder_without_labels_is_one_line_exit_2(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds no labels files" in err


def synthetic_output(out, parts: int, rows: int = 20_000) -> None:
    """An output of `parts` labels files of `rows` rows each, 3 classes, some uncertain, some errors; their paths
    name no real file (their thumbnails show as missing)."""
    out.mkdir()
    classes = ["a", "b", "c"]
    provenance = {"classes": classes, "checkpoint": "c", "arch": "x", "min_confidence": 0.5}
    rng = np.random.default_rng(0)
    for part in range(parts):
        index = rng.integers(0, 3, rows).astype(np.int32)
        score = rng.random(rows).astype(np.float32)
        error = np.where(np.arange(rows) % 1000 == 0, "decode: broken", None)
        table = pa.table({
            "path": [f"/x/{part}/{i}.jpg" for i in range(rows)],
            "label": np.array(classes, dtype=object)[index],
            "label_index": index, "score": score,
            "topk_labels": [[classes[i]] for i in index], "topk_scores": [[s] for s in score.tolist()],
            "uncertain": score < 0.5, "error": error, "error_kind": np.where(error == None, None, "decode"),  # noqa: E711
            "width": np.full(rows, 32, np.int32), "height": np.full(rows, 32, np.int32),
        })
        table = table.cast(OUTPUT_SCHEMA).replace_schema_metadata({PROVENANCE_KEY: json.dumps(provenance)})
        pq.write_table(table, out / f"part-synthetic-{part:05d}.parquet")


def test_the_report_reads_one_labels_file_at_a_time(tmp_path):
    """Ten times the rows peak at the Python memory of one file's: the page keeps counts and the rows it may
    show, never a column of every file."""
    peaks, pages = {}, {}
    for parts in (1, 10):
        out = tmp_path / f"out{parts}"
        synthetic_output(out, parts)
        tracemalloc.start()
        try:
            write_report(str(out), log=lambda line: None)
            peaks[parts] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        pages[parts] = (out / "_report.html").read_text()
    assert f"<dd>{10 * 20_000}</dd>" in pages[10] and f"<dd>{20_000}</dd>" in pages[1]  # rows counted
    assert peaks[10] < 1.5 * peaks[1], peaks
