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
from . import needle, ruler
from . import passkey as pk
from . import perplexity as pp


@dataclass(frozen=True)
class Task:
    name: str  # "perplexity", "passkey", "needle", "niah_single", ...
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


# ---------------------------------------------------------------- the built-in tasks

# perplexity (protocols, document selection) lives in perplexity.py; passkey,
# needle and the RULER-style tasks (generation or teacher-forced scoring) in
# their own modules
register(Task("perplexity", pp.PERPLEXITY_DEFAULTS, pp.validate_perplexity, pp.run_perplexity, "perplexity"))
register(Task("passkey", pk.PASSKEY_DEFAULTS, pk.validate_passkey, pk.run_passkey, "accuracy"))
register(Task("needle", needle.NEEDLE_DEFAULTS, needle.validate_needle, needle.run_needle, "accuracy"))
for _ruler in ruler.RULER_TASKS.values():
    register(Task(_ruler.name, _ruler.defaults, _ruler.validate, _ruler.run, "accuracy"))
