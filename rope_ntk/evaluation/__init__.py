"""Long-context evaluation: perplexity, passkey retrieval, sweeps and reports.

Submodules: ``perplexity``, ``passkey``, ``results``, ``report``, ``sweep``,
``tasks`` (the task registry), ``suite`` (spec runner), ``compare``;
retrieval tasks: ``needle``, ``ruler`` (RULER-style synthetic tasks),
``scoring`` (generation / teacher forcing), ``haystack``, ``summaries``.
"""

from .sweep import SweepConfig, run_sweep

__all__ = ["SweepConfig", "run_sweep"]
