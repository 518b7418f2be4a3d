"""Results store: one JSON file, rewritten atomically after every cell.

``results.json`` holds ``{"schema": 1, "records": [...]}``. Each record is
self-describing: method and parameters, length, metric, value, the tokens or
trials behind it, and the run context (model, corpus, dtype, seed, command,
versions). A record's ``cell`` (everything that determines its value) is its
identity: a re-run skips cells already present, so an interrupted sweep
resumes where it stopped, and a crash mid-write leaves the previous file.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

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
