"""`imgjobs report OUTPUT`: build or rebuild OUTPUT/_report.html from any imgjobs label output, local or URI,
during a job, after resumes or long after it ended."""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("output", metavar="OUTPUT", help="the --output folder (or URI) of an imgjobs label run")


def run(args) -> int:
    from pipeline.label.report import write_report  # after parsing, as in jobs/label.py

    write_report(args.output)
    return 0
