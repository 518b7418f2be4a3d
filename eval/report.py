#!/usr/bin/env python
"""Regenerate report.md and its PNG plots from results files alone (sweep or suite records)."""

import sys

from rope_ntk.cli_suite import report_main

if __name__ == "__main__":
    sys.exit(report_main(__doc__))
