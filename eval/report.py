#!/usr/bin/env python
"""Regenerate report.md and the plot of an output directory from its results.json alone."""

import argparse
import sys
from pathlib import Path

from rope_ntk.evaluation.report import write_report
from rope_ntk.evaluation.results import ResultsStore


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", nargs="?", default="runs/default", help="output directory (default: %(default)s)")
    args = parser.parse_args()
    path = Path(args.out) / "results.json"
    if not path.is_file():
        print(f"error: out={args.out!r} holds no results.json", file=sys.stderr)
        return 2
    try:
        store = ResultsStore(path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_report(store.records, Path(args.out))
    print((Path(args.out) / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
