"""The report and the compare command, from hand-made records alone (no model)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rope_ntk.evaluation import compare as cp
from rope_ntk.evaluation import report as rp

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"


def suite_record(label, length, task, value, *, model="m", task_params=None, metrics=None, headline=None):
    method, _, rest = label.partition(" ")
    params = dict(kv.split("=") for kv in rest.split()) if rest else {}
    params = {k: float(v) for k, v in params.items()}
    cell = {"model": model, "dtype": "float32", "corpus": None, "method": method, "params": params,
            "length": length, "task": task, "task_params": task_params or {}, "seed": 0}
    headline = headline or ("perplexity" if task == "perplexity" else "accuracy")
    return {**cell, "label": label, "metric": headline, "value": value,
            "metrics": {headline: value, **(metrics or {})}, "cell": cell}


def synthetic() -> list[dict]:
    """Two methods x two lengths: perplexity, a needle task with per-depth
    scores, and a task with one cell per depth."""
    records = []
    for label, base in (("none", 10.0), ("yarn factor=2", 8.0)):
        for length in (256, 512):
            records.append(suite_record(label, length, "perplexity", base * length / 256))
            by_depth = [{"depth": 0.0, "accuracy": 1.0}, {"depth": 1.0, "accuracy": 0.5 if length == 512 else 1.0}]
            mean = sum(e["accuracy"] for e in by_depth) / 2
            records.append(suite_record(label, length, "needle", mean, metrics={"by_depth": by_depth}))
            for depth, score in ((0.25, 0.0), (0.75, 1.0)):
                records.append(suite_record(label, length, "ruler:niah", score, task_params={"depth": depth},
                                            headline="recall"))
    return records


def test_report_tables_per_task_and_per_method(tmp_path):
    records = synthetic()
    path = rp.write_report(records, tmp_path)
    text = path.read_text(encoding="utf-8")
    assert "## Perplexity (lower is better)" in text
    assert "| none | 10.000 | 20.000 |" in text and "| yarn factor=2 | 8.000 | 16.000 |" in text
    assert "## needle: accuracy" in text
    assert "| none | 100% | 75% |" in text
    # one cell per depth: merged into one row whose value is the mean over depths
    assert "## ruler:niah: recall" in text
    assert text.count("| none | 50% | 50% |") == 1
    # a task x length table per method
    assert "### yarn factor=2" in text
    section = text.split("### yarn factor=2")[1]
    assert "| task | 256 | 512 |" in section
    assert "| perplexity (perplexity) | 8.000 | 16.000 |" in section
    assert "| needle (accuracy) | 100% | 75% |" in section
    for name in ("perplexity_vs_length.png", "needle_depth_heatmap.png", "ruler_niah_depth_heatmap.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
        assert f"]({name})" in text
    assert "perplexity_depth_heatmap.png" not in text  # perplexity carries no depths


def test_depth_scores_read_every_documented_form():
    by_depth = suite_record("none", 256, "needle", 0.5, metrics={"by_depth": [{"depth": 0.5, "accuracy": 0.5}]})
    trials = suite_record("none", 256, "passkey", 0.5, metrics={"details": [
        {"depth": 0.2, "correct": True}, {"depth": 0.2, "correct": False}, {"depth": 0.8, "correct": True}]})
    per_cell = suite_record("none", 256, "x", 0.25, task_params={"depth": 0.1}, headline="recall")
    assert rp.depth_scores(by_depth) == {0.5: 0.5}
    assert rp.depth_scores(trials) == {0.2: 0.5, 0.8: 1.0}
    assert rp.depth_scores(per_cell) == {0.1: 0.25}
    assert rp.depth_scores(suite_record("none", 256, "perplexity", 3.0)) == {}


def test_newest_record_of_a_cell_wins_and_varying_task_params_are_shown():
    records = [suite_record("none", 256, "perplexity", 5.0, task_params={"tokens": 100}),
               suite_record("none", 256, "perplexity", 6.0, task_params={"tokens": 100}),
               suite_record("none", 256, "perplexity", 7.0, task_params={"tokens": 200})]
    rows = {(r.task, r.length): r.value for r in rp.rows(records)}
    assert rows == {("perplexity tokens=100", 256): 6.0, ("perplexity tokens=200", 256): 7.0}


def test_report_of_classic_sweep_records():
    cell = {"method": "yarn", "length": 128, "metric": "passkey_accuracy"}
    record = {**cell, "factor": 2.0, "value": 2 / 3, "trials": 3, "correct": 2, "cell": cell,
              "details": [{"depth": d, "correct": c} for d, c in ((0.25, True), (0.5, False), (0.75, True))]}
    text = rp.markdown([record])
    assert "## Passkey accuracy" in text and "| yarn x2 | 67% (2/3) |" in text
    assert rp.depth_scores(record) == {0.25: 1.0, 0.5: 0.0, 0.75: 1.0}


# ---------------------------------------------------------------- compare


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema": 1, "records": records}), encoding="utf-8")
    return path


def before_after():
    before = [suite_record(label, n, "perplexity", v, model="base")
              for label, n, v in (("none", 256, 10.0), ("none", 512, 20.0), ("yarn factor=2", 512, 16.0))]
    after = [suite_record(label, n, "perplexity", v, model="tuned")
             for label, n, v in (("none", 256, 9.0), ("none", 512, 12.0), ("yarn factor=4", 512, 11.0))]
    return before, after


def test_compare_matches_cells_ignoring_the_model():
    before, after = before_after()
    c = cp.compare(before, after, ("base", "tuned"))
    assert [(a["label"], a["length"], a["value"], b["value"]) for a, b in c.matched] == [
        ("none", 256, 10.0, 9.0), ("none", 512, 20.0, 12.0)]
    assert [r["label"] for r in c.only_a] == ["yarn factor=2"] and [r["label"] for r in c.only_b] == ["yarn factor=4"]
    header, *body = cp.rows(c)
    assert header[-2:] == ["B - A", "B / A"]
    assert body[1][4:] == ["20.000", "12.000", "-8", f"{12 / 20:.4f}"]
    strict = cp.compare(before, after, ignore=())
    assert strict.matched == [] and len(strict.only_a) == len(strict.only_b) == 3


def test_compare_command_prints_and_writes_markdown(tmp_path):
    before, after = before_after()
    a, b = _write(tmp_path / "a" / "results.json", before), _write(tmp_path / "b.json", after)
    out = tmp_path / "cmp.md"
    done = subprocess.run([sys.executable, "eval/compare.py", str(a.parent), str(b), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["task", "method", "length", "metric", str(a.parent), str(b), "B", "-", "A", "B", "/", "A"]
    assert lines[3].split() == ["perplexity", "none", "512", "perplexity", "20.000", "12.000", "-8", "0.6000"]
    assert "2 matched, 1 only in A, 1 only in B" in done.stdout
    md = out.read_text(encoding="utf-8")
    assert "| perplexity | none | 256 | perplexity | 10.000 | 9.000 | -1 | 0.9000 |" in md
    assert "## Only in A" in md and "yarn factor=2 | L=512" in md

    missing = subprocess.run([sys.executable, "eval/compare.py", str(tmp_path / "nowhere"), str(b)],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: a=") and "Traceback" not in missing.stderr


def test_report_command_merges_several_results_files(tmp_path):
    before, after = before_after()
    a, b = _write(tmp_path / "a" / "results.json", before), _write(tmp_path / "b" / "results.json", after)
    done = subprocess.run([sys.executable, "eval/report.py", str(a.parent), str(b.parent), "--to", str(tmp_path / "r"),
                           "--no-plot"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    # two models: their records are told apart by the model in the method label
    assert "| none [base, float32] | 10.000 | 20.000 |" in text
    assert "| none [tuned, float32] | 9.000 | 12.000 |" in text
