"""Command line of the retrieval entry points: eval/passkey.py, eval/needle.py, eval/ruler.py.

Methods x lengths x tasks; each cell's result is appended to
``OUT/results.json`` as soon as it finishes, and a re-run skips the cells
already there. Bad arguments are one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

from .errors import InvalidParameterError, RopeNtkError
from .evaluation.sweep import DEFAULT_METHODS
from .cli import _csv, fail, interrupted, setup_logging
from .methods import METHODS, get_method, validate_params

logger = logging.getLogger("rope_ntk")


def _param(text: str) -> tuple[str, Any]:
    name, sep, raw = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--param {text!r}: expected NAME=VALUE, e.g. num_keys=8")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw  # a bare word: value_type=uuid
    return name.strip(), value


def tasks_of(family: str) -> dict[str, tuple]:
    """task name -> (defaults, validate, run) for one entry point."""
    if family == "passkey":
        from .evaluation import passkey as pk

        return {"passkey": (pk.PASSKEY_DEFAULTS, pk.validate_passkey, pk.run_passkey)}
    if family == "needle":
        from .evaluation import needle as nd

        return {"needle": (nd.NEEDLE_DEFAULTS, nd.validate_needle, nd.run_needle)}
    from .evaluation.ruler import RULER_TASKS

    return {f"ruler:{n}": (t.defaults, t.validate, t.run) for n, t in RULER_TASKS.items()}


def build_parser(description: str, family: str) -> argparse.ArgumentParser:
    methods = "\n".join(f"  {m.name:<12} {m.paper}" for m in METHODS.values())
    tasks = tasks_of(family)
    listing = "\n".join(f"  {name:<26} {json.dumps(d[0])}" for name, d in tasks.items())
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"methods:\n{methods}\n\ntasks and their default parameters:\n{listing}\n\n"
        "Re-running the same command resumes: cells already in OUT/results.json are skipped.",
    )
    parser.add_argument("--out", default=f"runs/{family}", help="output directory (default: %(default)s)")
    parser.add_argument("--model", default="bundled",
                        help="'bundled' (SmolLM2-135M GGUF), a directory, a .gguf or a hub id")
    parser.add_argument("--corpus", default="bundled",
                        help="haystack text: 'bundled' essays, a file or a datasets name")
    parser.add_argument("--corpus-split", default="test", help="split of a datasets corpus (%(default)s)")
    parser.add_argument("--text-field", default="text", help="text field of .jsonl/datasets (%(default)s)")
    parser.add_argument("--methods", type=_csv(str, "--methods"), default=DEFAULT_METHODS,
                        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})")
    parser.add_argument("--factor", type=float, default=2.0, help="scaling factor for every method (%(default)s)")
    parser.add_argument("--lengths", type=_csv(int, "--lengths"), default=(4096, 8192, 16384),
                        help="comma-separated prompt lengths in tokens (default: 4096,8192,16384)")
    if family == "ruler":
        parser.add_argument("--tasks", type=_csv(str, "--tasks"), default=tuple(n.split(":")[1] for n in tasks),
                            help="comma-separated tasks (default: all five)")
    else:
        parser.add_argument("--depths", type=_csv(float, "--depths"), default=None,
                            help="needle depths in [0,1] (default: 0,0.25,0.5,0.75,1)")
    parser.add_argument("--trials", type=int, default=None, help="trials per cell (per depth for passkey/needle)")
    parser.add_argument("--scoring", choices=["generate", "teacher-forcing"], default="generate",
                        help="greedy generation, or one forward scoring the answer tokens as argmax (%(default)s)")
    parser.add_argument("--chat-template", action="store_true",
                        help="put the prompt in a user turn of the tokenizer's chat template")
    parser.add_argument("--param", type=_param, action="append", default=[], metavar="NAME=VALUE",
                        help="task parameter (repeatable), e.g. --param num_keys=8 --param value_type=uuid")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                        help="model weights dtype (%(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated prompts (%(default)s)")
    parser.add_argument("--no-plot", action="store_true", help="skip the heatmap PNGs")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def task_params(args, family: str) -> dict[str, dict]:
    """Validated parameters of each task this command runs."""
    tasks = tasks_of(family)
    names = [f"ruler:{t}" for t in args.tasks] if family == "ruler" else list(tasks)
    unknown = [n.split(":")[-1] for n in names if n not in tasks]
    valid = ", ".join(n.split(":")[-1] for n in tasks)
    if not names:
        raise InvalidParameterError(f"tasks is empty; give at least one of: {valid}.")
    if unknown:
        raise InvalidParameterError(f"tasks={unknown} not known; valid: {valid}.")
    given: dict[str, Any] = dict(args.param)
    for flag in ("trials", "depths"):
        if getattr(args, flag, None) is not None:
            given[flag] = list(getattr(args, flag)) if flag == "depths" else getattr(args, flag)
    given["scoring"] = args.scoring
    given["chat_template"] = args.chat_template
    orphans = sorted(set(dict(args.param)) - {k for n in names for k in tasks[n][0]})
    if orphans:
        valid = sorted({k for n in names for k in tasks[n][0]})
        raise InvalidParameterError(f"--param {orphans}: no task of this run takes it; valid: {', '.join(valid)}.")
    out = {}
    for name in names:
        defaults, validate, _ = tasks[name]
        out[name] = validate({k: v for k, v in given.items() if k in defaults})
    return out


def check_run(args) -> None:
    problems = []
    if not args.methods:
        problems.append("methods is empty; give at least one method")
    if not args.lengths:
        problems.append("lengths is empty; give at least one length")
    for length in args.lengths:
        if length < 64:
            problems.append(f"length={length!r} must be an integer >= 64 tokens")
    for m in args.methods:
        try:
            validate_params(m, {} if get_method(m).name == "none" else {"factor": args.factor})
        except InvalidParameterError as exc:
            problems.append(str(exc).rstrip("."))
    if problems:
        raise InvalidParameterError("; ".join(dict.fromkeys(problems)) + ".")


def run(args, family: str) -> list[dict]:
    import torch
    from tqdm.auto import tqdm

    from . import patching
    from .data import load_corpus
    from .evaluation.results import ResultsStore, command_line, versions
    from .loading import load_model

    params = task_params(args, family)
    check_run(args)
    tasks = tasks_of(family)
    store = ResultsStore(Path(args.out) / "results.json")

    def method_params(m):
        return {} if get_method(m).name == "none" else {"factor": args.factor}

    def cell(m, length, task):
        c = {
            "model": args.model, "corpus": args.corpus, "dtype": args.dtype, "method": get_method(m).name,
            "params": method_params(m), "length": length, "task": task, "task_params": params[task],
            "seed": args.seed,
        }
        if get_method(m).dynamic or get_method(m).name == "longrope":
            c["cache_consistent"] = True
        return c

    plan = [(m, n, t) for m in args.methods for n in args.lengths for t in params if not store.has(cell(m, n, t))]
    if not plan:
        logger.info("all cells already in %s", store.path)
        return store.records
    logger.info("%d cell(s) to compute", len(plan))
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    corpus = load_corpus(args.corpus, split=args.corpus_split, text_field=args.text_field)
    context = {"versions": versions(), "command": command_line()}
    with tqdm(total=len(plan), desc="cells", unit="cell", position=0) as bar:
        for method in dict.fromkeys(m for m, _, _ in plan):
            with patching.patch(model, method, **method_params(method)), torch.inference_mode():
                for m, length, task in (p for p in plan if p[0] == method):
                    bar.set_postfix_str(f"{method} L={length} {task}")
                    started = time.perf_counter()
                    count = params[task]["trials"] * len(params[task].get("depths", [0]))
                    with tqdm(total=count, desc=f"  {task} L={length}", unit="trial", leave=False,
                              position=1) as inner:
                        result = tasks[task][2](model, tokenizer, corpus, length, params[task], seed=args.seed,
                                                progress=inner)
                    elapsed = time.perf_counter() - started
                    identity = cell(m, length, task)
                    record = {
                        **identity,
                        "factor": method_params(m).get("factor"),
                        "metric": f"{task}_accuracy",
                        "value": result["accuracy"],
                        **{k: v for k, v in result.items() if k not in identity},
                        "elapsed_s": round(elapsed, 2),
                        "s_per_trial": round(elapsed / result["trials"], 3),
                        "cell": identity,
                        "rope": patching.describe(model)[0],
                        **context,
                    }
                    store.add(record)
                    bar.update(1)
                    logger.info("%s L=%d %s accuracy %.3f (%.2f s/trial)", method, length, task,
                                result["accuracy"], record["s_per_trial"])
    return store.records


def show(records: list[dict], family: str, out: Path, plot: bool) -> None:
    from .evaluation import summaries
    from .evaluation.needle import heatmap

    mine = [r for r in records if "task" in r and r["task"] in tasks_of(family)]
    by_label: dict[str, list[dict]] = {}
    for r in mine:
        label = r["method"] if r.get("factor") is None else f"{r['method']} x{r['factor']:g}"
        by_label.setdefault(label, []).append(r)
    for label, rs in by_label.items():
        for task in dict.fromkeys(r["task"] for r in rs):
            cells = [r for r in rs if r["task"] == task]
            acc = summaries.accuracy_by_length(cells)
            row = "  ".join(f"{n}: {a:.0%}" for n, a in acc.items())
            print(f"{label:<18} {task:<26} {row}")
            if task in ("passkey", "needle"):
                a, b = summaries.reliable_length(acc), summaries.effective_length(acc)
                mean = "-" if a["mean_accuracy"] is None else f"{a['mean_accuracy']:.0%}"
                print(f"{'':<18} longest length >= 80%: {a['length']} (mean accuracy up to it {mean}); "
                      f"largest k with >= 20% at every length <= k: {b['length']}")
                if plot:
                    name = f"{task}_heatmap_{label.replace(' ', '_')}.png"
                    if heatmap(cells, out / name, title=f"{task}: {label}"):
                        print(f"{'':<18} heatmap: {out / name}")
    if family == "passkey":  # the same report.md / plot as eval/sweep.py writes, from these records
        from .evaluation.report import write_report

        write_report(records, out, with_plot=plot)
        print(f"report: {out}/report.md")
    print(f"\nresults: {out}/results.json")


def main(description: str, family: str, argv: list[str] | None = None) -> int:
    parser = build_parser(description, family)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        records = run(args, family)
    except (RopeNtkError, ValueError) as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return interrupted(f"finished cells are in {args.out}/results.json, re-run to resume")
    show(records, family, Path(args.out), plot=not args.no_plot)
    return 0
