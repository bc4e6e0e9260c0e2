"""Labels you can trust: `imgjobs label --target-precision P --calibration DIR` (pipeline/formats/calibration.py)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from jobs.cli import main
from pipeline.errors import UsageError
from pipeline.formats import checkpoint
from pipeline.formats.calibration import EDGES, HeldOut, certifies, regularized_beta, rows_needed, thresholds
from pipeline.train.from_labels import scan_labels
from tests.helpers import CHROMIUM, label_files, make_image_folder, random_weight_state, read_output


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly: the oracle for the Beta CDF (I_p(k, n - k + 1))."""
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


@pytest.mark.parametrize(("k", "n", "p"), [(1, 1, 0.5), (59, 59, 0.95), (95, 100, 0.9), (190, 200, 0.9),
                                           (880, 1000, 0.9), (3, 40, 0.2), (700, 1000, 0.68)])
def test_the_beta_cdf_equals_the_binomial_tail(k, n, p):
    assert regularized_beta(p, k, n - k + 1) == pytest.approx(binomial_tail(k, n, p), rel=1e-9, abs=1e-300)


def test_clopper_pearson_certifies_what_all_right_rows_can():
    # n right of n bound the precision by 0.05 ** (1 / n): 59 certify 0.95 and 58 do not; 200 reach about 0.985.
    assert rows_needed(0.95) == 59 and certifies(59, 59, 0.95) and not certifies(58, 58, 0.95)
    assert certifies(200, 200, 0.985) and not certifies(200, 200, 0.986)
    assert not certifies(0, 10, 0.01)  # nothing right certifies nothing


def held_out(bins: dict[str, list[tuple[float, int, int]]]) -> HeldOut:
    """HeldOut from (score, right, wrong) triples per class."""
    held = HeldOut.empty(list(bins))
    for c, triples in enumerate(bins.values()):
        for score, right, wrong in triples:
            predicted = np.full(right + wrong, c)
            truth = np.where(np.arange(right + wrong) < right, c, 1 - c)
            held = held.add(predicted, np.full(right + wrong, score, np.float32), truth)
    return held


def bin_of(score: float) -> int:
    return int(np.searchsorted(EDGES, np.float32(score), side="right") - 1)


def test_thresholds_certified_on_known_scores():
    held = held_out({
        # 150 right over 0.95 with 5 wrong among them certify 0.9; the 30 wrong at 0.6 break it there.
        "a": [(0.99, 100, 0), (0.97, 0, 5), (0.95, 50, 0), (0.6, 0, 30)],
        # Fixed-sequence: the walk stops at its first failure (10 wrong at 0.98 after 60 right), even though a lower
        # edge, with 500 more right, would pass again. Trying every edge would spend the 95 %.
        "b": [(0.999, 60, 0), (0.98, 0, 10), (0.9, 500, 0)],
    })
    assert held.count == 755
    again = HeldOut.of_dict(json.loads(json.dumps(held.as_dict())))
    assert (again.right == held.right).all() and (again.wrong == held.wrong).all() and again.classes == held.classes
    found = thresholds(held, 0.9)
    a, b = found["a"], found["b"]
    # The threshold is the lower edge of 0.95's bin: below it no held-out row backs a lower one until 0.6's fails.
    assert a.threshold == pytest.approx(EDGES[bin_of(0.95)]) and (a.right, a.wrong, a.predicted) == (150, 5, 185)
    assert a.accepted_share == pytest.approx(155 / 185)
    assert certifies(150, 155, 0.9) and not certifies(150, 185, 0.9)
    assert b.threshold is not None and b.threshold > 0.98 and (b.right, b.wrong) == (60, 0)
    assert certifies(560, 570, 0.9)  # what a walk that went on would have accepted


def test_a_class_that_cannot_be_certified_accepts_nothing_and_says_what_it_needs():
    found = thresholds(held_out({"a": [(0.999, 40, 0)], "b": [(0.99, 80, 0)]}), 0.95)
    assert found["a"].threshold is None and found["a"].needed == 59 and found["a"].accepted_share == 0
    assert found["b"].threshold is not None and found["b"].right == 80


