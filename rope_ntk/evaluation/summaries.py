"""One-number summaries of a retrieval sweep over lengths, in the two published forms.

Both read ``{length: accuracy}`` (``accuracy_by_length`` builds it from task
results, pooling every trial of a length, whatever its depth):

* ``reliable_length`` — the longest length whose accuracy is at least
  ``threshold`` (0.8 by default), and the mean accuracy over the lengths up to
  and including it. A length that passes counts even if a shorter one failed.
  (The form named in rope_ntk's issue 5; its origin in the literature is not
  pinned down here.)
* ``effective_length`` — the "effective context window size" of Chen et al.,
  *Extending Context Window of Large Language Models via Positional
  Interpolation* (arXiv:2306.15595, section 3.3): the largest length ``k``
  such that accuracy is at least ``threshold`` (0.2 there) at every measured
  length ``<= k``. The first failing length ends it.

Lengths that were not measured are never assumed; both return ``None`` for
the length when no measured length qualifies.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidParameterError


def _check(threshold) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise InvalidParameterError(f"threshold={threshold!r} must be a number in [0, 1].")
    return float(threshold)


def accuracy_by_length(records: list[dict[str, Any]]) -> dict[int, float]:
    """Pool the trials of task results (each with ``length`` and per-trial ``details``
    holding ``score``) into ``{length: accuracy}``."""
    scores: dict[int, list[float]] = {}
    for record in records:
        scores.setdefault(record["length"], []).extend(float(t["score"]) for t in record["details"])
    return {length: sum(s) / len(s) for length, s in sorted(scores.items()) if s}


def reliable_length(accuracy: dict[int, float], threshold: float = 0.8) -> dict[str, Any]:
    """``{"length": L or None, "mean_accuracy": mean over lengths <= L, "threshold"}``."""
    threshold = _check(threshold)
    passing = [n for n, a in accuracy.items() if a >= threshold]
    if not passing:
        return {"length": None, "mean_accuracy": None, "threshold": threshold}
    best = max(passing)
    below = [a for n, a in accuracy.items() if n <= best]
    return {"length": best, "mean_accuracy": math.fsum(below) / len(below), "threshold": threshold}


def effective_length(accuracy: dict[int, float], threshold: float = 0.2) -> dict[str, Any]:
    """``{"length": largest k with accuracy >= threshold at every length <= k, "threshold"}``."""
    threshold = _check(threshold)
    best = None
    for n in sorted(accuracy):
        if accuracy[n] < threshold:
            break
        best = n
    return {"length": best, "threshold": threshold}
