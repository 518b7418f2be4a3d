#!/usr/bin/env python
"""Sweep RoPE methods x context lengths: perplexity and passkey retrieval."""

import sys

from rope_ntk.cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__, ("perplexity", "passkey")))
