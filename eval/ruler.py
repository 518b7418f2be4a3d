#!/usr/bin/env python
"""RULER-style synthetic tasks (needles with numbers/words/UUIDs, multi-key, multi-value,
variable tracking, common words) at lengths in tokens of the model's tokenizer; exact recall."""

import sys

from rope_ntk.retrieval_cli import main

if __name__ == "__main__":
    sys.exit(main(__doc__, "ruler"))
