#!/usr/bin/env python
"""lm-evaluation-harness (lm_eval's own arguments) with the RoPE-scaled model class 'rope_ntk' registered.

Example: eval/lmeval.py --model rope_ntk --model_args pretrained=bundled,method=yarn,factor=2 --tasks TASK
"""

import sys

from rope_ntk.lmeval import main

if __name__ == "__main__":
    sys.exit(main())