@pytest.mark.parametrize(("args", "named"), [
    (["--calibration", "x"], "--calibration only sets the thresholds of --target-precision"),
    (["--target-precision", "1", "--calibration", "x"], "--target-precision 1.0: Input should be less than 1"),
])
def test_mistakes_are_one_line_and_exit_2(args, named, capsys, tmp_path):
    assert main(["label", "--checkpoint", str(tmp_path), "--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 *args]) == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1, err


def test_training_on_labels_can_take_the_accepted_rows_only(tmp_path):
    rows = [{"path": f"/img/{c}{i}.jpg", "label": c, "score": 0.9, "accepted": i % 2 == 0, "error": None}
            for c in ("ants", "bees") for i in range(10)]
    rows.append({"path": "/img/person.jpg", "label": "bees", "score": None, "accepted": None, "error": None})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "labels.parquet")
    kept = scan_labels(str(tmp_path), 0.0, 0.2, 0, accepted_only=True)
    paths = sorted([*kept.train.keys(), *kept.val.keys()])
    assert paths == sorted(r["path"] for r in rows if r["accepted"] is not False)  # a reviewer's row is kept
    assert len([*scan_labels(str(tmp_path), 0.0, 0.2, 0).train.keys()]) > len([*kept.train.keys()])
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "accepted"} for r in rows]),
                   tmp_path / "labels.parquet")
    with pytest.raises(UsageError, match="has no 'accepted' column; .* data.accepted_only an 'accepted' one"):
        scan_labels(str(tmp_path), 0.0, 0.2, 0, accepted_only=True)


CLASSES = ["blue", "red"]


def sure_of_blue(folder, val: dict | None = None) -> str:
    """A checkpoint that calls every image blue, sure of it (a score of 1 in float32): blue images are right and red
    ones wrong. `val`: what training keeps of val in it."""
    state = random_weight_state("mobilenet_v3_small", CLASSES, input_size=64)
    state["model_state"]["classifier.3.bias"][:] = torch.tensor([30.0, 0.0])
    state["val"] = val
    folder.mkdir()
    return checkpoint.save(state, str(folder))


def test_target_precision_from_a_calibration_tree(ray_local, tmp_path, capsys):  # noqa: PLR0915 (one story)
    ckpt = sure_of_blue(tmp_path / "ckpt")
    calibration = make_image_folder(tmp_path / "cal", CLASSES, train_per_class=0, val_per_class=40) / "val"
    shutil.rmtree(calibration / "red")
    make_image_folder(tmp_path / "cal2", ["red"], train_per_class=0, val_per_class=1)
    shutil.copytree(tmp_path / "cal2" / "val" / "red", calibration / "red")
    images = make_image_folder(tmp_path / "imgs", CLASSES, train_per_class=0, val_per_class=4, seed=1) / "val"
    out = tmp_path / "out"
    args = ["label", "--checkpoint", ckpt, "--input", str(images), "--output", str(out), "--report", "--calibration",
            str(calibration), "--target-precision", "0.85", "--evaluate"]

    assert main(args) == 0
    printed = capsys.readouterr()
    # Held out: 40 blue images called blue (right), 1 red called blue (wrong): 40 of 41 certify 0.85, not 0.9.
    assert certifies(40, 41, 0.85) and not certifies(40, 41, 0.9)
    closing = printed.out.splitlines()[-3:]
    assert closing[0].startswith("label: class blue: accepted at score >= ") and "(held out: 40 right, 1 wrong" in \
        closing[0]
    assert closing[1].startswith("label: class red accepts nothing") and f"at least {rows_needed(0.85)} right" in \
        closing[1]
    assert closing[2].startswith("label: 8 of 8 labels accepted") and "precision >= 0.85 at 95% confidence, class by "\
        f"class, for images drawn like those in {calibration};" in closing[2]
    rows = read_output(out)
    assert len(rows) == 8 and all(r["label"] == "blue" and r["accepted"] for r in rows)
    schema = pq.read_schema(label_files(out)[0])
    assert schema.names.index("accepted") == schema.names.index("uncertain") + 1
    provenance = json.loads(schema.metadata[b"imgjobs"])
    assert provenance["target_precision"] == 0.85 and provenance["thresholds"]["red"] is None
    # Every held-out score is in the top bin, and the threshold is its lower edge, not below: no row backs less.
    assert provenance["thresholds"]["blue"] == provenance["held_out"]["classes"]["blue"]["threshold"] == EDGES[-1]
    assert provenance["held_out"]["classes"]["blue"] | {"threshold": 0} == {
        "threshold": 0, "right": 40, "wrong": 1, "predicted": 41, "needed": rows_needed(0.85), "accepted_share": 1.0}
    assert provenance["held_out"]["images"] == 41 and provenance["held_out"]["source"] == str(calibration)
    summary = json.loads((out / "_summary.json").read_text())["runs"][-1]
    # --evaluate: the 4 blue images accepted are right, the 4 red ones accepted are wrong.
    assert summary["accepted"] == 8 and summary["accepted_precision"] == 0.5 and summary["accepted_share"] == 1.0
    assert summary["accepted_by_class"]["blue"] == {"accepted": 8, "precision": 0.5, "accepted_share": 1.0}
    assert "accepted 100.0% of them, at precision 0.5000" in printed.out

    # Another target would mix two kinds of labels in one output: refused in one line, before the calibration pass
    # (which would set thresholds, and print Ray Data's lines through this test's shared Ray).
    assert main([*args[:-3], "--target-precision", "0.8", "--evaluate"]) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("imgjobs label: error: output") and printed.err.count("\n") == 1, printed.err
    assert "target_precision 0.85 there, 0.8 now" in printed.err and "thresholds set" not in printed.out
    # So is going on without a target, before any work.
    assert main(args[:8]) == 2
    err = capsys.readouterr().err
    assert "target_precision 0.85 there, null now" in err and err.count("\n") == 1, err

    # The review page shows each class's threshold and its reliability on the held-out images, as inline SVG that a
    # real browser draws: one dot (all 41 held-out scores in one bin), blue's threshold line, none for red.
    page = (out / "_report.html").read_text()
    assert "Accepted labels: precision 0.85" in page and "accepts nothing: needs at least 19" in page
    if CHROMIUM is None:
        pytest.skip("the browser half needs Debian's chromium package, which .ci/run installs")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", DRAWN + "</body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                          f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"file://{probe}"],
                         capture_output=True, text=True, timeout=120).stdout
    assert "<title>svgs=2 dots=1 drawn=1 lines=3</title>" in dom, dom[:300]


