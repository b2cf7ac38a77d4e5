"""Command line: ``python -m lightning_hessian report RUN_DIR [-o OUT.html]``."""

from __future__ import annotations

import argparse
import sys

from lightning_hessian.html_report import REPORT_NAME, write_html_report


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m lightning_hessian", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="write a self-contained HTML report of a logged run",
        description="Write one HTML file (no network needed to view it) with the run's stability, per-layer "
        "and per-kind curvature charts, its alerts and the latest value of every block.",
    )
    report.add_argument("run_dir", help="run directory, TensorBoard event file or CSVLogger metrics.csv")
    report.add_argument("-o", "--output", help=f"HTML file to write (default: RUN_DIR/.../{REPORT_NAME})")
    args = parser.parse_args(argv)
    try:
        path = write_html_report(args.run_dir, args.output)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
