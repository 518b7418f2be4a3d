"""The results store and the resumable sweep, end to end on a tiny saved
model (a 1-layer Llama over the real SmolLM2 tokenizer) and a local text."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from evalkit import reference_nll, save_tiny_lm, write_corpus

import rope_ntk
from rope_ntk.evaluation import passkey as pk
from rope_ntk.evaluation import perplexity as pp
from rope_ntk.evaluation import results as rs
from rope_ntk.evaluation import sweep as sw
from rope_ntk.evaluation.sweep import SweepConfig, run_sweep

# ---------------------------------------------------------------- results store


def _record(method: str, length: int, value: float) -> dict:
    cell = {"method": method, "length": length, "metric": "perplexity", "params": {}}
    return {**cell, "value": value, "cell": cell}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


def test_store_add_has_and_reopen(tmp_path):
    path = tmp_path / "sub" / "results.json"
    store = rs.ResultsStore(path)
    assert store.records == [] and not path.exists()  # nothing written before the first record

    a, b = _record("none", 64, 3.5), _record("yarn", 128, 2.25)
    assert not store.has(a["cell"])
    store.add(a)
    assert store.has(a["cell"]) and not store.has(b["cell"])
    store.add(b)
    assert store.has(dict(reversed(list(b["cell"].items()))))  # key order does not matter
    assert not store.has({**a["cell"], "length": 65})

    data = json.loads(path.read_text(encoding="utf-8"))
    assert data == {"schema": rs.SCHEMA, "records": [a, b]}

    again = rs.ResultsStore(path)
    assert again.records == [a, b]
    assert again.has(a["cell"]) and again.has(b["cell"])
    assert _leftovers(path.parent) == []


@pytest.mark.parametrize("body", ["{not json", "", '["schema", 1]', '{"schema": 2, "records": []}', '{"records": []}'])
def test_store_refuses_a_file_that_is_not_a_results_file(tmp_path, body):
    path = tmp_path / "results.json"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(ValueError) as info:
        rs.ResultsStore(path)
    assert str(path) in str(info.value)
    assert path.read_text(encoding="utf-8") == body  # left for the user to move away


def test_store_refuses_records_that_are_not_objects(tmp_path):
    path = tmp_path / "results.json"
    path.write_text('{"schema": 1, "records": [1, 2]}', encoding="utf-8")
    with pytest.raises(ValueError, match="results.json"):
        rs.ResultsStore(path)


def test_store_names_a_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError) as info:
        rs.ResultsStore(path)
    assert str(path) in str(info.value)


def test_atomic_write_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "out" / "report.md"
    rs.atomic_write_text(path, "first\n")
    rs.atomic_write_text(path, "second\n")
    assert path.read_text(encoding="utf-8") == "second\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.md"]


def test_atomic_write_that_fails_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    rs.atomic_write_text(path, "old\n")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(rs.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        rs.atomic_write_text(path, "new\n")
    assert path.read_text(encoding="utf-8") == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


# ---------------------------------------------------------------- sweep end to end

LENGTHS = (128, 256)  # a passkey prompt of the SmolLM2 tokenizer needs about 100 tokens
PPL_TOKENS = 256


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-assets")
    model_dir = save_tiny_lm(root / "tiny-lm")
    corpus = write_corpus(root / "corpus.txt")
    return model_dir, corpus


def _config(assets, **overrides) -> SweepConfig:
    model_dir, corpus = assets
    fields = dict(
        model=str(model_dir),
        corpus=str(corpus),
        methods=("none", "yarn"),
        lengths=LENGTHS,
        ppl_tokens=PPL_TOKENS,
        depths=(0.5,),
        dtype="float32",
    )
    return SweepConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def first_run(assets, tmp_path_factory):
    """One full sweep with the plot; its output directory and results text."""
    out = tmp_path_factory.mktemp("sweep-out")
    store = run_sweep(_config(assets), out, plot=True)
    return out, store, (out / "results.json").read_text(encoding="utf-8")


def _by_cell(records):
    return {(r["method"], r["length"], r["metric"]): r for r in records}


def test_sweep_writes_one_record_per_method_length_metric(first_run):
    out, store, _ = first_run
    records = json.loads((out / "results.json").read_text(encoding="utf-8"))["records"]
    assert records == json.loads(json.dumps(store.records))  # what was returned is what was written
    cells = _by_cell(records)
    assert len(records) == 8 and len(cells) == 8
    assert set(cells) == {
        (m, L, metric) for m in ("none", "yarn") for L in LENGTHS for metric in ("perplexity", "passkey_accuracy")
    }
    for (method, length, metric), r in cells.items():
        assert r["factor"] == (None if method == "none" else 2.0)
        assert r["params"] == ({} if method == "none" else {"factor": 2.0})
        assert r["seed"] == 0
        assert r["dtype"] == "float32"
        assert isinstance(r["command"], str) and r["command"]
        assert r["versions"]["torch"] == torch.__version__
        assert r["versions"]["rope_ntk"] == rope_ntk.__version__
        assert r["rope"]["method"] == method
        assert r["cell"]["method"] == method and r["cell"]["length"] == length and r["cell"]["metric"] == metric
        assert r["config"]["lengths"] == list(LENGTHS)
        if metric == "perplexity":
            windows = pp.windows_for(length, PPL_TOKENS)
            assert r["windows"] == windows
            assert r["tokens"] == windows * (length - 1)
            assert r["value"] == pytest.approx(math.exp(r["nll_sum"] / r["tokens"]), rel=1e-12)
            assert r["value"] > 1
        else:
            (trial,) = r["details"]
            assert r["trials"] == 1
            assert r["correct"] == int(trial["correct"])
            assert r["value"] == r["correct"] / r["trials"]
            assert trial["key"] == pk.trial_keys(0, length, [0.5])[0]
            assert trial["depth"] == 0.5
            assert 0 < trial["prompt_tokens"] <= length


def test_sweep_perplexity_matches_an_independent_computation(first_run, assets):
    """The 'none' cells against full-forward float64 cross-entropy over the same windows."""
    out, store, _ = first_run
    model_dir, corpus = assets
    model, tokenizer = rope_ntk.load_model(str(model_dir), dtype="float32")
    assert pp.resolve_bos(tokenizer, "auto") is None
    stream = tokenizer(corpus.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    cells = _by_cell(store.records)
    for length in LENGTHS:
        count = cells[("none", length, "perplexity")]["windows"]
        nll = sum(reference_nll(model, stream[k * (length - 1) : k * (length - 1) + length]) for k in range(count))
        assert cells[("none", length, "perplexity")]["nll_sum"] == pytest.approx(nll, rel=1e-5)
        # the patch was applied: YaRN changes the logits at every length
        assert cells[("yarn", length, "perplexity")]["value"] != pytest.approx(
            cells[("none", length, "perplexity")]["value"], rel=1e-6
        )


def test_sweep_report_and_plot(first_run):
    out, store, _ = first_run
    report = (out / "report.md").read_text(encoding="utf-8")
    assert "## Perplexity (lower is better)" in report
    assert "## Passkey accuracy" in report
    header = "| method | " + " | ".join(str(L) for L in LENGTHS) + " |"
    assert report.count(header) == 2
    cells = _by_cell(store.records)
    for method, label in (("none", "none"), ("yarn", "yarn x2")):
        ppl = " | ".join(f"{cells[(method, L, 'perplexity')]['value']:.3f}" for L in LENGTHS)
        assert f"| {label} | {ppl} |" in report
        acc = [cells[(method, L, "passkey_accuracy")] for L in LENGTHS]
        shown = " | ".join(f"{r['value']:.0%} ({r['correct']}/1)" for r in acc)
        assert f"| {label} | {shown} |" in report
    png = out / "perplexity_vs_length.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _leftovers(out) == []


def test_rerun_computes_nothing(first_run, assets, monkeypatch):
    out, _, text = first_run

    def no_load(*args, **kwargs):
        raise AssertionError("a complete sweep must not load the model again")

    monkeypatch.setattr(sw, "load_model", no_load)
    (out / "report.md").unlink()
    store = run_sweep(_config(assets), out, plot=False)
    assert (out / "results.json").read_text(encoding="utf-8") == text
    assert store.records == json.loads(text)["records"]
    assert (out / "report.md").is_file()  # the report is regenerated from the records alone


def test_rerun_recomputes_only_missing_cells_identically(first_run, assets, tmp_path, monkeypatch):
    out, _, text = first_run
    records = json.loads(text)["records"]
    dropped = {("yarn", 256, "perplexity"), ("none", 128, "passkey_accuracy")}
    kept = [r for r in records if (r["method"], r["length"], r["metric"]) not in dropped]
    assert len(kept) == 6
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "results.json").write_text(json.dumps({"schema": 1, "records": kept}), encoding="utf-8")

    calls = {"perplexity": [], "passkey": []}
    real_ppl, real_trial = pp.score_windows, pk.run_trial

    def count_ppl(model, chosen, length, *args, **kwargs):
        calls["perplexity"].append(length)
        return real_ppl(model, chosen, length, *args, **kwargs)

    def count_trial(model, tokenizer, prompt, *args, **kwargs):
        calls["passkey"].append(len(prompt.input_ids))
        return real_trial(model, tokenizer, prompt, *args, **kwargs)

    monkeypatch.setattr(pp, "score_windows", count_ppl)
    monkeypatch.setattr(pk, "run_trial", count_trial)
    store = run_sweep(_config(assets), resumed, plot=False)

    assert len(calls["perplexity"]) == 1 and calls["perplexity"] == [256]
    assert len(calls["passkey"]) == 1
    assert json.loads(json.dumps(store.records[:6])) == kept
    before, after = _by_cell(records), _by_cell(store.records)
    assert set(after) == set(before)
    for cell in dropped:
        new, old = after[cell], before[cell]
        assert new["value"] == old["value"]  # deterministic, bit for bit
        assert new.get("nll_sum") == old.get("nll_sum")
        assert new.get("details") == old.get("details")
        assert new["cell"] == old["cell"]


def test_a_changed_setting_is_a_new_cell(first_run, assets, tmp_path):
    """A different factor is a different cell; the 'none' cells do not depend on it."""
    out, _, text = first_run
    (tmp_path / "results.json").write_text(text, encoding="utf-8")
    store = run_sweep(_config(assets, factor=4.0, metrics=("perplexity",), lengths=(128,)), tmp_path, plot=False)
    assert len(store.records) == 9
    new = store.records[-1]
    assert (new["method"], new["factor"], new["length"]) == ("yarn", 4.0, 128)


def test_passkey_accuracy_is_the_fraction_of_correct_trials(assets, tmp_path, monkeypatch):
    """With a scripted judge: of the depths 0.25, 0.5, 0.75 only 0.5 is answered correctly."""
    real_trial = pk.run_trial

    def judged(model, tokenizer, prompt, *args, **kwargs):
        trial = real_trial(model, tokenizer, prompt, max_new_tokens=1)
        answer = prompt.key if prompt.depth == 0.5 else "0"
        return {**trial, "answer": answer, "correct": answer == prompt.key}

    monkeypatch.setattr(pk, "run_trial", judged)
    config = _config(assets, methods=("none",), lengths=(128,), metrics=("passkey",), depths=(0.25, 0.5, 0.75))
    (record,) = run_sweep(config, tmp_path, plot=False).records
    assert (record["trials"], record["correct"]) == (3, 1)
    assert record["value"] == pytest.approx(1 / 3)
    assert [t["depth"] for t in record["details"]] == [0.25, 0.5, 0.75]
    assert [t["key"] for t in record["details"]] == pk.trial_keys(0, 128, [0.25, 0.5, 0.75])
    assert "| none | 33% (1/3) |" in (tmp_path / "report.md").read_text(encoding="utf-8")


def test_sweep_validates_before_loading_anything(assets, tmp_path, monkeypatch):
    def no_load(*args, **kwargs):
        raise AssertionError("an invalid sweep must not load the model")

    monkeypatch.setattr(sw, "load_model", no_load)
    with pytest.raises(rope_ntk.InvalidParameterError) as info:
        run_sweep(_config(assets, methods=("none", "nope"), lengths=(128, 32), depths=(0.5, 2.0)), tmp_path)
    message = str(info.value)
    for fragment in ("method='nope'", "length=32", "depth=2.0"):
        assert fragment in message
    assert not (tmp_path / "results.json").exists()
    assert os.listdir(tmp_path) == []
