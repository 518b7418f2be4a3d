"""The main job: methods x lengths, perplexity and passkey, resumable.

For each method the model is patched once; each (length, metric) cell not
yet in ``results.json`` is computed and written as soon as it finishes.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import patching
from ..data import load_corpus
from ..errors import InvalidParameterError
from ..loading import load_model
from ..methods import get_method, validate_params
from ..verify import verify
from . import passkey as pk
from . import perplexity as pp
from .report import write_report
from .results import ResultsStore, command_line, locked_dir, versions

logger = logging.getLogger(__name__)

DEFAULT_METHODS = ("none", "linear", "ntk", "dynamic-ntk", "yarn")


@dataclass
class SweepConfig:
    """Everything that determines a sweep's numbers."""

    model: str = "bundled"
    corpus: str = "bundled"
    methods: tuple[str, ...] = DEFAULT_METHODS
    factor: float = 2.0
    lengths: tuple[int, ...] = (4096, 8192, 16384)
    metrics: tuple[str, ...] = ("perplexity", "passkey")
    dtype: str = "bfloat16"
    ppl_tokens: int | None = 16384  # scored tokens per length (same span at every length); None: all selected
    bos: str = "auto"
    protocol: str = "disjoint"  # perplexity protocol: disjoint | sliding | truncate
    stride: int | None = None  # sliding only; None = length // 2
    num_documents: int | None = None  # None = every eligible document, in corpus order
    min_doc_tokens: int = 0
    exclude_documents: tuple[int | str, ...] = ()  # corpus indices or document ids (held-out evaluation)
    depths: tuple[float, ...] = (0.25, 0.5, 0.75)
    seed: int = 0
    chunk_size: int = 1024
    corpus_split: str = "test"
    text_field: str = "text"
    # run code shipped with a hub model (its config's auto_map); off unless the user asks
    trust_remote_code: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        problems = []
        for name in ("methods", "lengths", "metrics"):
            if not getattr(self, name):
                problems.append(f"{name} is empty; give at least one value")
        if "passkey" in self.metrics and not self.depths:
            problems.append("depths is empty; the passkey metric needs at least one depth in [0, 1]")
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not (
            math.isfinite(self.factor) and self.factor >= 1
        ):
            problems.append(f"factor={self.factor!r} must be a finite number >= 1")
        for m in self.methods:
            try:
                get_method(m)
            except InvalidParameterError as exc:
                problems.append(str(exc).rstrip("."))
        for length in self.lengths:
            if isinstance(length, bool) or not isinstance(length, int) or length < 64:
                problems.append(f"length={length!r} must be an integer >= 64 tokens")
        for d in self.depths:
            try:
                pk.check_depth(d)
            except InvalidParameterError as exc:
                problems.append(str(exc).rstrip("."))
        bad_metrics = [m for m in self.metrics if m not in ("perplexity", "passkey")]
        if bad_metrics:
            problems.append(f"metrics={bad_metrics} not known; valid: perplexity, passkey")
        if not isinstance(self.trust_remote_code, bool):
            problems.append(f"trust_remote_code={self.trust_remote_code!r} must be True or False")
        if self.ppl_tokens is not None and (isinstance(self.ppl_tokens, bool) or not isinstance(self.ppl_tokens, int)):
            problems.append(f"ppl_tokens={self.ppl_tokens!r} must be an integer >= 1 or None (every token)")
        elif self.ppl_tokens is not None and self.ppl_tokens < 1:
            problems.append(f"ppl_tokens={self.ppl_tokens!r} must be >= 1")
        if "perplexity" in self.metrics:
            try:
                pp.validate_perplexity(self.perplexity_params())
                for length in self.lengths if self.protocol == "sliding" else ():
                    if isinstance(length, int) and length >= 2:
                        pp.check_stride(self.stride, length)
            except InvalidParameterError as exc:
                problems.append(str(exc).rstrip("."))
        for m in self.methods:
            try:
                validate_params(m, self.method_params(m))
            except InvalidParameterError as exc:
                problems.append(str(exc).rstrip("."))
        if problems:
            raise InvalidParameterError("; ".join(dict.fromkeys(problems)) + ".")

    def method_params(self, method: str) -> dict[str, Any]:
        name = get_method(method).name
        return {} if name == "none" else {"factor": self.factor}

    def perplexity_params(self) -> dict[str, Any]:
        """The parameters of ``perplexity.run_perplexity``."""
        return {
            "protocol": self.protocol,
            "stride": self.stride,
            "tokens": self.ppl_tokens,
            "num_documents": self.num_documents,
            "min_doc_tokens": self.min_doc_tokens,
            "exclude": list(self.exclude_documents),
            "bos": self.bos,
            "chunk_size": self.chunk_size,
        }


