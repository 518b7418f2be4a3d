#!/usr/bin/env python
"""Perplexity of RoPE-scaled models at extended context lengths."""

import sys

from rope_ntk.cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__, ("perplexity",)))
