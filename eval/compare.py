#!/usr/bin/env python
"""Two results files side by side: matching cells, the headline metric of each, difference and ratio."""

import sys

from rope_ntk.cli_suite import compare_main

if __name__ == "__main__":
    sys.exit(compare_main(__doc__))
