#!/usr/bin/env python
"""Passkey retrieval over a depth x length grid, scored by generation or teacher forcing,
with the two published summaries (longest length >= 80%; largest k with >= 20% up to k)."""

import sys

from rope_ntk.retrieval_cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__, "passkey"))
