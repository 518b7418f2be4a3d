#!/usr/bin/env python
"""Run an evaluation suite spec (methods x parameters x lengths x tasks), resumable cell by cell."""

import sys

from rope_ntk.cli_suite import suite_main

if __name__ == "__main__":
    sys.exit(suite_main(__doc__))
