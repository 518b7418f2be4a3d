"""Command lines of ``eval/suite.py``, ``eval/report.py`` and ``eval/compare.py``.

Same conventions as ``cli.py``: ``allow_abbrev=False``, bad input printed as
one ``error: ...`` line with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .cli import fail, interrupted, setup_logging
from .errors import RopeNtkError


def suite_main(description: str, argv: list[str] | None = None) -> int:
    from .evaluation import suite as st
    from .evaluation import tasks

    parser = argparse.ArgumentParser(
        description=description,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"registered tasks: {', '.join(tasks.TASKS)}\nspec keys: {', '.join(st.SPEC_KEYS)} "
        "(docs/suite.md)\n\nRe-running the same spec resumes: cells already in OUT/results.json are skipped.",
    )
    parser.add_argument("spec", help="suite spec, .yaml/.yml or .json (examples in eval/specs/)")
    parser.add_argument("--out", help="output directory (default: the spec's 'out', else runs/suite)")
    parser.add_argument("--dry-run", action="store_true", help="check the spec and list the cells to compute; load nothing")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    try:
        suite = st.parse_spec(st.load_spec(args.spec), out=args.out)
        out = Path(suite.out or "runs/suite")
        if args.dry_run:
            from .evaluation.results import ResultsStore

            todo = st.plan(suite, ResultsStore(out / "results.json"))
            print(f"{len(suite.cells())} cell(s), {len(todo)} to compute into {out}/results.json:")
            for method, length, task in todo:
                print(f"  {method.label:<28} L={length:<6} {task.label}")
            return 0
        store = st.run_suite(suite, out, plot=not args.no_plot)
    except (RopeNtkError, ValueError) as exc:
        return fail(exc)
    except KeyboardInterrupt:
        return interrupted("finished cells are in the results file, re-run to resume")
    from .evaluation.report import rows, task_table

    all_rows = rows(store.records)
    for task in dict.fromkeys(r.task for r in all_rows):
        print(f"\n{task}\n{task_table(all_rows, task)}")
    print(f"\nresults: {out}/results.json  report: {out}/report.md")
    return 0


def report_main(description: str, argv: list[str] | None = None) -> int:
    from .evaluation.compare import open_results
    from .evaluation.report import write_report

    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("results", nargs="*", default=["runs/default"],
                        help="output directories or results.json files (default: runs/default)")
    parser.add_argument("--to", help="where report.md and the plots go (default: the first directory given)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    args = parser.parse_args(argv)
    try:
        records = [r for i, path in enumerate(args.results) for r in open_results(path, f"results[{i}]")]
    except (RopeNtkError, ValueError) as exc:
        return fail(exc)
    first = Path(args.results[0])
    target = Path(args.to) if args.to else (first if first.is_dir() else first.parent)
    path = write_report(records, target, with_plot=not args.no_plot)
    print(path.read_text(encoding="utf-8"))
    return 0


def compare_main(description: str, argv: list[str] | None = None) -> int:
    from .evaluation import compare as cp
    from .evaluation.results import atomic_write_text

    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("a", help="results A (an output directory or its results.json), e.g. before fine-tuning")
    parser.add_argument("b", help="results B, e.g. after fine-tuning")
    parser.add_argument("--out", help="also write the comparison as markdown to this file")
    parser.add_argument("--ignore", default=",".join(cp.DEFAULT_IGNORE),
                        help="comma-separated cell keys not used to match cells (default: %(default)s; '' for none)")
    args = parser.parse_args(argv)
    try:
        a, b = cp.open_results(args.a, "a"), cp.open_results(args.b, "b")
    except (RopeNtkError, ValueError) as exc:
        return fail(exc)
    ignore = tuple(k.strip() for k in args.ignore.split(",") if k.strip())
    result = cp.compare(a, b, (args.a, args.b), ignore)
    print(cp.terminal(result))
    if args.out:
        atomic_write_text(Path(args.out), cp.markdown(result) + "\n")
        print(f"markdown: {args.out}")
    return 0
