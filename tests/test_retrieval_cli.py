"""eval/passkey.py, eval/needle.py and eval/ruler.py as a user runs them, on a
tiny saved model: help, one-line errors, results written and resumed.

One run goes through the script file; the rest call ``retrieval_cli.main``
in this process (the same code after the import), which is seconds faster."""

from __future__ import annotations

import json
import re

import pytest
from test_cli import error_line, error_lines, run_script

from rope_ntk import retrieval_cli
from rope_ntk.evaluation.ruler import DEFAULTS
from rope_ntk.methods import METHODS


def run_main(capsys, family: str, *argv: str) -> tuple[int, str, str]:
    try:
        status = retrieval_cli.main("test", family, list(argv))
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return status, captured.out, captured.err


@pytest.mark.parametrize("family", ["passkey", "needle", "ruler"])
def test_help(capsys, family):
    status, out, err = run_main(capsys, family, "--help")
    assert status == 0 and err == ""
    for name, method in METHODS.items():
        assert re.search(rf"^\s+{re.escape(name)}\s+{re.escape(method.paper)}", out, re.M), name
    for flag in ("--methods", "--factor", "--lengths", "--trials", "--scoring", "--chat-template", "--param",
                 "--out"):
        assert flag in out
    if family == "ruler":
        assert all(f"ruler:{task}" in out for task in DEFAULTS)


@pytest.mark.parametrize(
    "family, bad, fragments",
    [
        ("needle", ["--depths", "0.5,1.5"], ["depth=1.5"]),
        ("ruler", ["--tasks", "niah_single,qa"], ["qa"]),
        ("ruler", ["--tasks", "niah_multikey", "--param", "num_keys=0"], ["num_keys=0"]),
        ("ruler", ["--param", "bogus=1"], ["bogus"]),
        ("passkey", ["--scoring", "judge"], ["--scoring", "judge"]),
        ("passkey", ["--lengths", "32"], ["length=32"]),
        ("needle", ["--methods", "foo"], ["method='foo'"]),
        ("needle", ["--trials", "0"], ["trials=0"]),
    ],
)
def test_bad_arguments_are_one_error_line(tiny_assets, tmp_path, capsys, family, bad, fragments):
    model_dir, corpus = tiny_assets
    base = ["--model", str(model_dir), "--corpus", str(corpus), "--lengths", "256", "--out", str(tmp_path / "o")]
    status, _, err = run_main(capsys, family, *base, *bad)
    assert status == 2
    (line,) = error_lines(err)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (tmp_path / "o" / "results.json").exists()


def test_ruler_script_runs_resumes_and_records(tiny_assets, tmp_path, capsys):
    model_dir, corpus = tiny_assets
    out = tmp_path / "out"
    args = [
        "--model", str(model_dir), "--corpus", str(corpus), "--methods", "none,yarn", "--lengths", "256",
        "--tasks", "niah_single,variable_tracking", "--trials", "2", "--scoring", "teacher-forcing",
        "--dtype", "float32", "--out", str(out),
    ]
    done = run_script("ruler.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    records = json.loads((out / "results.json").read_text(encoding="utf-8"))["records"]
    assert sorted((r["method"], r["task"]) for r in records) == [
        ("none", "ruler:niah_single"), ("none", "ruler:variable_tracking"),
        ("yarn", "ruler:niah_single"), ("yarn", "ruler:variable_tracking"),
    ]
    for r in records:
        assert r["trials"] == 2 and r["task_params"]["scoring"] == "teacher-forcing"
        assert r["params"] == ({} if r["method"] == "none" else {"factor": 2.0})
        assert r["value"] == r["accuracy"] == sum(t["score"] for t in r["details"]) / 2
        assert r["cell"]["length"] == 256 and "ruler.py" in r["command"]
    text = (out / "results.json").read_text(encoding="utf-8")
    status, _, _ = run_main(capsys, "ruler", *args)
    assert status == 0
    assert (out / "results.json").read_text(encoding="utf-8") == text
    # a missing results file's cell only: drop one record, re-run computes it alone
    body = json.loads(text)
    body["records"] = body["records"][1:]
    (out / "results.json").write_text(json.dumps(body), encoding="utf-8")
    status, _, _ = run_main(capsys, "ruler", *args)
    assert status == 0
    redone = json.loads((out / "results.json").read_text(encoding="utf-8"))["records"]
    assert len(redone) == 4 and redone[:3] == body["records"]  # kept, not recomputed
    assert redone[3]["cell"] == records[0]["cell"] and redone[3]["details"] == records[0]["details"]


def test_passkey_grid_prints_both_summaries_and_a_heatmap(tiny_assets, tmp_path, capsys):
    model_dir, _ = tiny_assets
    out = tmp_path / "pk"
    status, stdout, err = run_main(
        capsys, "passkey", "--model", str(model_dir), "--methods", "none", "--lengths", "160,256",
        "--depths", "0,1", "--dtype", "float32", "--out", str(out),
    )
    assert status == 0, err[-3000:]
    assert "longest length >= 80%" in stdout and "largest k with >= 20%" in stdout
    records = json.loads((out / "results.json").read_text(encoding="utf-8"))["records"]
    assert [(r["length"], r["trials"], r["metric"]) for r in records] == [
        (160, 2, "passkey_accuracy"), (256, 2, "passkey_accuracy")
    ]
    assert (out / "passkey_heatmap_none.png").is_file()
    assert "## Passkey accuracy" in (out / "report.md").read_text(encoding="utf-8")


def test_chat_template_flag_reaches_the_prompt(tiny_assets, tmp_path, capsys):
    model_dir, corpus = tiny_assets
    out = tmp_path / "nd"
    status, _, err = run_main(
        capsys, "needle", "--model", str(model_dir), "--corpus", str(corpus), "--methods", "none",
        "--lengths", "300", "--depths", "0.5", "--chat-template", "--dtype", "float32", "--no-plot",
        "--out", str(out),
    )
    assert status == 0, err[-3000:]
    (record,) = json.loads((out / "results.json").read_text(encoding="utf-8"))["records"]
    assert record["task_params"]["chat_template"] is True
    assert record["details"][0]["prompt_tokens"] <= 300
