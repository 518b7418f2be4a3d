#!/usr/bin/env python
"""Fine-tune a causal LM with scaled RoPE: python scripts/finetune.py --help.

Multi-process: accelerate launch --config_file configs/accelerate/ddp_cpu.yaml scripts/finetune.py ...
"""

import sys

from rope_ntk.training.cli import main

if __name__ == "__main__":
    sys.exit(main())
