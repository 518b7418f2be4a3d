"""Long-context evaluation: perplexity, passkey retrieval, sweeps and reports.

Submodules: ``perplexity``, ``passkey``, ``results``, ``report``, ``sweep``.
"""

from .sweep import SweepConfig, run_sweep

__all__ = ["SweepConfig", "run_sweep"]
