"""Tables and plots regenerated from results records alone."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .results import atomic_write_text

logger = logging.getLogger(__name__)

METRIC_TITLES = {"perplexity": "Perplexity (lower is better)", "passkey_accuracy": "Passkey accuracy"}


def _label(record: dict[str, Any]) -> str:
    factor = record.get("factor")
    label = record["method"] if factor is None else f"{record['method']} x{factor:g}"
    protocol = record.get("protocol", "disjoint")  # perplexity records of other protocols get their own row
    if protocol != "disjoint":
        label += f" ({protocol}" + (f" S={record['stride']}" if record.get("stride") else "") + ")"
    return label


def table(records: list[dict[str, Any]], metric: str) -> str:
    """Markdown table: one row per method, one column per length.

    Only the newest record of each (method, params, length) is shown.
    """
    rows: dict[str, dict[int, dict]] = {}
    for r in records:
        if r.get("metric") == metric:
            rows.setdefault(_label(r), {})[r["length"]] = r
    if not rows:
        return ""
    lengths = sorted({length for cells in rows.values() for length in cells})
    lines = [
        "| method | " + " | ".join(str(length) for length in lengths) + " |",
        "| --- | " + " | ".join("---:" for _ in lengths) + " |",
    ]
    for label, cells in rows.items():
        shown = []
        for length in lengths:
            r = cells.get(length)
            if r is None:
                shown.append("")
            elif metric == "perplexity":
                shown.append(f"{r['value']:.3f}")
            else:
                shown.append(f"{r['value']:.0%} ({r['correct']}/{r['trials']})")
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def markdown(records: list[dict[str, Any]]) -> str:
    parts = ["# rope_ntk sweep results", ""]
    if records:
        first = records[0]
        parts += [
            f"- model: `{first.get('model')}`, corpus: `{first.get('corpus')}`, dtype: `{first.get('dtype')}`, "
            f"seed: {first.get('seed')}",
            f"- versions: {first.get('versions')}",
            f"- command: `{first.get('command')}`",
            "",
        ]
    for metric, title in METRIC_TITLES.items():
        body = table(records, metric)
        if body:
            parts += [f"## {title}", "", body, ""]
    return "\n".join(parts)


def plot(records: list[dict[str, Any]], path: Path) -> bool:
    """Perplexity and passkey accuracy vs length, one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        logger.warning("matplotlib is not installed; no plot written (pip install 'rope-ntk[plots]')")
        return False
    metrics = [m for m in METRIC_TITLES if any(r.get("metric") == m for r in records)]
    if not metrics:
        return False
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        series: dict[str, dict[int, float]] = {}
        for r in records:
            if r.get("metric") == metric:
                series.setdefault(_label(r), {})[r["length"]] = r["value"]
        for label, points in series.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", label=label)
        lengths = sorted({r["length"] for r in records})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.minorticks_off()
        ax.set_xlabel("context length (tokens)")
        ax.set_title(METRIC_TITLES[metric])
        if metric == "perplexity":
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        else:
            ax.set_ylim(-0.05, 1.05)
        trained = records[0].get("rope", {}).get("original_max_position_embeddings")
        if trained:
            ax.axvline(trained, color="grey", linestyle=":", linewidth=1, label=f"trained context ({trained})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_report(records: list[dict[str, Any]], out_dir: Path, with_plot: bool = True) -> None:
    """``report.md`` and ``perplexity_vs_length.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "report.md", markdown(records) + "\n")
    if with_plot:
        plot(records, out_dir / "perplexity_vs_length.png")
