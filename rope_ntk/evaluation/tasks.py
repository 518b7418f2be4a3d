"""The task registry: what the suite runner can compute in one cell.

A task turns (a patched model, its tokenizer, the corpus, a context length,
the task's parameters, a seed) into a dict of metrics. The suite runner
(``suite.py``) knows tasks only through this registry, so a new task is one
``register(Task(...))`` call away from every spec, report and comparison.

``run`` returns a JSON-serialisable dict that always holds the ``headline``
key (the number shown in tables) and whatever is needed to reproduce the
cell (``tokens``, ``trials``, ``protocol``...). A task whose score depends
on where something sits in the context reports it per depth, in one of the
forms the report reads (see ``report.depth_scores``):

* ``"by_depth": [{"depth": 0.25, "<headline>": 1.0}, ...]``, or
* a list of trials under ``"details"`` each holding ``"depth"`` and
  ``"correct"``, or
* a ``depth`` task parameter (one cell per depth).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import InvalidParameterError
from . import passkey as pk
from . import perplexity as pp


@dataclass(frozen=True)
class Task:
    name: str  # "perplexity", "passkey", "needle", "ruler:niah_single", ...
    defaults: dict  # task parameters and their default values
    validate: Callable[[dict], dict]  # -> normalized params; InvalidParameterError naming param/value/valid
    run: Callable[..., dict]  # run(model, tokenizer, corpus, length, params, *, seed, progress) -> metrics
    headline: str  # key of the metric shown in tables, e.g. "perplexity" / "accuracy"


TASKS: dict[str, Task] = {}


def register(task: Task) -> None:
    """Add ``task`` to the registry (a second task of the same name is refused)."""
    if task.name in TASKS and TASKS[task.name] is not task:
        raise InvalidParameterError(f"task={task.name!r} is already registered; pick another name.")
    TASKS[task.name] = task


def get_task(name: Any) -> Task:
    if not isinstance(name, str) or name not in TASKS:
        raise InvalidParameterError(f"task={name!r} is not a registered task; valid tasks: {', '.join(TASKS)}.")
    return TASKS[name]


# ---------------------------------------------------------------- shared checks


def _unknown(task: str, params: dict, defaults: dict) -> list[str]:
    valid = ", ".join(defaults)
    return [f"{k}={v!r} is not a parameter of task {task!r} (valid: {valid})" for k, v in params.items() if k not in defaults]


def _raise(problems: list[str]) -> None:
    if problems:
        raise InvalidParameterError("; ".join(problems) + ".")


def _positive_int(task: str, name: str, value: Any, problems: list[str]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{name}={value!r} for task {task!r} must be a whole number >= 1")


# ---------------------------------------------------------------- perplexity

# the protocols (disjoint, sliding, truncate) and document selection live in perplexity.py
PERPLEXITY_DEFAULTS = pp.PERPLEXITY_DEFAULTS
validate_perplexity = pp.validate_perplexity
run_perplexity = pp.run_perplexity


# ---------------------------------------------------------------- passkey

PASSKEY_DEFAULTS = {"depths": [0.25, 0.5, 0.75], "trials": 1, "max_new_tokens": 10}


def validate_passkey(params: dict) -> dict:
    """``depths``: where the key sits (0 = start, 1 = end); ``trials``: keys per depth."""
    p = {**PASSKEY_DEFAULTS, **params}
    problems = _unknown("passkey", params, PASSKEY_DEFAULTS)
    depths = p["depths"]
    if not isinstance(depths, (list, tuple)) or not depths:
        problems.append(f"depths={depths!r} for task 'passkey' must be a non-empty list of numbers in [0, 1]")
    else:
        for d in depths:
            try:
                pk.check_depth(d)
            except InvalidParameterError as exc:
                problems.append(str(exc).rstrip("."))
        p["depths"] = [float(d) for d in depths if not isinstance(d, bool) and isinstance(d, (int, float))]
    _positive_int("passkey", "trials", p["trials"], problems)
    _positive_int("passkey", "max_new_tokens", p["max_new_tokens"], problems)
    _raise(problems)
    return p


def run_passkey(model, tokenizer, corpus, length: int, params: dict, *, seed: int, progress=None) -> dict:
    """Greedy passkey retrieval (``passkey.py``), ``trials`` keys per depth.

    With one trial per depth the keys are those of the classic sweep, so the
    same seed gives the same prompts there and here."""
    p = validate_passkey(params)
    depths = [d for d in p["depths"] for _ in range(p["trials"])]
    keys = pk.trial_keys(seed, length, depths)
    if progress is not None:
        progress.total = len(depths)
    trials = []
    for depth, key in zip(depths, keys):
        prompt = pk.build_prompt(tokenizer, length, depth, key)
        trials.append(pk.run_trial(model, tokenizer, prompt, max_new_tokens=p["max_new_tokens"]))
        if progress is not None:
            progress.update(1)
    correct = sum(t["correct"] for t in trials)
    by_depth = []
    for d in dict.fromkeys(p["depths"]):
        at = [t["correct"] for t in trials if t["depth"] == d]
        by_depth.append({"depth": d, "accuracy": sum(at) / len(at), "trials": len(at)})
    return {"accuracy": correct / len(trials), "correct": correct, "trials": len(trials), "by_depth": by_depth,
            "details": trials}


register(Task("perplexity", PERPLEXITY_DEFAULTS, validate_perplexity, run_perplexity, "perplexity"))
register(Task("passkey", PASSKEY_DEFAULTS, validate_passkey, run_passkey, "accuracy"))