# Appended to a copy of the page: the browser writes into the title what its SVG parser drew.
DRAWN = ("<script>addEventListener('load', () => { const dots = [...document.querySelectorAll('svg circle')]; "
         "document.title = `svgs=${document.querySelectorAll('svg').length} dots=${dots.length} "
         "drawn=${dots.filter(d => d.getBBox().width > 0).length} "
         "lines=${document.querySelectorAll('svg line').length}`; });</script>")


def test_target_precision_from_the_checkpoints_calibration_share(ray_local, tmp_path, capsys):
    # What training keeps of its val's calibration share (tests/test_train_job.py checks that it does): 40 blue
    # images right and 1 red one wrong, all scored 1.
    kept = held_out({"blue": [(1.0, 40, 1)], "red": []}).as_dict() | {"fraction": 0.5, "seed": 0, "images": 41}
    ckpt = sure_of_blue(tmp_path / "ckpt", {"confusion": [[0, 0], [0, 0]], "examples": [], "calibration": kept})
    images = make_image_folder(tmp_path / "imgs", CLASSES, train_per_class=0, val_per_class=2) / "val"
    out = tmp_path / "out"
    assert main(["label", "--checkpoint", ckpt, "--input", str(images), "--output", str(out),
                 "--target-precision", "0.85"]) == 0
    printed = capsys.readouterr().out
    assert f"thresholds set from 41 held-out images, the calibration share of val kept in {ckpt}" in printed
    rows = read_output(out)
    assert len(rows) == 4 and all(r["accepted"] for r in rows)
    provenance = json.loads(pq.read_schema(label_files(out)[0]).metadata[b"imgjobs"])
    assert provenance["thresholds"] == {"blue": EDGES[-1], "red": None}
    assert (provenance["held_out"]["classes"]["blue"]["right"], provenance["held_out"]["classes"]["blue"]["wrong"]) \
        == (40, 1)

    # A checkpoint that kept none (imgjobs 0.3, or data.calibration_fraction=0), and no --calibration: one line.
    other = sure_of_blue(tmp_path / "old")
    assert main(["label", "--checkpoint", other, "--input", str(images), "--output", str(tmp_path / "o2"),
                 "--target-precision", "0.85"]) == 2
    err = capsys.readouterr().err
    assert (f"--target-precision needs held-out scores to set its thresholds, and {other} keeps none" in err
            and "pass --calibration DIR" in err and "train again with data.calibration_fraction above 0" in err)
    assert err.count("\n") == 1, err
