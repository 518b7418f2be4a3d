#!/usr/bin/env python
"""Perplexity of RoPE-scaled models at extended context lengths, by one of
three token-weighted protocols: disjoint windows (default), sliding windows
with a stride, or each document truncated to the length
(docs/perplexity_protocols.md)."""

import sys

from rope_ntk.cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__, ("perplexity",)))
