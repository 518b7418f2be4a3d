"""Nothing lost: a sweep killed with SIGKILL at random points and re-run ends
with exactly the records of an uninterrupted run, in a file that parses after
every kill, with no temp file left behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

from rope_ntk.evaluation.results import REQUIRED
from rope_ntk.evaluation.sweep import SweepConfig, run_sweep

# fields that legitimately differ between two runs of the same cell
VOLATILE = ("elapsed_s", "command")
METHODS, LENGTHS, DEPTHS = ("none", "linear", "yarn"), (128, 256), (0.25, 0.75)
CELLS = len(METHODS) * len(LENGTHS) * 2


def _args(model: Path, corpus: Path, out: Path) -> list[str]:
    return [
        "--model", str(model), "--corpus", str(corpus), "--methods", ",".join(METHODS),
        "--lengths", ",".join(map(str, LENGTHS)), "--ppl-tokens", "256", "--depths", ",".join(map(str, DEPTHS)),
        "--dtype", "float32", "--no-plot", "--out", str(out),
    ]


def _records(out: Path) -> list[dict]:
    """The records of ``out/results.json`` (none if absent); fails if the file does not parse."""
    path = out / "results.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["schema"] == 1
    for record in data["records"]:
        assert REQUIRED <= record.keys()
    return data["records"]


def _stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in records]


def _count(out: Path) -> int:
    try:
        return len(_records(out))
    except (json.JSONDecodeError, OSError):  # never expected: the assertion after the kill says so
        return -1


def test_sigkill_at_random_points_then_resume_gives_identical_results(tiny_assets, tmp_path):
    model, corpus = tiny_assets
    reference = tmp_path / "reference"
    config = SweepConfig(model=str(model), corpus=str(corpus), methods=METHODS, lengths=LENGTHS, ppl_tokens=256,
                         depths=DEPTHS, dtype="float32")
    run_sweep(config, reference, plot=False)  # uninterrupted, in this process
    expected = _stable(_records(reference))
    assert len(expected) == CELLS

    # the killed runs are forked children of this process: a real process each, SIGKILLed like any
    # other, without paying for a fresh interpreter
    out = tmp_path / "killed"
    fork = multiprocessing.get_context("fork")
    rng = random.Random(8)
    kills = []
    for _ in range(5):
        before = _count(out)
        # kill once this many more records exist, after a random fraction of a cell
        target = before + rng.randint(0, max(1, (CELLS - before) // 3))
        delay = rng.uniform(0.0, 0.12)
        child = fork.Process(target=run_sweep, args=(config, out), kwargs={"plot": False})
        child.start()
        deadline = time.monotonic() + 120
        while child.is_alive() and _count(out) < target and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        records = _records(out)  # parses after every kill
        kills.append((before, target, len(records), child.exitcode))
        assert _stable(records) == expected[: len(records)]  # the finished cells, unchanged
    # kills landed mid-sweep (after some records, before the last)
    assert sum(0 < after < CELLS for _, _, after, code in kills if code == -signal.SIGKILL) >= 2, kills

    run_sweep(config, out, plot=False)  # the re-run (the command line's resume: tests/test_cli.py)
    assert _stable(_records(out)) == expected  # identical to the uninterrupted run, bit for bit
    leftovers = sorted(p.name for p in out.iterdir() if p.name not in ("results.json", "report.md"))
    assert leftovers == [], leftovers


def test_a_second_sweep_into_the_same_folder_is_refused(tiny_assets, tmp_path, capsys):
    """Two writers would overwrite each other's records: the second one exits 2 at once."""
    import fcntl

    from test_cli import run_main

    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running sweep holds it
    try:
        model, corpus = tiny_assets
        status, line = run_main(capsys, *_args(model, corpus, out))
    finally:
        os.close(fd)
    assert status == 2
    assert f"out={str(out)!r} is being written by another running sweep" in line
    assert list(out.iterdir()) == []


def test_stale_temp_files_of_a_killed_write_are_removed(tiny_assets, tmp_path):
    """What a SIGKILL between the temp write and the rename leaves does not survive the re-run."""
    model, corpus = tiny_assets
    out = tmp_path / "out"
    out.mkdir()
    (out / ".results.json.abc123.tmp").write_text('{"schema": 1, "records": [', encoding="utf-8")
    (out / ".perplexity_vs_length.png.tmp.png").write_bytes(b"\x89PNG")
    config = SweepConfig(model=str(model), corpus=str(corpus), methods=("none",), lengths=(128,), ppl_tokens=128,
                         metrics=("perplexity",), dtype="float32")
    run_sweep(config, out, plot=False)
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json"]
