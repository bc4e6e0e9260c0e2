"""`imgjobs label --checkpoint CKPT --input PATH [PATH ...] --output DIR`: label an image collection into Parquet.

Inputs are directories, tar (plain, gzip, bzip2, xz) and zip archives and .txt manifests, local or URIs. Rerunning
the same command after an interruption labels only what DIR does not hold yet; a rerun with another checkpoint or
label options is refused (--overwrite starts over), and so is a second job into a DIR that one is writing.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.console import printable
from pipeline.formats.keys import ARCHIVE_NAMES
from pipeline.label.options import LabelOptions, default


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="checkpoint.pt from imgjobs train, or a training run's folder (its best_checkpoint)")
    parser.add_argument("--input", nargs="+", required=True, dest="inputs", metavar="PATH",
                        help=f"directories, archives {ARCHIVE_NAMES}, manifests (.txt), images; local or URI")
    parser.add_argument("--output", required=True, help="folder (or URI) for the Parquet files and _summary.json")
    parser.add_argument("--top-k", type=int, help="length of topk_labels/topk_scores (default: min(5, classes))")
    parser.add_argument("--min-confidence", type=float, default=default("min_confidence"), metavar="P",
                        help="mark rows whose top-1 score is below P as uncertain, for human review")
    parser.add_argument("--target-precision", type=float, metavar="P",
                        help="add an `accepted` column: true where the label's class threshold certifies precision "
                             "P at 95%% confidence on held-out images (--calibration)")
    parser.add_argument("--calibration", metavar="DIR",
                        help="a class-folder tree of hand-checked images, drawn like the ones you label, whose "
                             "scores set --target-precision's thresholds")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default=default("precision"),
                        help="auto: bf16 where the hardware computes it natively (GPUs, CPUs with avx512_bf16 or "
                             "amx_bf16), else fp32; bf16 or fp32 forces one")
    parser.add_argument("--exact-decode", action="store_true",
                        help="decode JPEGs at full size even when they are much bigger than the model's input "
                             "(by default libjpeg decodes those at a reduced scale, several times faster)")
    parser.add_argument("--rows-per-file", type=int, default=default("rows_per_file"),
                        help="rows per Parquet file (default %(default)s)")
    parser.add_argument("--commit-every", type=float, default=default("commit_every"), metavar="SECONDS",
                        help="commit a file at least this often, so a kill loses at most about that much "
                             "(default %(default)s)")
    parser.add_argument("--max-member-mb", type=float, default=default("max_member_mb"), metavar="MB",
                        help="files and archive members larger than this get a too_large row, read no further "
                             "(default %(default)s)")
    parser.add_argument("--max-archive-gb", type=float, default=default("max_archive_gb"), metavar="GB",
                        help="most bytes inflated from one archive; the rest of it gets an error row "
                             "(default %(default)s)")
    parser.add_argument("--max-archive-members", type=int, default=default("max_archive_members"), metavar="N",
                        help="most members read from one archive (default %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=default("max_pixels"), metavar="N",
                        help="images of more pixels get a too_large row without being decoded "
                             "(default %(default)s, PIL's own limit)")
    parser.add_argument("--batch-size", type=int, help="images per model call (default 8 on CPU, 256 on GPU)")
    parser.add_argument("--max-actors", type=int, metavar="N",
                        help="most predictor actors; the pool grows to N as nodes join (default: what fits the "
                             "nodes up at start, at least 1)")
    parser.add_argument("--overwrite", action="store_true", help="delete DIR's labels first instead of resuming")
    parser.add_argument("--embeddings", action="store_true",
                        help="add an `embedding` column: the model's pooled features before its head (float32)")
    parser.add_argument("--report", action="store_true",
                        help="write OUTPUT/_report.html, a self-contained page to review the labels (imgjobs report "
                             "OUTPUT rebuilds it)")
    parser.add_argument("--evaluate", action="store_true",
                        help="the input is a class-folder tree: report accuracy and the confusion matrix")


def run(args: argparse.Namespace) -> int:
    opts = LabelOptions.checked(**{k: v for k, v in vars(args).items() if k in LabelOptions.model_fields})
    from pipeline.label.job import ReadFailures, label  # once the options are right: it imports pyarrow and Ray

    try:
        summary = label(opts, started_at=getattr(args, "started_at", None))
    except ReadFailures as e:
        print(f"imgjobs label: error: {printable(str(e))}", file=sys.stderr)
        return 1
    if summary.get("accuracy") is not None:
        classes = summary["classes"]
        width = max(9, *map(len, classes))
        print(f"{'true/pred':>{width}} " + " ".join(f"{c:>{width}}" for c in classes))
        for name, row in zip(classes, summary["confusion_matrix"]):
            print(f"{name:>{width}} " + " ".join(f"{v:>{width}}" for v in row))
        print(f"accuracy {summary['accuracy']:.4f} on {summary['evaluated']} images")
        if summary.get("accepted_share") is not None:
            precision = summary["accepted_precision"]
            print(f"accepted {summary['accepted_share']:.1%} of them, at precision "
                  + ("n/a" if precision is None else f"{precision:.4f}"))
    print(f"label: {summary['total']} images: {summary['labeled']} labeled, {summary['errors']} errors, "
          f"{summary['skipped_existing']} already done; {summary['images_per_s']:.1f} images/s over "
          f"{summary['seconds']:.1f}s; labels in {args.output} ({summary['files_written']} new Parquet file(s), "
          f"_summary.json)")
    if summary.get("target_precision") is not None:
        print_acceptance(summary)
    return 0


def print_acceptance(summary: dict) -> None:
    """--target-precision's closing lines: each class's threshold and the held-out counts behind it, then what the
    run accepted and for which images that holds."""
    held = summary["held_out"]
    for name, t in held["classes"].items():
        if t["threshold"] is None:
            print(f"label: class {printable(name)} accepts nothing: its held-out images certify no threshold; it "
                  f"needs at least {t['needed']} right held-out predictions of it (none wrong) at some score")
        else:
            print(f"label: class {printable(name)}: accepted at score >= {t['threshold']:.6g} (held out: {t['right']} "
                  f"right, {t['wrong']} wrong at or over it; expect {t['accepted_share']:.1%} of its labels accepted)")
    print(f"label: {summary['accepted'] or 0} of {summary['labeled']} labels accepted (`accepted` column): precision "
          f">= {summary['target_precision']:g} at {held['confidence']:.0%} confidence, class by class, for images "
          f"drawn like those in {printable(held['source'])}; for another kind of image, calibrate on a hand-checked "
          "sample of it (--calibration)")
