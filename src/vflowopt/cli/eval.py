"""`vflowopt eval`: exact-match accuracy on the procedural VQA benchmark for methods x budgets."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    CLIError,
    _method_budget_grid,
    _output_file,
    _positive_int,
    _seed,
    _vqa_model_for,
    add_model_arguments,
)

EVAL_BUDGETS = "1.0,0.5,0.25,0.1"


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="accuracy on the procedural VQA benchmark for every method and budget",
        description=(
            "Ask --n procedural visual questions (exists, colour, count, position, digit; types balanced) of a "
            "LLaVA model trained on the benchmark, unpruned and under every (method, budget), and print "
            "accuracy overall, per question type and relative to full tokens, as in the papers' tables. "
            "Without --model the trained model shipped with vflowopt is used; a hub id is fetched into the "
            "Hugging Face cache (or read from it offline)."
        ),
    )
    p.add_argument("--model", metavar="DIR|ID",
                   help="a model folder written by `python -m training.vqa.train` (OUT/model, from a clone), or its "
                        "hub id; "
                        "default: the shipped trained model")
    p.add_argument("--methods", default="all", metavar="A,B,...|all",
                   help="comma-separated methods, or 'all' (default: every registered one)")
    p.add_argument("--budgets", default=EVAL_BUDGETS, metavar="B1,B2,...",
                   help=f"comma-separated budgets in (0, 1] (default: {EVAL_BUDGETS})")
    p.add_argument("--strategy", action="append", default=[], metavar="[LABEL=]FILE",
                   help="also evaluate a saved strategy (e.g. `vflowopt optimize` output), its row labelled LABEL "
                        "if given (e.g. auto=auto-budget0.25.json for the strategy `optimize --methods all` "
                        "chose); repeatable")
    p.add_argument("--n", type=_positive_int, default=1000, metavar="N", help="questions (default: 1000)")
    p.add_argument("--seed", type=_seed, default=0, help="question set seed (default: 0)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="scene split (default: test, never used in training)")
    p.add_argument("--batch-size", type=_positive_int, default=32, metavar="N", help="questions per forward")
    add_model_arguments(p)
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", metavar="OUT.json", type=_output_file,
                   help="write the result JSON (documented in vflowopt.vqa.evaluate)")
    p.set_defaults(func=_cmd_eval)


def _labelled(text: str) -> tuple[str | None, str]:
    """'LABEL=FILE' -> (LABEL, FILE); a plain FILE (even one whose name holds '=') -> (None, FILE)."""
    label, sep, path = text.partition("=")
    if sep and label and "/" not in label and "\\" not in label and not Path(text).exists():
        if not path:
            raise CLIError(f"--strategy {text}: no file after '{label}='")
        return label, path
    return None, text


def _cmd_eval(args: argparse.Namespace) -> int:
    import vflowopt

    methods, budgets = _method_budget_grid(args)
    strategies = [_labelled(text) for text in args.strategy]
    for _, path in strategies:
        try:
            vflowopt.load_config(path)
        except vflowopt.ConfigError as exc:
            raise CLIError(f"--strategy {path}: {exc}") from None

    import torch

    from vflowopt.vqa.evaluate import evaluate, format_table

    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor, model_dir = _vqa_model_for(args)  # checks the folder before building anything

    from vflowopt.progress import ProgressBar

    total = len(methods) * len(budgets) + len(strategies)
    with ProgressBar(total, "eval") as bar:  # on a terminal only; redirected, eval prints just the table
        def progress(record):
            acc = "refused" if record["accuracy"] is None else f"{record['accuracy']:.3f}"
            bar.update(advance=1, description=f"{record['method']} {record['budget']:g}: {acc}")

        result = evaluate(str(args.model or model_dir), methods, budgets, args.n, args.seed, args.split,
                          args.batch_size, args.device, model_and_processor=(model, processor), progress=progress,
                          strategies=strategies)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0
