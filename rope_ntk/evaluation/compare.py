"""Two results files side by side (e.g. before and after fine-tuning).

Records are matched on their ``cell`` (everything that determines a value)
minus the keys named in ``ignore``: by default ``model``, so the same spec
run on two checkpoints lines up cell by cell. For each matched cell the
headline metric of both, their difference (B - A) and ratio (B / A); the
cells found in one file only are listed apart. The newest record of a cell
wins within a file, as in the report. Records of the classic sweep are
matched through their suite equivalent (``suite_cell``), so a sweep and the
same cells run by the suite line up.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError
from ..methods import validate_params
from .passkey import PASSKEY_DEFAULTS
from .perplexity import PERPLEXITY_DEFAULTS
from .report import LEGACY_TASKS, headline, method_label, shown, task_name
from .results import ResultsStore, cell_key

DEFAULT_IGNORE = ("model",)


@dataclass
class Comparison:
    names: tuple[str, str]
    matched: list[tuple[dict, dict]]  # (record of A, record of B)
    only_a: list[dict]
    only_b: list[dict]


def open_results(path: str | Path, argument: str = "results") -> list[dict[str, Any]]:
    """Records of a results file, or of the ``results.json`` in a directory."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise InvalidParameterError(f"{argument}={str(path)!r}: no results file there (a results.json or its directory).")
    return ResultsStore(path).records


def suite_cell(record: dict) -> dict:
    """The record's cell as the suite writes it; a classic sweep record's
    cell is translated (its perplexity and passkey are the suite's tasks with
    the same settings), so sweep and suite results line up."""
    cell = record["cell"]
    task = LEGACY_TASKS.get(cell.get("metric"))
    if "task" in cell or task is None:
        return cell
    config = record.get("config", {})
    if task == "perplexity":
        task_params = {**PERPLEXITY_DEFAULTS, "tokens": cell["ppl_tokens"], "bos": cell["bos"],
                       "chunk_size": config.get("chunk_size", PERPLEXITY_DEFAULTS["chunk_size"]),
                       "protocol": cell.get("protocol", "disjoint"), "stride": cell.get("stride"),
                       "num_documents": cell.get("num_documents"), "min_doc_tokens": cell.get("min_doc_tokens", 0),
                       "exclude": list(cell.get("exclude_documents", []))}
    else:
        task_params = {**PASSKEY_DEFAULTS, "depths": [float(d) for d in cell["depths"]]}
    translated = {
        "model": cell["model"],
        "dtype": cell["dtype"],
        "corpus": {"source": cell["corpus"], "split": config.get("corpus_split", "test"),
                   "text_field": config.get("text_field", "text")},
        "method": cell["method"],
        "params": validate_params(cell["method"], cell["params"]),
        "length": cell["length"],
        "task": task,
        "task_params": task_params,
        "seed": cell["seed"],
    }
    if "cache_consistent" in cell:
        translated["cache_consistent"] = cell["cache_consistent"]
    return translated


def _key(record: dict, ignore: tuple[str, ...]) -> str:
    return cell_key({k: v for k, v in suite_cell(record).items() if k not in ignore})


def _newest(records: list[dict], ignore: tuple[str, ...]) -> dict[str, dict]:
    by_key: dict[str, dict] = {}
    for r in records:
        by_key[_key(r, ignore)] = r
    return by_key


def compare(a: list[dict], b: list[dict], names=("A", "B"), ignore: tuple[str, ...] = DEFAULT_IGNORE) -> Comparison:
    left, right = _newest(a, ignore), _newest(b, ignore)
    matched = [(left[k], right[k]) for k in left if k in right]
    return Comparison(
        tuple(names), matched, [r for k, r in left.items() if k not in right], [r for k, r in right.items() if k not in left]
    )


def task_label(record: dict) -> str:
    return record.get("task_label") or task_name(record)


def _number(value: float | None, digits: str = ".4g") -> str:
    return "" if value is None else format(value, digits)


def rows(c: Comparison) -> list[list[str]]:
    """Header plus one row per matched cell, sorted by task, method, length."""
    out = [["task", "method", "length", "metric", c.names[0], c.names[1], "B - A", "B / A"]]
    ordered = sorted(c.matched, key=lambda p: (task_label(p[0]), method_label(p[0]), p[0]["length"]))
    for ra, rb in ordered:
        va, vb = ra.get("value"), rb.get("value")
        both = va is not None and vb is not None
        diff = vb - va if both else None
        ratio = vb / va if both and va != 0 else None
        out.append([task_label(ra), method_label(ra), str(ra["length"]), headline(ra), shown(ra), shown(rb),
                    _number(diff, "+.4g"), _number(ratio, ".4f")])
    return out


def _cell_line(record: dict) -> str:
    params = json.dumps(suite_cell(record).get("task_params", {}), sort_keys=True)
    return f"{task_label(record)} | {method_label(record)} | L={record['length']} | {shown(record)} | task params {params}"


def markdown(c: Comparison) -> str:
    table = rows(c)
    parts = [f"# Comparison: A = {c.names[0]}, B = {c.names[1]}", "",
             f"{len(c.matched)} matched cell(s), {len(c.only_a)} only in A, {len(c.only_b)} only in B.", ""]
    if len(table) > 1:
        parts += ["| " + " | ".join(table[0]) + " |", "| " + " | ".join(["---"] * 3 + ["---"] + ["---:"] * 4) + " |"]
        parts += ["| " + " | ".join(row) + " |" for row in table[1:]]
        parts.append("")
    for name, only in (("A", c.only_a), ("B", c.only_b)):
        if only:
            parts += [f"## Only in {name} ({c.names[0 if name == 'A' else 1]})", ""]
            parts += [f"- {_cell_line(r)}" for r in only]
            parts.append("")
    return "\n".join(parts)


def terminal(c: Comparison) -> str:
    """The matched cells as an aligned plain-text table, then the counts."""
    table = rows(c)
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"\nA = {c.names[0]}\nB = {c.names[1]}\n"
                 f"{len(c.matched)} matched, {len(c.only_a)} only in A, {len(c.only_b)} only in B")
    return "\n".join(lines)
