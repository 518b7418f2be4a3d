"""The suite runner: a spec of methods x parameters x lengths x tasks.

A spec (YAML or JSON; see docs/suite.md) names a model, a corpus, a list of
methods whose list-valued parameters expand to a grid, the context lengths
and the tasks::

    model: bundled
    dtype: bfloat16
    lengths: [2048, 4096]
    methods: [none, {method: yarn, factor: [2, 4]}]   # 3 variants
    tasks: [perplexity, {task: passkey, depths: [0.5]}]

Every (method variant, length, task variant) is a cell. The whole spec is
checked before anything loads (one error listing every problem by its key
path). Cells already in ``OUT/results.json`` are skipped, so a re-run
computes only what is missing and a changed parameter only the cells it
touches; each finished cell is written at once (atomic rewrite).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

from .. import patching
from ..data import load_corpus
from ..errors import InvalidParameterError, RopeNtkError
from ..loading import DTYPES, load_model
from ..methods import get_method, validate_params
from ..verify import verify
from . import tasks as task_registry
from .report import _fmt, write_report
from .results import ResultsStore, command_line, locked_dir, versions

logger = logging.getLogger(__name__)

SPEC_KEYS = {
    "model": "'bundled', a directory, a .gguf file or a hub id",
    "dtype": f"model weights dtype: {', '.join(DTYPES)}",
    "device": "torch device, e.g. cpu or cuda",
    "corpus": "'bundled', a .txt/.jsonl/.json file, a datasets name, or null for none",
    "corpus_split": "split of a datasets corpus",
    "text_field": "text field of .jsonl/.json/datasets corpora",
    "methods": "list of method names or {method: NAME, PARAM: value or [grid values]}",
    "lengths": "list of context lengths in tokens",
    "tasks": "list of task names or {task: NAME, PARAM: value or [grid values]}",
    "seed": "integer seed (torch, passkeys, document choice)",
    "out": "output directory (the command line's --out wins)",
}
DEFAULTS = {"model": "bundled", "dtype": "bfloat16", "device": "cpu", "corpus": "bundled",
            "corpus_split": "test", "text_field": "text", "seed": 0, "out": None}


@dataclass(frozen=True, eq=False)  # hashed by identity: params are dicts
class Variant:
    """One method (or task) with one value per parameter."""

    name: str
    params: dict  # as the user wrote them (what patch() / run() receive)
    resolved: dict  # validated, complete with defaults (the cell identity)

    @property
    def label(self) -> str:
        shown = " ".join(f"{k}={_fmt(v)}" for k, v in self.params.items())
        return f"{self.name} {shown}".strip()


@dataclass
class Suite:
    model: str
    dtype: str
    device: str
    corpus: str | None
    corpus_split: str
    text_field: str
    seed: int
    out: str | None
    lengths: list[int]
    methods: list[Variant]
    tasks: list[Variant]
    spec: dict = field(default_factory=dict)

    def cells(self) -> list[tuple[Variant, int, Variant]]:
        """Every (method, length, task), grouped by method so each is patched once."""
        return [(m, n, t) for m in self.methods for n in self.lengths for t in self.tasks]

    def corpus_id(self) -> dict | None:
        if self.corpus is None:
            return None
        return {"source": self.corpus, "split": self.corpus_split, "text_field": self.text_field}

    def cell(self, method: Variant, length: int, task: Variant) -> dict[str, Any]:
        """What determines one record's numbers: its identity in the store."""
        cell = {
            "model": self.model,
            "dtype": self.dtype,
            "corpus": self.corpus_id(),
            "method": method.name,
            "params": method.resolved,
            "length": length,
            "task": task.name,
            "task_params": task.resolved,
            "seed": self.seed,
        }
        if get_method(method.name).dynamic or method.name == "longrope":
            cell["cache_consistent"] = True  # the default since issue 4 (see sweep.py)
        return cell


# ---------------------------------------------------------------- loading and validation


