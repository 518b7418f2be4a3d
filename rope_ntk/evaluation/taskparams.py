"""Validation of task parameters shared by passkey, needle and the RULER-style tasks.

Each task has a ``*_DEFAULTS`` dict; ``normalize`` fills the defaults in,
rejects unknown names and collects every problem into one
``InvalidParameterError`` naming the parameter, the value and what is valid.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..errors import InvalidParameterError
from .scoring import SCORINGS

# parameters every retrieval task takes
COMMON_DEFAULTS: dict[str, Any] = {
    "trials": 1,  # trials per cell (per depth where the task has depths)
    "scoring": "generate",  # or "teacher-forcing"
    "chat_template": False,
    "max_new_tokens": None,  # None: tokens of the gold answer + 8
}


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(minimum: int) -> Callable[[str, Any], str | None]:
    def check(name, value):
        if not is_int(value) or value < minimum:
            return f"{name}={value!r} must be an integer >= {minimum}"
        return None

    return check


def choice(*valid: str) -> Callable[[str, Any], str | None]:
    def check(name, value):
        if value not in valid:
            return f"{name}={value!r} is not known; valid: {', '.join(valid)}"
        return None

    return check


def boolean(name, value):
    return None if isinstance(value, bool) else f"{name}={value!r} must be true or false"


def optional(check):
    return lambda name, value: None if value is None else check(name, value)


def depth_list(name, value):
    if not isinstance(value, (list, tuple)) or not value:
        return f"{name}={value!r} must be a non-empty list of numbers in [0, 1]"
    for d in value:
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and 0 <= d <= 1):
            return f"depth={d!r} in {name} must be a number in [0, 1] (0 = start, 1 = end)"
    return None


COMMON_CHECKS = {
    "trials": int_at_least(1),
    "scoring": choice(*SCORINGS),
    "chat_template": boolean,
    "max_new_tokens": optional(int_at_least(1)),
}


def normalize(task: str, params: dict | None, defaults: dict, checks: dict) -> dict[str, Any]:
    """Defaults filled in, every value checked; all problems raised at once."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(defaults))
    problems = []
    if unknown:
        problems.append(f"{task}: unknown parameter(s) {unknown}; valid: {', '.join(sorted(defaults))}")
    merged = {**defaults, **{k: v for k, v in params.items() if k in defaults}}
    for name, check in checks.items():
        problem = check(name, merged[name])
        if problem:
            problems.append(problem)
    if problems:
        raise InvalidParameterError("; ".join(problems) + ".")
    if "depths" in merged:
        merged["depths"] = [float(d) for d in merged["depths"]]
    return merged


def new_tokens(params: dict, answer_tokens: int) -> int:
    return params["max_new_tokens"] or answer_tokens + 8
