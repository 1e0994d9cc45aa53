"""Command line: ``vlprune demo | methods | profile | show | eval``."""

from __future__ import annotations

import argparse
import json
import sys


def _methods(args: argparse.Namespace) -> None:
    import vlprune

    rows = vlprune.available_methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| method | stage | budget scope | models | paper |\n|---|---|---|---|---|")
    for r in rows:
        families = r["families"] if isinstance(r["families"], str) else ", ".join(r["families"])
        print(f"| {r['name']} | {r['stage']} | per {r['scope']} | {families} | {r['paper']} |")


def _eval(args: argparse.Namespace) -> None:
    from vlprune.eval.lmms_cli import main

    main(args.lmms_eval_args)


def build_parser() -> argparse.ArgumentParser:
    """The ``vlprune`` argument parser."""
    parser = argparse.ArgumentParser(prog="vlprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    from vlprune.eval.demo import add_parser as add_demo_parser

    add_demo_parser(sub)
    methods = sub.add_parser("methods", help="list registered pruning methods")
    methods.add_argument("--json", action="store_true", help="print JSON instead of a table")
    methods.set_defaults(func=_methods)
    # further subcommands (profile, eval) register here
    from vlprune.eval.profiler.cli import add_parser as add_profile_parser

    add_profile_parser(sub)
    from vlprune.eval.show import add_parser as add_show_parser

    add_show_parser(sub)
    evaluate = sub.add_parser(
        "eval", help="run lmms-eval with --model vlprune (all further arguments go to lmms-eval)",
        add_help=False, prefix_chars="+",
    )
    evaluate.add_argument("lmms_eval_args", nargs=argparse.REMAINDER)
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``vlprune`` console script."""
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
