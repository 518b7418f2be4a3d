"""Atomic, rotating checkpoints of a run (model, optimizer, scheduler, RNG, step).

A checkpoint is written by ``accelerator.save_state`` into
``checkpoint-NNNNNN.tmp`` and renamed to ``checkpoint-NNNNNN`` only once
every process has finished writing, so a crash leaves either the previous
complete checkpoint or the new one, never half of one. Only complete
directories are ever resumed from; stale ``.tmp`` directories are removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories of ``out_dir``, oldest first."""
    out = Path(out_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def latest(out_dir: str | Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def save(accelerator, out_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint ``step`` atomically and keep the newest ``keep``."""
    out = Path(out_dir)
    final = out / f"checkpoint-{step:06d}"
    tmp = out / f"checkpoint-{step:06d}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_json(tmp / STATE_FILE, {**state, "step": step})
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. end of a resumed run)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(out)
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
        for stale in out.glob("checkpoint-*.tmp"):
            shutil.rmtree(stale)
    accelerator.wait_for_everyone()
    return final


def load(accelerator, directory: str | Path) -> dict[str, Any]:
    """Restore the accelerator's registered state; return the trainer state."""
    accelerator.load_state(str(directory))
    return json.loads((Path(directory) / STATE_FILE).read_text())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".part")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
