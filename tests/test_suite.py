"""The suite runner: spec checking, grid expansion, cell-by-cell resume, and
parity with the classic sweep, on a tiny saved model and a local text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from evalkit import reference_nll

import rope_ntk
from rope_ntk.evaluation import compare as cp
from rope_ntk.evaluation import passkey as pk
from rope_ntk.evaluation import perplexity as pp
from rope_ntk.evaluation import suite as st
from rope_ntk.evaluation import tasks as tk
from rope_ntk.evaluation.sweep import DEFAULT_METHODS, SweepConfig, run_sweep

ROOT = Path(__file__).resolve().parent.parent


def _spec(**overrides) -> dict:
    spec = {
        "model": "bundled",
        "lengths": [128, 256],
        "methods": ["none", {"method": "yarn", "factor": [2, 4]}],
        "tasks": [{"task": "perplexity", "tokens": 256}, {"task": "passkey", "depths": [0.5]}],
    }
    return {**spec, **overrides}


# ---------------------------------------------------------------- parsing and expansion


def test_grid_expands_list_values_to_one_variant_each():
    suite = st.parse_spec(_spec(methods=[{"method": "yarn", "factor": [2, 4], "beta_fast": [16, 32]}]))
    combos = [(v.params["factor"], v.params["beta_fast"]) for v in suite.methods]
    assert combos == [(2, 16), (2, 32), (4, 16), (4, 32)]
    for v in suite.methods:  # complete with defaults: the cell identity
        assert v.resolved == rope_ntk.validate_params("yarn", v.params)
    assert len(suite.cells()) == 4 * 2 * 2
    assert {(m.label, n, t.name) for m, n, t in suite.cells()} == {
        (f"yarn factor={f} beta_fast={b}", n, t) for f in (2, 4) for b in (16, 32) for n in (128, 256)
        for t in ("perplexity", "passkey")
    }


def test_a_list_valued_parameter_expands_only_from_a_list_of_lists():
    one = st.parse_spec(_spec(tasks=[{"task": "passkey", "depths": [0.25, 0.75]}]))
    assert [t.resolved["depths"] for t in one.tasks] == [[0.25, 0.75]]
    two = st.parse_spec(_spec(tasks=[{"task": "passkey", "depths": [[0.25], [0.75]]}]))
    assert [t.resolved["depths"] for t in two.tasks] == [[0.25], [0.75]]
    grid = st.parse_spec(_spec(tasks=[{"task": "perplexity", "tokens": [128, 512]}]))
    assert [t.resolved["tokens"] for t in grid.tasks] == [128, 512]
    assert grid.tasks[0].resolved == {**pp.PERPLEXITY_DEFAULTS, "tokens": 128}


def test_defaults_and_cells_of_the_shipped_specs():
    default = st.parse_spec(st.load_spec(ROOT / "eval/specs/default.yaml"))
    sweep = SweepConfig()
    assert tuple(m.name for m in default.methods) == DEFAULT_METHODS
    assert all(m.params == sweep.method_params(m.name) for m in default.methods)
    assert tuple(default.lengths) == sweep.lengths
    assert (default.model, default.corpus, default.dtype, default.seed) == (
        sweep.model, sweep.corpus, sweep.dtype, sweep.seed)
    ppl, passkey = default.tasks
    assert (ppl.resolved["tokens"], ppl.resolved["bos"]) == (sweep.ppl_tokens, sweep.bos)
    assert passkey.resolved["depths"] == list(sweep.depths)
    quick = st.parse_spec(st.load_spec(ROOT / "eval/specs/quick.yaml"))
    assert len(quick.cells()) == 3 * 2 * 2


def test_json_and_yaml_specs_read_alike(tmp_path):
    spec = _spec()
    (tmp_path / "s.json").write_text(json.dumps(spec), encoding="utf-8")
    yaml_text = (
        "model: bundled\nlengths: [128, 256]\nmethods:\n  - none\n  - {method: yarn, factor: [2, 4]}\n"
        "tasks:\n  - {task: perplexity, tokens: 256}\n  - {task: passkey, depths: [0.5]}\n"
    )
    (tmp_path / "s.yaml").write_text(yaml_text, encoding="utf-8")
    assert st.load_spec(tmp_path / "s.json") == st.load_spec(tmp_path / "s.yaml") == spec


@pytest.mark.parametrize(
    "name, body, fragments",
    [
        ("s.json", "{not json", ["s.json", "could not be parsed"]),
        ("s.yaml", "methods: [none,\n", ["s.yaml", "could not be parsed"]),
        ("s.json", "[1, 2]", ["s.json", "mapping"]),
        ("s.toml", "a = 1", ["s.toml", ".yaml, .yml or .json"]),
    ],
)
def test_unreadable_specs_name_the_file(tmp_path, name, body, fragments):
    (tmp_path / name).write_text(body, encoding="utf-8")
    with pytest.raises(rope_ntk.InvalidParameterError) as info:
        st.load_spec(tmp_path / name)
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize(
    "overrides, fragments",
    [
        ({"dtyp": "bf16"}, ["dtyp='bf16' is not a spec key", "valid keys: model, dtype"]),
        ({"dtype": "bf16"}, ["dtype='bf16'", "bfloat16"]),
        ({"lengths": [128, 1]}, ["lengths[1]=1", ">= 2"]),
        ({"lengths": []}, ["lengths=[]", "non-empty"]),
        ({"seed": -1}, ["seed=-1"]),
        ({"methods": ["none", {"method": "nope"}]}, ["methods[1].method", "method='nope'", "valid methods: none"]),
        ({"methods": [{"method": "yarn", "factor": [2, 0.5]}]}, ["methods[0]", "factor=0.5", ">= 1"]),
        ({"methods": [{"method": "yarn", "factr": 2}]}, ["methods[0]", "factr=2", "valid: factor"]),
        ({"methods": [{"factor": 2}]}, ["methods[0]={'factor': 2}", "'method' key"]),
        ({"methods": ["none", "none"]}, ["methods lists the same method"]),
        ({"tasks": ["needle-x"]}, ["tasks[0].task", "task='needle-x'", "valid tasks: perplexity, passkey"]),
        ({"tasks": [{"task": "perplexity", "tokenz": 3}]}, ["tasks[0].tokenz=3", "valid: protocol, stride, tokens"]),
        ({"tasks": [{"task": "passkey", "depths": [1.5]}]}, ["tasks[0]", "depth=1.5", "[0, 1]"]),
        ({"tasks": [{"task": "perplexity", "protocol": "strided"}]}, ["protocol='strided'", "disjoint", "sliding", "truncate"]),
        ({"tasks": [{"task": "perplexity", "bos": "maybe"}]}, ["bos='maybe'", "auto, always, never"]),
    ],
)
def test_bad_specs_name_key_value_and_what_is_valid(overrides, fragments):
    with pytest.raises(rope_ntk.InvalidParameterError) as info:
        st.parse_spec(_spec(**overrides))
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_every_problem_is_reported_at_once():
    bad = _spec(dtyp=1, lengths=[0], methods=[{"method": "nope"}], tasks=["nope"])
    with pytest.raises(rope_ntk.InvalidParameterError) as info:
        st.parse_spec(bad)
    message = str(info.value)
    assert all(f in message for f in ("dtyp=1", "lengths[0]=0", "methods[0].method", "tasks[0].task"))


# ---------------------------------------------------------------- running on a tiny model


def _tiny(tiny_assets, **overrides) -> dict:
    model_dir, corpus = tiny_assets
    return _spec(model=str(model_dir), corpus=str(corpus), dtype="float32", **overrides)


@pytest.fixture(scope="module")
def first_run(tiny_assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("suite-out")
    store = st.run_suite(st.parse_spec(_tiny(tiny_assets)), out, plot=False)
    return out, store, (out / "results.json").read_text(encoding="utf-8")


def _by_cell(records):
    return {(r["label"], r["length"], r["task"]): r for r in records}


def test_one_record_per_cell_carrying_what_reproduces_it(first_run, tiny_assets):
    out, store, text = first_run
    records = json.loads(text)["records"]
    assert len(records) == 12 and len(_by_cell(records)) == 12
    model_dir, corpus = tiny_assets
    for r in records:
        assert r["cell"] == {k: r[k] for k in r["cell"]}
        assert r["model"] == str(model_dir) and r["dtype"] == "float32" and r["seed"] == 0
        assert r["corpus"] == {"source": str(corpus), "split": "test", "text_field": "text"}
        assert r["corpus_identity"]["documents"] == 1
        assert r["model_identity"]["class"] == "LlamaForCausalLM"
        assert r["versions"]["rope_ntk"] == rope_ntk.__version__
        assert r["rope"]["method"] == r["method"]
        assert r["value"] == r["metrics"][r["metric"]]
        assert r["params"] == rope_ntk.validate_params(r["method"], r["method_args"])
        if r["task"] == "perplexity":
            assert r["task_params"] == {**pp.PERPLEXITY_DEFAULTS, "tokens": 256}
            assert r["metrics"]["tokens"] == pp.windows_for(r["length"], 256) * (r["length"] - 1)
        else:
            (trial,) = r["metrics"]["details"]
            assert trial["key"] == pk.trial_keys(0, r["length"], [0.5])[0]
            assert r["metrics"]["by_depth"] == [{"depth": 0.5, "accuracy": float(trial["correct"]), "trials": 1}]


def test_perplexity_cells_match_an_independent_computation(first_run, tiny_assets):
    _, store, _ = first_run
    model_dir, corpus = tiny_assets
    model, tokenizer = rope_ntk.load_model(str(model_dir), dtype="float32")
    stream = tokenizer(corpus.read_text(encoding="utf-8"), add_special_tokens=False).input_ids
    cells = _by_cell(store.records)
    for length in (128, 256):
        spans = [stream[k * (length - 1): k * (length - 1) + length] for k in range(pp.windows_for(length, 256))]
        plain = sum(reference_nll(model, w) for w in spans)
        with rope_ntk.patch(model, "yarn", factor=4):
            scaled = sum(reference_nll(model, w) for w in spans)
        assert cells[("none", length, "perplexity")]["metrics"]["nll_sum"] == pytest.approx(plain, rel=1e-5)
        assert cells[("yarn factor=4", length, "perplexity")]["metrics"]["nll_sum"] == pytest.approx(scaled, rel=1e-5)
        assert scaled != pytest.approx(plain, rel=1e-4)


def test_suite_numbers_equal_the_classic_sweep(tiny_assets, tmp_path, first_run):
    """The suite's perplexity and passkey tasks reproduce the sweep's cells bit for bit."""
    _, store, _ = first_run
    model_dir, corpus = tiny_assets
    config = SweepConfig(model=str(model_dir), corpus=str(corpus), methods=("none", "yarn"), factor=4.0,
                         lengths=(128, 256), ppl_tokens=256, depths=(0.5,), dtype="float32")
    swept = {(r["method"], r["length"], r["metric"]): r for r in run_sweep(config, tmp_path, plot=False).records}
    cells = _by_cell(store.records)
    for method, label in (("none", "none"), ("yarn", "yarn factor=4")):
        for length in (128, 256):
            assert cells[(label, length, "perplexity")]["value"] == swept[(method, length, "perplexity")]["value"]
            # the suite's trials also carry the task-generic "score" (the recall, 1.0 or 0.0 here)
            suite_trials = cells[(label, length, "passkey")]["metrics"]["details"]
            assert all(t.pop("score") == float(t["correct"]) for t in suite_trials)
            assert suite_trials == swept[(method, length, "passkey_accuracy")]["details"]
    # compare lines the sweep's records up with their suite equivalents
    matched = cp.compare(list(swept.values()), store.records)
    assert len(matched.matched) == 8 and matched.only_a == []
    assert {r["label"] for r in matched.only_b} == {"yarn factor=2"}
    assert all(a["value"] == b["value"] for a, b in matched.matched)


def _counting(monkeypatch) -> list[tuple[str, int]]:
    """Record (task, length) of every task run, through the real task functions."""
    calls = []
    for name, task in list(tk.TASKS.items()):
        def run(model, tokenizer, corpus, length, params, *, seed, progress=None, _task=task):
            calls.append((_task.name, length))
            return _task.run(model, tokenizer, corpus, length, params, seed=seed, progress=progress)

        monkeypatch.setitem(tk.TASKS, name, tk.Task(task.name, task.defaults, task.validate, run, task.headline))
    return calls


def test_rerun_computes_no_cell_and_loads_no_model(first_run, tiny_assets, monkeypatch):
    out, _, text = first_run

    def no_load(*args, **kwargs):
        raise AssertionError("a complete suite must not load the model")

    monkeypatch.setattr(st, "load_model", no_load)
    calls = _counting(monkeypatch)
    (out / "report.md").unlink()
    st.run_suite(st.parse_spec(_tiny(tiny_assets)), out, plot=False)
    assert calls == []
    assert (out / "results.json").read_text(encoding="utf-8") == text
    assert (out / "report.md").is_file()


def test_a_changed_parameter_recomputes_only_the_cells_it_touches(first_run, tiny_assets, tmp_path, monkeypatch):
    _, _, text = first_run
    (tmp_path / "results.json").write_text(text, encoding="utf-8")
    calls = _counting(monkeypatch)
    # factor 4 -> 8: the 'none' and factor-2 cells stay, the factor-8 ones are new
    spec = _tiny(tiny_assets, methods=["none", {"method": "yarn", "factor": [2, 8]}])
    store = st.run_suite(st.parse_spec(spec), tmp_path, plot=False)
    assert sorted(calls) == sorted((t, n) for t in ("perplexity", "passkey") for n in (128, 256))
    assert [r["label"] for r in store.records[12:]] == ["yarn factor=8"] * 4
    calls.clear()
    # the perplexity task's tokens change: only perplexity cells, for every method
    spec = _tiny(tiny_assets, tasks=[{"task": "perplexity", "tokens": 300}, {"task": "passkey", "depths": [0.5]}])
    store = st.run_suite(st.parse_spec(spec), tmp_path, plot=False)
    assert sorted(calls) == sorted(("perplexity", n) for n in (128, 256) for _ in range(3))
    assert len(store.records) == 16 + 6


def test_cli_dry_run_and_bad_spec(tiny_assets, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_tiny(tiny_assets)), encoding="utf-8")
    env_run = dict(cwd=ROOT, capture_output=True, text=True, timeout=120)
    done = subprocess.run([sys.executable, "eval/suite.py", str(spec), "--out", str(tmp_path / "o"), "--dry-run"],
                          **env_run)
    assert done.returncode == 0, done.stderr
    assert "12 cell(s), 12 to compute" in done.stdout
    assert not (tmp_path / "o").exists()
    spec.write_text(json.dumps(_tiny(tiny_assets, lengths=[128, "x"])), encoding="utf-8")
    bad = subprocess.run([sys.executable, "eval/suite.py", str(spec), "--out", str(tmp_path / "o")], **env_run)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        "error: invalid suite spec: lengths[1]='x' must be a whole number of tokens >= 2."
    ]


def test_non_finite_metrics_become_null():
    assert st._finite({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {"a": None, "b": [1.0, None], "c": "x"}


def test_any_registered_task_runs_and_reports(tiny_assets, tmp_path, monkeypatch):
    """A task registered at run time (one cell per depth) goes through spec checking,
    the runner and the report's depth heatmap like the built-in ones."""

    def validate(params):
        p = {"depth": 0.5, **params}
        if not 0 <= p["depth"] <= 1:
            raise rope_ntk.InvalidParameterError(f"depth={p['depth']!r} must be in [0, 1].")
        return p

    def run(model, tokenizer, corpus, length, params, *, seed, progress=None):
        return {"recall": 1.0 - params["depth"], "length_seen": length, "seed": seed}

    monkeypatch.setitem(tk.TASKS, "echo", tk.Task("echo", {"depth": 0.5}, validate, run, "recall"))
    with pytest.raises(rope_ntk.InvalidParameterError, match=r"tasks\[0\]: depth=2"):
        st.parse_spec(_tiny(tiny_assets, tasks=[{"task": "echo", "depth": 2}]))
    suite = st.parse_spec(_tiny(tiny_assets, methods=["none"], tasks=[{"task": "echo", "depth": [0.25, 1.0]}]))
    store = st.run_suite(suite, tmp_path, plot=True)
    assert [(r["length"], r["task_params"]["depth"], r["value"]) for r in store.records] == [
        (128, 0.25, 0.75), (128, 1.0, 0.0), (256, 0.25, 0.75), (256, 1.0, 0.0)]
    report = (tmp_path / "report.md").read_text(encoding="utf-8")
    assert "## echo: recall" in report and "| none | 38% | 38% |" in report  # mean over the two depths
    assert (tmp_path / "echo_depth_heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_a_folder_being_written_is_refused_and_a_wrong_rope_stops_before_any_record(tiny_assets, tmp_path, monkeypatch):
    """Like the sweep: one writer per output folder, and each method's RoPE is
    verified before its cells are computed."""
    from rope_ntk.evaluation.results import locked_dir

    out = tmp_path / "out"
    with locked_dir(out):
        with pytest.raises(rope_ntk.InvalidParameterError, match="being written by another running sweep or suite"):
            st.run_suite(st.parse_spec(_tiny(tiny_assets)), out, plot=False)

    def mismatch(model, *args, **kwargs):
        raise rope_ntk.RopeMismatchError("inv_freq of model.rotary_emb differs from the configured method")

    monkeypatch.setattr(st, "verify", mismatch)
    with pytest.raises(rope_ntk.RopeMismatchError):
        st.run_suite(st.parse_spec(_tiny(tiny_assets)), tmp_path / "out2", plot=False)
    assert not (tmp_path / "out2" / "results.json").exists()
