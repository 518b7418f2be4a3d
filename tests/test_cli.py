"""The eval/ scripts as a user runs them: bad input exits with status 2 and
one ``error:`` line naming the argument and the value, never a traceback.

Every run points at a tiny saved model and a small local text, so that an
argument the scripts failed to reject would cost seconds, not a real sweep."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rope_ntk.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("sweep.py", "perplexity.py")  # eval/passkey.py: test_retrieval_cli.py


def run_script(script: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(ROOT / "eval" / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def small(tiny_assets, tmp_path):
    """Arguments of a valid, seconds-long run into a fresh output directory."""
    model_dir, corpus = tiny_assets
    out = tmp_path / "out"
    args = [
        "--model", str(model_dir), "--corpus", str(corpus), "--methods", "none,yarn", "--lengths", "128",
        "--ppl-tokens", "128", "--depths", "0.5", "--dtype", "float32", "--no-plot", "--out", str(out),
    ]
    return args, out


ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_lines(stderr: str) -> list[str]:
    """``error:`` lines as a terminal shows them: progress bars redraw with \\r and
    cursor moves, so a line is split at those too (argparse prefixes the program name)."""
    segments = (ANSI.sub("\n", part).strip() for part in re.split(r"[\r\n]", stderr))
    return [s for seg in segments for s in seg.split("\n") if re.match(r"^(\S+: )?error: ", s.strip())]


def error_line(done: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a failed run."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr[-2000:]
    assert "results:" not in done.stdout
    return lines[0]


def run_main(capsys, *argv: str) -> tuple[int, str]:
    """``rope_ntk.cli.main`` in this process (argparse errors exit via SystemExit)."""
    from rope_ntk.cli import main

    try:
        status = main("test", ("perplexity", "passkey"), list(argv))
    except SystemExit as exc:
        status = exc.code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = error_lines(captured.err)
    assert len(lines) == 1, captured.err
    return status, lines[0]


# what the scripts must reject, run as a user runs them
BAD = [
    (["--methods", "foo"], ["method='foo'"]),
    (["--factor", "0"], ["factor=0"]),
    (["--factor", "nan"], ["factor=nan"]),
    (["--lengths", "0"], ["length=0"]),
    (["--lengths", "abc"], ["--lengths", "abc"]),
    (["--depths", "1.5"], ["depth=1.5"]),
    (["--metrics", "foo"], ["metrics", "foo"]),
    (["--model", "/nonexistent.gguf"], ["model='/nonexistent.gguf'"]),
    (["--model", "/nonexistent/dir"], ["model='/nonexistent/dir'"]),
    (["--corpus", "/nonexistent.txt"], ["corpus='/nonexistent.txt'"]),
]

# more values rejected before any loading: checked in-process, in milliseconds
BAD_IN_PROCESS = [
    (["--methods", "none,ntk_by_halves"], ["method='ntk_by_halves'"]),
    (["--factor", "0.5"], ["factor=0.5"]),
    (["--factor", "inf"], ["factor=inf"]),
    (["--factor", "two"], ["--factor", "two"]),
    (["--lengths", "128,-5"], ["length=-5"]),
    (["--lengths", "63"], ["length=63"]),
    (["--lengths", "4096.5"], ["--lengths", "4096.5"]),
    (["--depths", "0.5,nan"], ["depth=nan"]),
    (["--depths", "-0.1"], ["depth=-0.1"]),
    (["--depths", "x"], ["--depths", "x"]),
    (["--metrics", "perplexity,pk"], ["metrics", "pk"]),
    (["--ppl-tokens", "0"], ["ppl_tokens=0"]),
    (["--dtype", "int8"], ["--dtype", "int8"]),
    (["--bos", "maybe"], ["--bos", "maybe"]),
]


@pytest.mark.parametrize("bad, fragments", BAD, ids=[" ".join(b) for b, _ in BAD])
def test_bad_argument_is_one_error_line(small, bad, fragments):
    args, out = small
    done = run_script("sweep.py", *args, *bad)  # the later flag wins
    line = error_line(done)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not (out / "results.json").exists()


@pytest.mark.parametrize("bad, fragments", BAD_IN_PROCESS, ids=[" ".join(b) for b, _ in BAD_IN_PROCESS])
def test_bad_argument_in_process(small, capsys, monkeypatch, bad, fragments):
    import rope_ntk.evaluation.sweep as sweep

    def no_run(*args, **kwargs):
        raise AssertionError("an invalid command must not start a sweep")

    monkeypatch.setattr(sweep, "load_model", no_run)
    args, out = small
    status, line = run_main(capsys, *args, *bad)
    assert status == 2
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not out.exists()


def test_a_corrupt_results_file_is_named_and_left_alone(small):
    args, out = small
    out.mkdir()
    path = out / "results.json"
    path.write_text('{"schema": 1, "records": [', encoding="utf-8")
    done = run_script("sweep.py", *args)
    line = error_line(done)
    assert str(path) in line
    assert path.read_text(encoding="utf-8") == '{"schema": 1, "records": ['


def test_a_corpus_too_short_for_the_length_is_reported(small, tmp_path):
    args, out = small
    short = tmp_path / "short.txt"
    short.write_text("Only a handful of words here.", encoding="utf-8")
    line = error_line(run_script("sweep.py", *args, "--corpus", str(short), "--metrics", "perplexity"))
    assert "length=128" in line and "tokens" in line


def test_empty_depths_are_an_error(small, capsys):
    args, _ = small
    status, line = run_main(capsys, *args, "--depths", ",")
    assert status == 2 and "depth" in line


@pytest.mark.parametrize("flag", ["--lengths", "--methods", "--metrics"])
def test_empty_lists_are_an_error(small, capsys, flag):
    args, _ = small
    status, line = run_main(capsys, *args, flag, ",")
    assert status == 2 and flag.strip("-") in line


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_method(script):
    done = run_script(script, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    for name, method in METHODS.items():
        assert re.search(rf"^\s+{re.escape(name)}\s+{re.escape(method.paper)}", done.stdout, re.M), name
    for flag in ("--methods", "--factor", "--lengths", "--metrics", "--depths", "--out", "--quick"):
        assert flag in done.stdout


def test_a_small_sweep_runs_resumes_and_reports(small):
    args, out = small
    done = run_script("sweep.py", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    records = json.loads((out / "results.json").read_text(encoding="utf-8"))["records"]
    assert sorted((r["method"], r["metric"]) for r in records) == [
        ("none", "passkey_accuracy"), ("none", "perplexity"), ("yarn", "passkey_accuracy"), ("yarn", "perplexity"),
    ]
    # the exact command is recorded: the script and every argument
    command = records[0]["command"]
    assert "eval/sweep.py" in command or "eval" + os.sep + "sweep.py" in command
    assert " ".join(args) in command
    assert "| none |" in done.stdout and "| yarn x2 |" in done.stdout
    assert f"results: {out}/results.json" in done.stdout

    text = (out / "results.json").read_text(encoding="utf-8")
    again = run_script("sweep.py", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "all cells already in" in again.stderr
    assert (out / "results.json").read_text(encoding="utf-8") == text

    (out / "report.md").unlink()
    report = run_script("report.py", str(out))
    assert report.returncode == 0, report.stderr
    regenerated = (out / "report.md").read_text(encoding="utf-8")
    assert "## Perplexity (lower is better)" in regenerated and "## Passkey accuracy" in regenerated
    assert (out / "perplexity_vs_length.png").is_file()


def test_report_without_results_is_an_error(tmp_path):
    line = error_line(run_script("report.py", str(tmp_path)))
    assert str(tmp_path) in line


def test_abbreviated_quick_is_refused():
    done = run_script("sweep.py", "--quic")
    assert done.returncode == 2 and "--quic" in done.stderr


def test_nan_factor_is_refused_even_for_none(small, capsys):
    args, _ = small
    status, line = run_main(capsys, *args, "--methods", "none", "--factor", "nan")
    assert status == 2 and "factor=nan" in line
