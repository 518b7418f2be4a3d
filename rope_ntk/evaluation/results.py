"""Results store: one JSON file, rewritten atomically after every cell.

``results.json`` holds ``{"schema": 1, "records": [...]}``. Each record is
self-describing: method and parameters, length, metric, value, the tokens or
trials behind it, and the run context (model, corpus, dtype, seed, command,
versions). A record's ``cell`` (everything that determines its value) is its
identity: a re-run skips cells already present, so an interrupted sweep
resumes where it stopped, and a crash mid-write leaves the previous file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..errors import InvalidParameterError

logger = logging.getLogger(__name__)

SCHEMA = 1
REQUIRED = frozenset({"cell", "method", "length", "metric", "value"})


def versions() -> dict[str, str]:
    import torch
    import transformers

    from .. import __version__

    return {
        "rope_ntk": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def cell_key(cell: dict[str, Any]) -> str:
    return json.dumps(cell, sort_keys=True, separators=(",", ":"))


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked_dir(path: Path) -> Iterator[Path]:
    """Hold an exclusive lock on the folder ``path`` (created if missing) while writing into it.

    The lock is ``flock`` on the folder itself, so no lock file is left
    behind and the kernel releases it when the process dies, even by
    SIGKILL. Under it, temp files a killed writer left (``.NAME.*.tmp``
    of ``atomic_write_text``, ``.NAME.tmp.png`` of the plot) are removed. A folder this call created and
    that is still empty at the end (a run that failed before its first
    record) is removed again.
    """
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no lock, as before
        fcntl = None
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InvalidParameterError(
                    f"out={str(path)!r} is being written by another running sweep or suite; wait for it to finish "
                    "or give another output folder."
                ) from None
        for stale in [*path.glob(".*.tmp"), *path.glob(".*.tmp.png")]:  # see atomic_write_text, report.plot
            logger.info("removing %s, left by an interrupted write", stale)
            stale.unlink(missing_ok=True)
        yield path
    finally:
        os.close(fd)
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


class ResultsStore:
    """Records of one output directory's ``results.json``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.exists():
            where = f"results file {str(self.path)!r}"
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{where} is not valid UTF-8 JSON ({exc}); move it away.") from None
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                raise ValueError(f"{where} is not a rope_ntk schema-{SCHEMA} results file.")
            records = data.get("records", [])
            bad = [
                i
                for i, r in enumerate(records if isinstance(records, list) else [])
                if not (isinstance(r, dict) and isinstance(r.get("cell"), dict) and REQUIRED <= r.keys())
            ]
            if not isinstance(records, list) or bad:
                detail = "records is not a list" if not isinstance(records, list) else f"record(s) {bad[:5]} malformed"
                raise ValueError(f"{where}: {detail} (each needs {sorted(REQUIRED)}); move it away.")
            self.records = records
        self._keys = {cell_key(r["cell"]) for r in self.records}

    def has(self, cell: dict[str, Any]) -> bool:
        return cell_key(cell) in self._keys

    def add(self, record: dict[str, Any]) -> None:
        """Append one record (must carry ``cell``) and persist atomically."""
        self.records.append(record)
        self._keys.add(cell_key(record["cell"]))
        body = {"schema": SCHEMA, "records": self.records}
        # allow_nan=False: a NaN would make the file unreadable to strict parsers
        atomic_write_text(self.path, json.dumps(body, indent=1, allow_nan=False) + "\n")


def command_line() -> str:
    return " ".join([Path(sys.executable).name, *sys.argv])
