"""``vlprune eval ...``: lmms-eval's command line with ``--model vlprune`` preselected.

Everything after ``eval`` goes to lmms-eval unchanged, except that with ``--output_path DIR`` and
no ``stats_path`` in ``--model_args``, vlprune's per-sample stats go to ``DIR/vlprune_stats``::

    vlprune eval --model_args pretrained=Qwen/Qwen2.5-VL-7B-Instruct,method=fastv,budget=64 \\
        --tasks mme --batch_size 4 --output_path logs/ --log_samples
"""

from __future__ import annotations

import os
import sys


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
    return ["--model", "vlprune", *argv]


def main(argv: list[str]) -> int:
    """Run lmms-eval in this process with ``argv`` (after ``vlprune eval``)."""
    try:
        from lmms_eval.cli.dispatch import main as lmms_eval_main
    except ImportError as err:
        raise SystemExit(
            f"vlprune eval needs lmms-eval ({err}); install it with `pip install 'vlprune[eval]'` "
            "(CPU-only machines: `bash scripts/setup_dev.sh`, see the README)"
        ) from err
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print("\nlmms-eval's own options follow.\n")
        sys.argv = ["lmms-eval", "eval", "--help"]
    else:
        sys.argv = ["lmms-eval", *lmms_eval_argv(argv)]
    lmms_eval_main()
    return 0