def load_spec(path: str | Path) -> dict:
    """Read a ``.yaml``/``.yml``/``.json`` spec file into a dict."""
    path = Path(path)
    if not path.is_file():
        raise InvalidParameterError(f"spec={str(path)!r}: no such file.")
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise InvalidParameterError(f"spec={str(path)!r} must end in .yaml, .yml or .json.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidParameterError(f"spec={str(path)!r} could not be parsed: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidParameterError(f"spec={str(path)!r} must hold a mapping of keys ({', '.join(SPEC_KEYS)}).")
    return data


def _grid(params: dict, is_list_param) -> list[dict]:
    """Expand list values to a grid; a parameter whose value is itself a
    list (``is_list_param``) expands only when given a list of lists."""
    axes = []
    for key, value in params.items():
        expand = isinstance(value, list) and (
            not is_list_param(key) or (value and all(isinstance(v, list) for v in value))
        )
        axes.append([(key, v) for v in value] if expand else [(key, value)])
    return [dict(combo) for combo in itertools.product(*axes)]


def _entries(spec: dict, key: str, name_key: str, problems: list[str]) -> list[tuple[str, str, dict]]:
    """(path, name, params) of each entry of ``spec[key]``."""
    value = spec.get(key)
    if not isinstance(value, list) or not value:
        problems.append(f"{key}={value!r} must be a non-empty list ({SPEC_KEYS[key]})")
        return []
    out = []
    for i, entry in enumerate(value):
        path = f"{key}[{i}]"
        if isinstance(entry, str):
            out.append((path, entry, {}))
        elif isinstance(entry, dict) and name_key in entry:
            params = {k: v for k, v in entry.items() if k != name_key}
            out.append((path, entry[name_key], params))
        else:
            problems.append(f"{path}={entry!r} must be a name or a mapping with a {name_key!r} key")
    return out


def _methods(spec: dict, problems: list[str]) -> list[Variant]:
    variants = []
    for path, name, params in _entries(spec, "methods", "method", problems):
        try:
            method = get_method(name)
        except InvalidParameterError as exc:
            problems.append(f"{path}.method: {str(exc).rstrip('.')}")
            continue

        def is_list(key, method=method):
            spec_ = method.param(key)
            return spec_ is not None and spec_.kind == "floats"

        for i, combo in enumerate(_grid(params, is_list)):
            try:
                resolved = validate_params(method, combo)
            except InvalidParameterError as exc:
                problems.append(f"{path}: {str(exc).rstrip('.')}")
                break  # one message per entry: the other grid points share the problem
            variants.append(Variant(method.name, combo, resolved))
    return variants


def _tasks(spec: dict, problems: list[str]) -> list[Variant]:
    variants = []
    for path, name, params in _entries(spec, "tasks", "task", problems):
        try:
            task = task_registry.get_task(name)
        except InvalidParameterError as exc:
            problems.append(f"{path}.task: {str(exc).rstrip('.')}")
            continue
        unknown = [k for k in params if k not in task.defaults]
        if unknown:
            valid = ", ".join(task.defaults) or "none"
            problems += [f"{path}.{k}={params[k]!r} is not a parameter of task {name!r} (valid: {valid})" for k in unknown]
            continue

        def is_list(key, task=task):
            return isinstance(task.defaults.get(key), (list, tuple))

        for combo in _grid(params, is_list):
            try:
                resolved = task.validate(dict(combo))
            except InvalidParameterError as exc:
                problems.append(f"{path}: {str(exc).rstrip('.')}")
                break
            variants.append(Variant(task.name, combo, resolved))
    return variants


def _check_scalars(spec: dict, problems: list[str]) -> None:
    for key in ("model", "device", "corpus_split", "text_field"):
        if key in spec and not (isinstance(spec[key], str) and spec[key]):
            problems.append(f"{key}={spec[key]!r} must be a non-empty string ({SPEC_KEYS[key]})")
    if "corpus" in spec and spec["corpus"] is not None and not (isinstance(spec["corpus"], str) and spec["corpus"]):
        problems.append(f"corpus={spec['corpus']!r} must be a non-empty string or null ({SPEC_KEYS['corpus']})")
    if "out" in spec and spec["out"] is not None and not isinstance(spec["out"], str):
        problems.append(f"out={spec['out']!r} must be a string (a directory)")
    if "dtype" in spec and spec["dtype"] not in DTYPES:
        problems.append(f"dtype={spec['dtype']!r} is not valid; valid: {', '.join(DTYPES)}")
    seed = spec.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r} must be a whole number >= 0")
    lengths = spec.get("lengths")
    if not isinstance(lengths, list) or not lengths:
        problems.append(f"lengths={lengths!r} must be a non-empty list ({SPEC_KEYS['lengths']})")
    else:
        for i, n in enumerate(lengths):
            if isinstance(n, bool) or not isinstance(n, int) or n < 2:
                problems.append(f"lengths[{i}]={n!r} must be a whole number of tokens >= 2")
        if len(set(map(str, lengths))) != len(lengths):
            problems.append(f"lengths={lengths!r} repeats a length")


