"""Command line: ``python -m lws_lightning.report DIR... [--output-dir DIR]``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lws_lightning.report.build import REPORT_FILE, write_report

log = logging.getLogger("lws_lightning.report")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lws_lightning.report",
        description=(
            f"Write {REPORT_FILE} and PNG figures over finished LWS runs: test errors per "
            "experiment and sharing mode, Mann-Whitney U tests, sharing-group sizes, error "
            "curves and weight counts."
        ),
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="DIR",
        help="run or multirun folder, or any folder above them; searched for results.json",
    )
    parser.add_argument(
        "-o",
        "--output-dir",
        type=Path,
        default=Path("report"),
        help="folder for report.md and the figures (default: ./report)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Write the report; return 0, or 1 when no complete run was found."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    report = write_report(args.paths, args.output_dir)
    if not report.runs:
        log.error(
            "No complete run found under %s; %s lists what was left out and why.",
            ", ".join(str(path) for path in args.paths),
            report.markdown,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
