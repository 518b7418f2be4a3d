"""Tables and plots regenerated from results records alone.

Works on any mix of records of the classic sweep (``metric`` is
``perplexity`` or ``passkey_accuracy``) and of the suite runner (``task``,
``task_params``, ``metric`` = the task's headline, ``metrics``), for any
registered task: only the headline value and an optional per-depth breakdown
are read. ``report.md`` holds

* one table per task: method x length, the headline metric;
* one table per method: task x length;
* links to ``perplexity_vs_length.png`` (one panel per task: the headline vs
  length, one line per method; the name is kept from the first sweep) and to
  one depth x length heatmap per task whose records carry depths.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import atomic_write_text

logger = logging.getLogger(__name__)

TITLES = {"perplexity": "Perplexity (lower is better)", "passkey": "Passkey accuracy"}
LEGACY_TASKS = {"perplexity": "perplexity", "passkey_accuracy": "passkey"}
LINES_PNG = "perplexity_vs_length.png"


@dataclass
class Row:
    """One record as the report sees it."""

    task: str  # task label: the name plus the parameters that vary between records
    method: str  # method label
    length: int
    metric: str  # name of the headline metric
    value: float | None
    shown: str  # the value as a table shows it
    depths: dict[float, float] = field(default_factory=dict)  # depth -> score
    record: dict = field(default_factory=dict)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_fmt(v) for v in value) + "]"
    return str(value)


def task_name(record: dict[str, Any]) -> str:
    return record.get("task") or LEGACY_TASKS.get(record["metric"], record["metric"])


def method_label(record: dict[str, Any]) -> str:
    if "label" in record:
        return record["label"]
    factor = record.get("factor")  # a sweep record
    label = record["method"] if factor is None else f"{record['method']} x{factor:g}"
    protocol = record.get("protocol", "disjoint")  # perplexity records of other protocols get their own row
    if protocol != "disjoint":
        label += f" ({protocol}" + (f" S={record['stride']}" if record.get("stride") else "") + ")"
    return label


def headline(record: dict[str, Any]) -> str:
    return "accuracy" if record["metric"] == "passkey_accuracy" else record["metric"]


def depth_scores(record: dict[str, Any]) -> dict[float, float]:
    """Score per depth: from ``metrics.by_depth``, from trials carrying
    ``depth`` and ``correct``, or from a ``depth`` task parameter."""
    metrics = record.get("metrics", record)
    name = headline(record)
    by_depth = metrics.get("by_depth")
    if isinstance(by_depth, list) and by_depth:
        return {float(e["depth"]): e.get(name, e.get("accuracy")) for e in by_depth if "depth" in e}
    trials = metrics.get("details")
    if isinstance(trials, list) and trials and all(isinstance(t, dict) and "depth" in t and "correct" in t for t in trials):
        scores: dict[float, list[bool]] = {}
        for t in trials:
            scores.setdefault(float(t["depth"]), []).append(bool(t["correct"]))
        return {d: sum(v) / len(v) for d, v in scores.items()}
    depth = (record.get("task_params") or {}).get("depth")
    if isinstance(depth, (int, float)) and not isinstance(depth, bool) and record.get("value") is not None:
        return {float(depth): record["value"]}
    return {}


def shown(record: dict[str, Any]) -> str:
    value = record.get("value")
    if value is None:
        return "n/a"
    metrics = record.get("metrics", record)
    name = headline(record)
    if "accuracy" in name or name in ("recall", "score"):
        counts = f" ({metrics['correct']}/{metrics['trials']})" if {"correct", "trials"} <= metrics.keys() else ""
        return f"{value:.0%}{counts}"
    if name == "perplexity":
        return f"{value:.3f}"
    return f"{value:.4g}"


def rows(records: list[dict[str, Any]]) -> list[Row]:
    """Rows of the newest record of each (task label, method label, length)."""
    varying: dict[str, set[str]] = {}  # task name -> parameters whose values differ between its records
    seen: dict[str, dict[str, set[str]]] = {}
    for r in records:
        for k, v in (r.get("task_params") or {}).items():
            seen.setdefault(task_name(r), {}).setdefault(k, set()).add(json.dumps(v, sort_keys=True))
    for task, params in seen.items():
        varying[task] = {k for k, values in params.items() if len(values) > 1 and k != "depth"}
    models = {(r.get("model"), r.get("dtype")) for r in records}

    newest: dict[tuple, Row] = {}
    for r in records:
        task = task_name(r)
        extra = [f"{k}={_fmt(v)}" for k, v in (r.get("task_params") or {}).items() if k in varying.get(task, ())]
        label = " ".join([task, *extra])
        method = method_label(r)
        if len(models) > 1:
            method = f"{method} [{r.get('model')}, {r.get('dtype')}]"
        depth = (r.get("task_params") or {}).get("depth")
        key = (label, method, r["length"], depth)
        row = newest.get(key)
        depths = {**(row.depths if row else {}), **depth_scores(r)}
        newest[key] = Row(label, method, r["length"], headline(r), r.get("value"), shown(r), depths, r)
    # one cell per depth (a ``depth`` task parameter): merged into one row per (task, method, length)
    merged: dict[tuple, Row] = {}
    for (label, method, length, depth), row in newest.items():
        key = (label, method, length)
        if key in merged and depth is not None:
            first = merged[key]
            first.depths.update(row.depths)
            values = [v for v in first.depths.values() if v is not None]
            first.value = sum(values) / len(values) if values else None
            first.shown = shown({**first.record, "value": first.value, "metrics": {}})
        else:
            merged[key] = row
    return list(merged.values())


def _markdown_table(corner: str, grid: dict[str, dict[int, str]]) -> str:
    lengths = sorted({n for cells in grid.values() for n in cells})
    lines = [
        f"| {corner} | " + " | ".join(str(n) for n in lengths) + " |",
        "| --- | " + " | ".join("---:" for _ in lengths) + " |",
    ]
    for name, cells in grid.items():
        lines.append(f"| {name} | " + " | ".join(cells.get(n, "") for n in lengths) + " |")
    return "\n".join(lines)


def task_table(all_rows: list[Row], task: str) -> str:
    """Markdown table of one task: one row per method, one column per length."""
    grid: dict[str, dict[int, str]] = {}
    for row in all_rows:
        if row.task == task:
            grid.setdefault(row.method, {})[row.length] = row.shown
    return _markdown_table("method", grid) if grid else ""


def method_table(all_rows: list[Row], method: str) -> str:
    """Markdown table of one method: one row per task (headline metric), one column per length."""
    grid: dict[str, dict[int, str]] = {}
    for row in all_rows:
        if row.method == method:
            grid.setdefault(f"{row.task} ({row.metric})", {})[row.length] = row.shown
    return _markdown_table("task", grid) if grid else ""


def table(records: list[dict[str, Any]], metric: str) -> str:
    """The table of one task by its record ``metric`` name (the sweep's CLI)."""
    return task_table(rows(records), LEGACY_TASKS.get(metric, metric))


def title(task: str, metric: str) -> str:
    if task in TITLES:
        return TITLES[task]
    return f"{task}: {metric}" + (" (lower is better)" if metric == "perplexity" else "")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()


def _context(records: list[dict[str, Any]]) -> list[str]:
    def distinct(key):
        values = [json.dumps(r.get(key), sort_keys=True) for r in records if r.get(key) is not None]
        return [json.loads(v) for v in dict.fromkeys(values)]

    lines = []
    for key in ("model", "corpus", "dtype", "seed"):
        values = distinct(key)
        if values:
            lines.append(f"- {key}: " + ", ".join(f"`{_fmt(v) if not isinstance(v, dict) else v.get('source', v)}`"
                                                  for v in values))
    for key in ("versions", "command"):
        for value in distinct(key)[:3]:
            lines.append(f"- {key}: `{value}`" if key == "command" else f"- {key}: {value}")
    return lines


def markdown(records: list[dict[str, Any]], images: dict[str, str] | None = None) -> str:
    """The whole report; ``images`` maps a caption to a PNG file name."""
    all_rows = rows(records)
    parts = ["# rope_ntk evaluation results", ""]
    if records:
        parts += [*_context(records), ""]
    tasks = list(dict.fromkeys(row.task for row in all_rows))
    for task in tasks:
        metric = next(row.metric for row in all_rows if row.task == task)
        parts += [f"## {title(task, metric)}", "", task_table(all_rows, task), ""]
    methods = list(dict.fromkeys(row.method for row in all_rows))
    if len(tasks) > 1:
        parts += ["## Tasks x lengths per method", ""]
        for method in methods:
            parts += [f"### {method}", "", method_table(all_rows, method), ""]
    for caption, name in (images or {}).items():
        parts += [f"![{caption}]({name})", ""]
    return "\n".join(parts)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; no plot written (pip install 'rope-ntk[plots]')")
        return None
    return plt


def _save(fig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """The headline metric vs length, one panel per task, one line per method."""
    plt = _pyplot()
    all_rows = rows(records)
    if plt is None or not all_rows:
        return False
    import matplotlib.ticker

    tasks = list(dict.fromkeys(row.task for row in all_rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4.2), squeeze=False)
    lengths = sorted({row.length for row in all_rows})
    trained = next((r.get("rope", {}).get("original_max_position_embeddings") for r in records if r.get("rope")), None)
    for ax, task in zip(axes[0], tasks):
        series: dict[str, dict[int, float]] = {}
        for row in all_rows:
            if row.task == task and row.value is not None:
                series.setdefault(row.method, {})[row.length] = row.value
        metric = next(row.metric for row in all_rows if row.task == task)
        for label, points in series.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_title(title(task, metric))
        values = [v for pts in series.values() for v in pts.values()]
        if metric == "perplexity" and values and min(values) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        elif values and 0 <= min(values) and max(values) <= 1:
            ax.set_ylim(-0.05, 1.05)
        if trained:
            ax.axvline(trained, color="grey", linestyle=":", linewidth=1, label=f"trained context ({trained})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def heatmap(records: list[dict[str, Any]], task: str, path: Path) -> bool:
    """Depth x length of one task, one panel per method (score in each square)."""
    plt = _pyplot()
    task_rows = [row for row in rows(records) if row.task == task and row.depths]
    if plt is None or not task_rows:
        return False
    methods = list(dict.fromkeys(row.method for row in task_rows))
    lengths = sorted({row.length for row in task_rows})
    depths = sorted({d for row in task_rows for d in row.depths})
    size = (1.5 + (0.6 + 0.8 * len(lengths)) * len(methods), 2.2 + 0.4 * len(depths))
    fig, axes = plt.subplots(1, len(methods), figsize=size, squeeze=False, layout="constrained")
    for ax, method in zip(axes[0], methods):
        grid = [[math.nan] * len(lengths) for _ in depths]
        for row in task_rows:
            if row.method == method:
                for d, score in row.depths.items():
                    if score is not None:
                        grid[depths.index(d)][lengths.index(row.length)] = score
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(grid):
            for j, score in enumerate(line):
                if not math.isnan(score):
                    ax.text(j, i, f"{score:.0%}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_xlabel("length")
        ax.set_title(method, fontsize=9)
    axes[0][0].set_ylabel("depth")
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.05)
    fig.suptitle(f"{task}: score by depth and length", fontsize=10)
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(records: list[dict[str, Any]], out_dir: Path, with_plot: bool = True) -> Path:
    """``report.md`` plus its PNG plots in ``out_dir``; returns the report's path."""
    out_dir = Path(out_dir)
    images: dict[str, str] = {}
    if with_plot and plot(records, out_dir / LINES_PNG):
        images["headline metric vs length per method"] = LINES_PNG
    if with_plot:
        for task in dict.fromkeys(row.task for row in rows(records) if row.depths):
            name = f"{slug(task)}_depth_heatmap.png"
            if heatmap(records, task, out_dir / name):
                images[f"{task}: depth x length"] = name
    atomic_write_text(out_dir / "report.md", markdown(records, images) + "\n")
    return out_dir / "report.md"
