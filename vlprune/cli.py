"""Command line: ``vlprune demo | methods | profile | show | eval``.

Each subcommand registers itself with ``add_parser(sub)`` (its module) and returns an exit code;
arguments are checked while parsing (:mod:`vlprune.cli_args`): a bad one exits 2, a failure
later exits 1, each with one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any

from vlprune.cli_args import OneLineParser, method_name, run_command

DESCRIPTION = "Training-free visual-token pruning for Hugging Face vision-language models."


def format_methods(rows: list[dict[str, Any]]) -> str:
    """The method table and every method's options (rows of ``vlprune.available_methods()``)."""
    lines = ["| method | stage | budget scope | models | paper | official code |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        families = r["families"] if isinstance(r["families"], str) else ", ".join(r["families"])
        lines.append(f"| {r['name']} | {r['stage']} | per {r['scope']} | {families} | "
                     f"{r['paper']} | {r['repo'] or '—'} |")
    lines += ["", "Options: vlprune.patch(model, method, budget=..., <option>=<value>); "
              "each line is <option> = <default> (<allowed values>): <meaning>."]
    for r in rows:
        lines.append(f"\n{r['name']}")
        if not r["options"]:
            lines.append("  (no options)")
        for name, opt in r["options"].items():
            text = f"{name} = {opt['default']!r} ({opt['allowed']}): {opt['help']}"
            lines.append(textwrap.fill(text, width=100, initial_indent="  ",
                                       subsequent_indent="      "))
    return "\n".join(lines)


def _methods(args: argparse.Namespace) -> int:
    import vlprune

    rows = vlprune.available_methods()
    if args.names:
        rows = [r for r in rows if r["name"] in args.names]
    print(json.dumps(rows, indent=2) if args.json else format_methods(rows))
    return 0


def _eval(args: argparse.Namespace) -> int:
    from vlprune.eval.lmms_cli import main

    return main(args.lmms_eval_args)


def build_parser() -> argparse.ArgumentParser:
    """The ``vlprune`` argument parser."""
    parser = OneLineParser(prog="vlprune", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    from vlprune.eval.demo import add_parser as add_demo_parser

    add_demo_parser(sub)
    methods = sub.add_parser(
        "methods", help="list the pruning methods and their options",
        description="The registered pruning methods (stage, budget scope, models, paper, "
                    "official code) and each method's options: default, allowed values, "
                    "meaning.")
    methods.add_argument("names", nargs="*", type=method_name, metavar="method",
                         help="only these methods (default: all)")
    methods.add_argument("--json", action="store_true", help="print JSON instead of text")
    methods.set_defaults(func=_methods)
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
    """Entry point of the ``vlprune`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    return run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
