"""The `imgjobs` command: `imgjobs train ...`, `imgjobs label ...`, `imgjobs report ...`, `imgjobs audit ...`,
`imgjobs submit ...`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from pipeline.console import printable
from pipeline.errors import UsageError

COMMANDS = {
    "train": "fine-tune a pretrained classifier with Ray Train",
    "submit": "run train, label or audit on a Ray cluster through the Ray Jobs API",
    "label": "label an image collection into Parquet with a trained checkpoint (Ray Data)",
    "report": "build OUTPUT/_report.html, a page to review the labels of an imgjobs label output",
    "audit": "find likely wrong training labels by K-fold cross-validation and confident learning",
}


def main(argv: list[str] | None = None) -> int:
    started_at = time.time()  # before the heavy imports: start-up figures count from here
    parser = argparse.ArgumentParser(prog="imgjobs", description="Distributed image classification jobs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, text in COMMANDS.items()}
    argv = sys.argv[1:] if argv is None else argv
    # Only the named command's module is imported: each pulls in torch or Ray, seconds of imports.
    module = importlib.import_module(f"jobs.{argv[0]}") if argv and argv[0] in COMMANDS else None
    if module:
        module.add_arguments(parsers[argv[0]])
    args = parser.parse_args(argv)
    args.started_at = started_at
    try:
        return module.run(args)
    except UsageError as e:
        print(f"imgjobs {args.command}: error: {printable(str(e))}", file=sys.stderr)  # paths in it are data
        return 2
    except KeyboardInterrupt:
        print(f"imgjobs {args.command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
