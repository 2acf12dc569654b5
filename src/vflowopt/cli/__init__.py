"""The `vflowopt` command.

`vflowopt run` prunes one prompt on a local model (or, with no --model, on the small VQA model shipped
in the package) and shows what pruning did. `vflowopt optimize` searches a pruning strategy for a
model and budget (VFlowOpt paper 3.3) and writes it as a strategy JSON for `run --strategy`. `vflowopt bench`
measures efficiency and fidelity; `vflowopt eval` measures accuracy on the procedural VQA benchmark;
`vflowopt show` draws the tokens a method keeps. Every
subcommand is one module with an `_add_<name>` function that registers its parser and sets `func`; `main` only
parses and dispatches, so `optimize` and `bench` slot in the same way.

Exit codes: 0 success, 1 a forward the runtime could not prune, 2 bad arguments, a bad config or
strategy, or a model/image that could not be loaded, 130 an optimization interrupted by Ctrl-C."""

from __future__ import annotations

import argparse
import warnings
from collections.abc import Sequence

from ..version import __version__
from .bench import _add_bench
from .common import (
    CLIError,
    _error,
    _layer_ranges,
)
from .eval import _add_eval
from .optimize import _add_optimize
from .run import _add_run
from .show import _add_show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vflowopt",
        description="Visual-token pruning for Hugging Face transformers multimodal models.",
    )

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_run(sub)
    _add_optimize(sub)
    _add_bench(sub)
    _add_eval(sub)
    _add_show(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Warnings on the command line are one line for the user, not a pointer into the source."""
    return f"warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # --help, --version or a usage error (argparse already printed it)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    try:
        return int(args.func(args))
    except CLIError as exc:
        _error(str(exc))
        return exc.code


__all__ = ["CLIError", "_layer_ranges", "build_parser", "main"]
