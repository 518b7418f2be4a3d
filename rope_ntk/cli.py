"""Argument parsing shared by the ``eval/`` entry points.

The scripts stay thin: they build a ``SweepConfig`` from the command line
and call the library. Errors from bad arguments are printed as one line
(``error: ...``) with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import RopeNtkError
from .evaluation.perplexity import PROTOCOLS
from .evaluation.sweep import DEFAULT_METHODS, SweepConfig, run_sweep
from .methods import METHODS

QUICK = dict(lengths=(2048, 12288), ppl_tokens=12288, depths=(0.5,))


def setup_logging(verbose: bool) -> None:
    """The log format every entry point uses (``-v``: debug)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def fail(exc: Exception) -> int:
    """Bad input: one ``error:`` line, exit status 2."""
    print(f"error: {exc}", file=sys.stderr)
    return 2


def interrupted(hint: str) -> int:
    """Ctrl-C: say what is kept and how to go on, exit status 130."""
    print(f"\ninterrupted; {hint}", file=sys.stderr)
    return 130


def _csv(kind, name):
    def parse(text: str):
        try:
            return tuple(kind(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r}: expected comma-separated {kind.__name__} values")

    return parse


def _tokens(text: str) -> int | None:
    """--ppl-tokens: a count, or 'all' (every token of the selected documents)."""
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ppl-tokens={text!r}: expected an integer or 'all'") from None


def build_parser(description: str, metrics: tuple[str, ...]) -> argparse.ArgumentParser:
    d = SweepConfig()
    methods = "\n".join(f"  {m.name:<12} {m.paper}" for m in METHODS.values())
    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,  # --quic must not pass for --quick without its preset
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"methods:\n{methods}\n\nRe-running the same command resumes: cells already in "
        "OUT/results.json are skipped.",
    )
    parser.add_argument("--out", default="runs/default", help="output directory (default: %(default)s)")
    parser.add_argument(
        "--model", default=d.model, help="'bundled' (SmolLM2-135M GGUF), a directory, a .gguf file or a hub id"
    )
    parser.add_argument(
        "--corpus", default=d.corpus, help="'bundled' (Paul Graham essays, one document), 'bundled-essays' (one document per essay), "
        "a .txt/.jsonl/.json file, a dataset folder or a datasets name"
    )
    parser.add_argument("--corpus-split", default=d.corpus_split, help="split of a datasets corpus (%(default)s)")
    parser.add_argument("--text-field", default=d.text_field, help="text field of .jsonl/datasets (%(default)s)")
    parser.add_argument(
        "--methods", type=_csv(str, "--methods"), default=DEFAULT_METHODS,
        help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--factor", type=float, default=d.factor, help="scaling factor for every method (%(default)s)")
    parser.add_argument(
        "--lengths", type=_csv(int, "--lengths"), default=d.lengths,
        help="comma-separated context lengths in tokens (default: 4096,8192,16384)",
    )
    parser.add_argument(
        "--metrics", type=_csv(str, "--metrics"), default=metrics,
        help=f"comma-separated metrics among perplexity,passkey (default: {','.join(metrics)})"
    )
    parser.add_argument("--dtype", default=d.dtype, choices=["bfloat16", "float32", "float16"],
                        help="model weights dtype; RoPE phases are float32 always (%(default)s)")
    parser.add_argument("--ppl-tokens", type=_tokens, default=d.ppl_tokens,
                        help="tokens scored per length; the same text span at every length, or 'all': every "
                        "token of the selected documents (%(default)s)")
    parser.add_argument("--bos", default=d.bos, choices=["auto", "always", "never"],
                        help="prepend BOS to each perplexity window: auto follows the tokenizer (%(default)s)")
    if "perplexity" in metrics:
        _perplexity_flags(parser, d)
    parser.add_argument("--depths", type=_csv(float, "--depths"), default=d.depths,
                        help="passkey depths in [0,1], one trial each (default: 0.25,0.5,0.75)")
    parser.add_argument("--seed", type=int, default=d.seed,
                        help="seed for passkeys and for --num-documents selection (%(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="first look in ~3 minutes: lengths 2048,12288, 12288 scored tokens, one depth")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code shipped with a hub model (its config's auto_map); off by default")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _documents(text: str) -> tuple[int | str, ...]:
    """--exclude-documents: comma-separated corpus indices / document ids, or
    @FILE: a JSON list of them, or a results record / selection holding
    "document_ids"."""
    if text.startswith("@"):
        try:
            loaded = json.loads(Path(text[1:]).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"--exclude-documents={text!r}: cannot read a JSON list: {exc}")
        items = loaded.get("document_ids") if isinstance(loaded, dict) else loaded
        if not isinstance(items, list):
            raise argparse.ArgumentTypeError(
                f"--exclude-documents={text!r}: expected a JSON list or an object with \"document_ids\""
            )
        return tuple(items)
    return tuple(int(x) if x.strip().isdigit() else x.strip() for x in text.split(",") if x.strip())


def _perplexity_flags(parser: argparse.ArgumentParser, d: SweepConfig) -> None:
    group = parser.add_argument_group(
        "perplexity protocol and documents (docs/perplexity_protocols.md)"
    )
    group.add_argument("--protocol", default=d.protocol, choices=PROTOCOLS,
                       help="disjoint: consecutive windows of L scoring L-1 new tokens each (lm-eval rolling); "
                       "sliding: windows advanced by --stride scoring only the new tokens (Press et al.); "
                       "truncate: each document's first L tokens, one forward each (YaRN proof-pile). "
                       "(default: %(default)s)")
    group.add_argument("--stride", type=int, default=d.stride,
                       help="sliding only: tokens each window advances, 1..L-1; every scored token after the "
                       "first window sees at least L-stride tokens (default: L/2)")
    group.add_argument("--num-documents", type=int, default=d.num_documents,
                       help="pick this many documents, seeded by --seed (default: all, in corpus order)")
    group.add_argument("--min-doc-tokens", type=int, default=d.min_doc_tokens,
                       help="never pick documents shorter than this many tokens (%(default)s)")
    group.add_argument("--exclude-documents", type=_documents, default=d.exclude_documents,
                       help="documents never picked (held-out evaluation): comma-separated corpus indices or "
                       "document ids, or @FILE with a JSON list or a record holding \"document_ids\"")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    config = SweepConfig(
        model=args.model,
        corpus=args.corpus,
        corpus_split=args.corpus_split,
        text_field=args.text_field,
        methods=tuple(args.methods),
        factor=args.factor,
        lengths=tuple(args.lengths),
        metrics=tuple(args.metrics),
        dtype=args.dtype,
        ppl_tokens=args.ppl_tokens,
        bos=args.bos,
        depths=tuple(args.depths),
        seed=args.seed,
        trust_remote_code=args.trust_remote_code,
    )
    for name in ("protocol", "stride", "num_documents", "min_doc_tokens", "exclude_documents"):
        if hasattr(args, name):  # the perplexity flags exist only where perplexity runs
            setattr(config, name, getattr(args, name))
    return config


def main(description: str, metrics: tuple[str, ...], argv: list[str] | None = None) -> int:
    parser = build_parser(description, metrics)
    if "--quick" in (sys.argv[1:] if argv is None else argv):
        parser.set_defaults(**QUICK)  # explicit flags still win over the preset
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        config = config_from_args(args)
        config.validate()
        logging.getLogger("rope_ntk").info("config: %s", config)
        store = run_sweep(config, args.out, plot=not args.no_plot)
    except (RopeNtkError, ValueError) as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return interrupted(f"finished cells are in {args.out}/results.json, re-run to resume")
    from .evaluation.report import table

    for metric, title in (("perplexity", "Perplexity"), ("passkey_accuracy", "Passkey accuracy")):
        body = table(store.records, metric)
        if body:
            print(f"\n{title}\n{body}")
    print(f"\nresults: {args.out}/results.json  report: {args.out}/report.md  plot: {args.out}/perplexity_vs_length.png")
    return 0