def _cell(config: SweepConfig, method: str, length: int, metric: str) -> dict[str, Any]:
    """What determines one record's value (its identity in the store)."""
    cell = {
        "model": config.model,
        "corpus": config.corpus,
        "dtype": config.dtype,
        "method": get_method(method).name,
        "params": config.method_params(method),
        "length": length,
        "metric": "passkey_accuracy" if metric == "passkey" else "perplexity",
        "seed": config.seed,
    }
    if get_method(method).dynamic or get_method(method).name == "longrope":
        # causal, cache-consistent scaling (the default since issue 4) gives
        # other numbers than the one-scale-per-forward legacy mode
        cell["cache_consistent"] = True
    if metric == "perplexity":
        cell.update(ppl_tokens=config.ppl_tokens, bos=config.bos, protocol=config.protocol)
        # settings at their defaults stay out of the cell, so records made
        # before they existed (disjoint over the whole corpus) still match
        if config.protocol == "sliding":
            cell["stride"] = pp.check_stride(config.stride, length)
        for name, default in (("num_documents", None), ("min_doc_tokens", 0), ("exclude_documents", ())):
            value = getattr(config, name)
            if value != default:
                cell[name] = list(value) if isinstance(value, tuple) else value
    else:
        cell.update(depths=list(config.depths))
    return cell


def run_sweep(config: SweepConfig, out_dir: str | Path, plot: bool = True) -> ResultsStore:
    """Compute every missing cell, writing ``results.json`` after each."""
    config.validate()
    out = Path(out_dir)
    with locked_dir(out):  # one writer per folder; stale temp files of a killed run removed
        return _run_locked(config, out, plot)


def _run_locked(config: SweepConfig, out: Path, plot: bool) -> ResultsStore:
    store = ResultsStore(out / "results.json")
    plan = [
        (m, length, metric)
        for m in config.methods
        for length in config.lengths
        for metric in config.metrics
        if not store.has(_cell(config, m, length, metric))
    ]
    done = len(config.methods) * len(config.lengths) * len(config.metrics) - len(plan)
    if not plan:
        logger.info("all cells already in %s", store.path)
        write_report(store.records, out, with_plot=plot)
        return store
    logger.info("%d cell(s) to compute, %d already done", len(plan), done)

    torch.manual_seed(config.seed)
    model, tokenizer = load_model(config.model, dtype=config.dtype, trust_remote_code=config.trust_remote_code)
    bos_id = pp.resolve_bos(tokenizer, config.bos)
    if "passkey" in config.metrics:  # fail before any cell, not after some
        pk.build_prompt(tokenizer, min(config.lengths), 0.0, "00000")
    docs: list[str] = []
    if "perplexity" in config.metrics:
        docs = load_corpus(config.corpus, split=config.corpus_split, text_field=config.text_field)
        params = pp.validate_perplexity(config.perplexity_params())
        for length in sorted({length for _, length, metric in plan if metric == "perplexity"}):
            pp.plan_windows(tokenizer, docs, length, params, seed=config.seed, bos_id=bos_id)  # corpus long enough?
    context = {"versions": versions(), "command": command_line(), "config": asdict(config)}

    with tqdm(total=len(plan), desc="cells", unit="cell", position=0) as bar:
        _run_plan(plan, model, tokenizer, docs, config, store, context, bar)
    write_report(store.records, out, with_plot=plot)
    return store


def _run_plan(plan, model, tokenizer, docs, config, store, context, bar) -> None:
    for method in dict.fromkeys(m for m, _, _ in plan):
        params = config.method_params(method)
        with patching.patch(model, method, **params), torch.inference_mode():
            verify(model)  # no numbers from a RoPE other than the one recorded: raises RopeMismatchError
            for m, length, metric in plan:
                if m != method:
                    continue
                bar.set_postfix_str(f"{method} L={length} {metric}")
                started = time.perf_counter()
                if metric == "perplexity":
                    fields = _perplexity_cell(model, tokenizer, docs, config, length)
                else:
                    fields = _passkey_cell(model, tokenizer, config, length)
                record = {
                    **_cell(config, method, length, metric),
                    "factor": params.get("factor"),
                    **fields,
                    "elapsed_s": round(time.perf_counter() - started, 2),
                    "cell": _cell(config, method, length, metric),
                    "rope": patching.describe(model)[0],
                    **context,
                }
                store.add(record)
                bar.update(1)
                logger.info("%s L=%d %s = %.4g", method, length, record["metric"], record["value"])


def _perplexity_cell(model, tokenizer, docs, config: SweepConfig, length: int) -> dict[str, Any]:
    params = config.perplexity_params()
    with tqdm(desc=f"  ppl L={length}", unit="win", leave=False, position=1) as bar:
        metrics = pp.run_perplexity(model, tokenizer, docs, length, params, seed=config.seed, progress=bar)
    keep = ("tokens", "windows", "nll_sum", "stride", "documents", "document_ids", "selection_sha256")
    return {"value": metrics["perplexity"], **{k: metrics[k] for k in keep}}


def _passkey_cell(model, tokenizer, config: SweepConfig, length: int) -> dict[str, Any]:
    keys = pk.trial_keys(config.seed, length, list(config.depths))
    trials = []
    for depth, key in tqdm(list(zip(config.depths, keys)), desc=f"  passkey L={length}", leave=False, position=1):
        prompt = pk.build_prompt(tokenizer, length, depth, key)
        trials.append(pk.run_trial(model, tokenizer, prompt))
    correct = sum(t["correct"] for t in trials)
    return {"value": correct / len(trials), "trials": len(trials), "correct": correct, "details": trials}
