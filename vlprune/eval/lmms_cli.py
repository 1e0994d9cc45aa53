"""``vlprune eval ...``: lmms-eval's command line with ``--model vlprune`` preselected.

Everything after ``eval`` goes to lmms-eval unchanged, except that:

- ``--model_args`` (or each run's in a ``--config`` file) is checked before lmms-eval starts
  (method, budget / ratio, options, checkpoint, batch size, dtype, attention, device: one
  line and exit code 2 when wrong);
- with ``--output_path DIR`` and no ``stats_path`` in ``--model_args``, vlprune's per-sample
  stats go to ``DIR/vlprune_stats``;
- without ``--include_path``, the toy tasks that ship with vlprune (``vlprune_toy``,
  ``vlprune_toy_mc``: :mod:`vlprune.eval.toy.lmms_task`) are available;
- the exit code is 1 when an evaluation raised or returned no results (lmms-eval itself logs
  the error and exits 0).

Example (the shipped toy LLaVA, offline, from the repository root)::

    vlprune eval --model_args pretrained=vlprune/eval/toy/checkpoint,method=hiprune,budget=64 \\
        --tasks vlprune_toy,vlprune_toy_mc --batch_size 4 --output_path logs/
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from vlprune.cli_args import CommandError

__all__ = ["HELP", "TOY_TASKS", "check_argv", "lmms_eval_argv", "main"]

TOY_TASKS = Path(__file__).parent / "toy" / "lmms_tasks"
"""The folder of the shipped toy tasks' YAML files."""

HELP = """\
usage: vlprune eval [lmms-eval options]

lmms-eval with --model vlprune preselected; every other argument goes to lmms-eval.
--model_args (or each run of a --config file) is checked before lmms-eval starts: a bad
method, budget, option or checkpoint exits 2 with one line. The exit code is 1 when an
evaluation fails inside lmms-eval or returns no results. With --output_path DIR, per-sample
pruning stats go to DIR/vlprune_stats. Without --include_path, the toy tasks that ship with
vlprune (vlprune_toy, vlprune_toy_mc) are available.

example (the shipped toy LLaVA, offline, from the repository root):
  vlprune eval --model_args pretrained=vlprune/eval/toy/checkpoint,method=hiprune,budget=64 \\
      --tasks vlprune_toy,vlprune_toy_mc --batch_size 4 --output_path logs/

lmms-eval's own options follow.
"""


def _option(argv: list[str], name: str) -> tuple[int, str] | None:
    """Index of the value of ``--name V`` / ``--name=V`` in ``argv``, and the value."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return i + 1, argv[i + 1]
        if arg.startswith(name + "="):
            return i, arg.split("=", 1)[1]
    return None


def lmms_eval_argv(argv: list[str]) -> list[str]:
    """lmms-eval's arguments for ``vlprune eval argv``; ``SystemExit`` if ``--model`` is given."""
    if any(a == "--model" or a.startswith("--model=") for a in argv):
        raise SystemExit("vlprune eval: --model is preselected (vlprune); drop it")
    argv = list(argv)
    output = _option(argv, "--output_path")
    model_args = _option(argv, "--model_args")
    if output is not None and (model_args is None or "stats_path=" not in model_args[1]):
        stats = "stats_path=" + os.path.join(output[1], "vlprune_stats")
        if model_args is None:
            argv += ["--model_args", stats]
        else:
            i, value = model_args
            joined = f"{value},{stats}" if value else stats
            argv[i] = joined if argv[i] == value else f"--model_args={joined}"
    if _option(argv, "--include_path") is None:
        argv += ["--include_path", str(TOY_TASKS)]
    return ["--model", "vlprune", *argv]


def check_argv(argv: list[str]) -> None:
    """``ValueError`` when ``--model_args`` (or one of a ``--config`` file's runs) is missing or
    wrong (:func:`~vlprune.eval.lmms_load.check_model_args`), before lmms-eval starts."""
    import yaml
    from lmms_eval.utils import simple_parse_args_string

    from vlprune.eval.lmms_load import check_model_args

    model_args = _option(argv, "--model_args")
    config = _option(argv, "--config")
    runs = [] if model_args is None else [model_args[1]]
    if config is not None:
        try:
            entries = yaml.safe_load(Path(config[1]).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ValueError(f"--config {config[1]}: {err}") from None
        entries = entries if isinstance(entries, list) else [entries]
        runs = [str(e["model_args"]) for e in entries if isinstance(e, dict) and "model_args" in e]
        if model_args is not None:  # the command line's --model_args overrides every run's
            runs = [model_args[1]]
    if not runs:
        raise ValueError("--model_args pretrained=<checkpoint>,method=<name>,budget=<n> is "
                         "required")
    for run in runs:
        try:
            parsed = simple_parse_args_string(run)
        except ValueError:
            raise ValueError(f"--model_args must be key=value pairs, got {run!r}") from None
        check_model_args(**parsed)


def _run_lmms_eval(argv: list[str]) -> list[Any]:
    """Run lmms-eval's CLI in this process; per evaluation, its results or the exception it
    raised (lmms-eval logs exceptions and goes on)."""
    import lmms_eval.__main__ as lmms_main
    from lmms_eval.cli.dispatch import main as lmms_eval_main

    outcomes: list[Any] = []
    evaluate = lmms_main.cli_evaluate_single

    def recorded(args: Any = None) -> Any:
        try:
            results, samples = evaluate(args)
        except Exception as err:
            outcomes.append(err)
            raise
        outcomes.append(results)
        return results, samples

    lmms_main.cli_evaluate_single = recorded
    sys.argv = ["lmms-eval", *argv]
    try:
        lmms_eval_main()
    finally:
        lmms_main.cli_evaluate_single = evaluate
    return outcomes


def main(argv: list[str]) -> int:
    """Run lmms-eval in this process with ``argv`` (after ``vlprune eval``); the exit code."""
    try:
        import lmms_eval  # noqa: F401
    except ImportError as err:
        raise CommandError(
            f"needs lmms-eval ({err}); install it with `pip install 'vlprune[eval]'` "
            "(CPU-only machines: `bash scripts/setup_dev.sh`, see the README)"
        ) from None
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP)
        sys.argv = ["lmms-eval", "eval", "--help"]
        from lmms_eval.cli.dispatch import main as lmms_eval_main

        lmms_eval_main()
        return 0
    full = lmms_eval_argv(argv)
    try:
        check_argv(full)
    except ValueError as err:
        print(f"vlprune eval: error: {err}", file=sys.stderr)
        return 2
    outcomes = _run_lmms_eval(full)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    failed = [o for o in outcomes if isinstance(o, Exception) or (o is None and main_rank)]
    if not outcomes or failed:
        reason = next((f"{type(o).__name__}: {o}" for o in failed if o is not None),
                      "no results")
        raise CommandError(f"lmms-eval failed ({reason.splitlines()[0]})")
    return 0