def parse_spec(spec: dict, out: str | None = None) -> Suite:
    """Check every key of ``spec`` and expand its grids; raise one
    ``InvalidParameterError`` listing every problem by key path."""
    if not isinstance(spec, dict):
        raise InvalidParameterError(f"spec={spec!r} must be a mapping of keys ({', '.join(SPEC_KEYS)}).")
    problems = [
        f"{key}={spec[key]!r} is not a spec key; valid keys: {', '.join(SPEC_KEYS)}" for key in spec if key not in SPEC_KEYS
    ]
    _check_scalars(spec, problems)
    methods, tasks = _methods(spec, problems), _tasks(spec, problems)
    for kind, variants in (("methods", methods), ("tasks", tasks)):
        seen = [json.dumps([v.name, v.resolved], sort_keys=True) for v in variants]
        if len(set(seen)) != len(seen):
            problems.append(f"{kind} lists the same {kind[:-1]} with the same parameters twice")
    if problems:
        raise InvalidParameterError("invalid suite spec: " + "; ".join(dict.fromkeys(problems)) + ".")
    s = {**DEFAULTS, **spec}
    return Suite(
        model=s["model"], dtype=s["dtype"], device=s["device"], corpus=s["corpus"], corpus_split=s["corpus_split"],
        text_field=s["text_field"], seed=s["seed"], out=out or s["out"], lengths=list(s["lengths"]),
        methods=methods, tasks=tasks, spec=spec,
    )


# ---------------------------------------------------------------- running


def corpus_fingerprint(documents: list[str] | None) -> dict | None:
    if documents is None:
        return None
    digest = hashlib.sha256()
    for doc in documents:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\0")
    return {"documents": len(documents), "characters": sum(map(len, documents)), "sha256": digest.hexdigest()}


def model_identity(model) -> dict:
    config = model.config
    return {
        "class": type(model).__name__,
        "name_or_path": getattr(config, "_name_or_path", None),
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
    }


def plan(suite: Suite, store: ResultsStore) -> list[tuple[Variant, int, Variant]]:
    """The cells of ``suite`` not yet in ``store``."""
    return [c for c in suite.cells() if not store.has(suite.cell(*c))]


def run_suite(suite: Suite, out_dir: str | Path | None = None, plot: bool = True) -> ResultsStore:
    """Compute every missing cell of ``suite``, writing each record as it finishes."""
    out = Path(out_dir or suite.out or "runs/suite")
    with locked_dir(out):  # one writer per folder; temp files of a killed run are cleaned
        return _run_locked(suite, out, plot)


def _run_locked(suite: Suite, out: Path, plot: bool) -> ResultsStore:
    store = ResultsStore(out / "results.json")
    todo = plan(suite, store)
    total = len(suite.cells())
    logger.info("%d cell(s) to compute, %d already in %s", len(todo), total - len(todo), store.path)
    if todo:
        model, tokenizer = load_model(suite.model, dtype=suite.dtype, device=suite.device)
        corpus = None
        if suite.corpus is not None:
            corpus = load_corpus(suite.corpus, split=suite.corpus_split, text_field=suite.text_field)
        context = {
            "model_identity": model_identity(model),
            "corpus_identity": corpus_fingerprint(corpus),
            "versions": versions(),
            "command": command_line(),
            "spec": suite.spec,
        }
        with tqdm(total=len(todo), desc="cells", unit="cell", position=0) as bar:
            for method in dict.fromkeys(m for m, _, _ in todo):
                with patching.patch(model, method.name, **method.params), torch.inference_mode():
                    verify(model)  # no numbers from a RoPE other than the one recorded: RopeMismatchError
                    rope = patching.describe(model)[0]
                    for cell in (c for c in todo if c[0] is method):
                        bar.set_postfix_str(f"{method.label} L={cell[1]} {cell[2].label}")
                        store.add(_run_cell(suite, model, tokenizer, corpus, cell, {**context, "rope": rope}))
                        bar.update(1)
    write_report(store.records, out, with_plot=plot)
    return store


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _run_cell(suite: Suite, model, tokenizer, corpus, cell, context: dict) -> dict[str, Any]:
    method, length, task_variant = cell
    task = task_registry.get_task(task_variant.name)
    torch.manual_seed(suite.seed)  # each cell alike whether run alone or after others
    started = time.perf_counter()
    with tqdm(total=None, desc=f"  {task.name} L={length}", leave=False, position=1) as inner:
        metrics = task.run(model, tokenizer, corpus, length, task_variant.resolved, seed=suite.seed, progress=inner)
    if task.headline not in metrics:
        raise RopeNtkError(f"task {task.name!r} returned no {task.headline!r} metric (it returned {sorted(metrics)}).")
    metrics = _finite(metrics)  # strict JSON has no NaN / inf: None, which the report shows as n/a
    value = metrics[task.headline]
    record = {
        **suite.cell(method, length, task_variant),
        "label": method.label,
        "method_args": method.params,
        "task_label": task_variant.label,
        "metric": task.headline,
        "value": value,
        "metrics": metrics,
        "elapsed_s": round(time.perf_counter() - started, 2),
        "cell": suite.cell(method, length, task_variant),
        **context,
    }
    logger.info("%s L=%d %s: %s = %s", method.label, length, task_variant.label, task.headline, value)
    return record
