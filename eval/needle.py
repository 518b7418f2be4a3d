#!/usr/bin/env python
"""Needle in a haystack over essay text: depth x length grid, exact-recall scoring, heatmaps."""

import sys

from rope_ntk.retrieval_cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__, "needle"))
