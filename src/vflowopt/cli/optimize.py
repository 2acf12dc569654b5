"""`vflowopt optimize`: search a pruning strategy for a model and budget."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import (
    DEFAULT_METHOD,
    CLIError,
    _budget,
    _model_for,
    _note,
    _one_line,
    _output_file,
    _positive_int,
    _round,
    _seed,
    add_model_arguments,
)


def _add_optimize(sub: argparse._SubParsersAction) -> None:
    from ..search import DEFAULT_SAMPLES, DEFAULT_STARTUP_TRIALS, DEFAULT_STORAGE_FILE, DEFAULT_TRIALS

    p = sub.add_parser(
        "optimize",
        help="search the pruning strategy for a model and budget (Bayesian optimization)",
        description=(
            "Search the pruning strategy (R1, R2, t, alpha, a; R3 solved from the budget) that keeps the "
            "last prompt token's last-layer representation closest to the unpruned model's on a few "
            "unlabeled samples (VFlowOpt paper 3.3), with Optuna's GPSampler. The study lives in a "
            "storage (default: a SQLite file), so re-running the same command continues an interrupted "
            "search up to --trials. The best strategy is written as a JSON for `vflowopt run --strategy`. "
            "Without --model the small VQA model shipped with vflowopt is used; without --data the "
            "procedural sample scenes shipped with it. A hub id is fetched into the Hugging Face cache (or read "
            "from it offline)."
        ),
    )
    p.add_argument("--model", metavar="DIR|ID",
                   help="local model directory or hub id; default: the shipped VQA model (vflowopt/assets/vqa_model)")
    p.add_argument("--data", metavar="FILE.jsonl",
                   help='one {"image": path, "prompt": text} object per line (paths relative to the file); '
                        "default: the sample images shipped with vflowopt")
    p.add_argument("--budget", type=_budget, required=True, metavar="B",
                   help="mean fraction of visual tokens kept over the LLM layers, in (0, 1]")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--method", metavar="NAME", help=f"method to tune (default: {DEFAULT_METHOD})")
    which.add_argument("--methods", metavar="all|A,B,...",
                       help="search several methods (comma-separated, or 'all': every registered method that "
                            "can meet the budget) with the same objective and write the best strategy overall; "
                            "--trials is split between the methods that have something to tune")
    p.add_argument("--trials", type=_positive_int, default=DEFAULT_TRIALS, metavar="N",
                   help=f"total complete trials wanted in the study (default: {DEFAULT_TRIALS}); "
                        "a re-run continues up to it")
    p.add_argument("--samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"samples used (default: {DEFAULT_SAMPLES}); a seeded random subset of a larger file")
    p.add_argument("--storage", metavar="URL",
                   help=f"Optuna storage URL or SQLite file (default: {DEFAULT_STORAGE_FILE} next to --out)")
    p.add_argument("--study-name", metavar="NAME",
                   help="default: <method>-budget<B>; with --methods a prefix: <NAME>-<method> per method")
    p.add_argument("--out", metavar="FILE", type=_output_file,
                   help="strategy JSON to write (default: <study name>.json; with --methods auto-budget<B>.json)")
    p.add_argument("--keep-best", action="store_true",
                   help="write the best trial's strategy even when it scores below the method's default "
                        "strategy (by default the default is written then, and the output says so)")
    p.add_argument("--plot", metavar="FILE.png", type=_output_file,
                   help="write the optimization history, with --methods the ranking (needs matplotlib)")
    p.add_argument("--seed", type=_seed, default=0, help="makes the search reproducible (default: 0)")
    p.add_argument("--startup-trials", type=int, default=DEFAULT_STARTUP_TRIALS, metavar="N",
                   help=f"uniform (Sobol) trials before the Gaussian process takes over "
                        f"(default: {DEFAULT_STARTUP_TRIALS})")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=_cmd_optimize)


def _optimize_data(args: argparse.Namespace, console):
    """The calibration records (images opened), or a CLIError; warnings become one line each."""
    import warnings

    import vflowopt
    from vflowopt.search.data import load_jsonl, shipped_samples

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if args.data is None:
                records = shipped_samples(args.samples, args.seed)
            else:
                records = load_jsonl(args.data, args.samples, args.seed)
        except vflowopt.ConfigError as exc:
            raise CLIError(str(exc)) from None
    for w in caught:
        print(f"vflowopt: warning: {w.message}", file=sys.stderr)
    if args.data is None:
        _note(f"No --data given: using {len(records)} procedural sample scenes shipped with vflowopt.",
              args, console)
    return records


def _cmd_optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    import vflowopt

    console = Console()
    methods = None
    try:  # fail fast, before any model is loaded
        if args.methods is not None:
            from vflowopt.search.ranking import resolve_methods

            methods = resolve_methods(args.methods.split(",") if "," in args.methods else args.methods)
            vflowopt.config_for(methods[0], budget=args.budget)  # the budget, validated at construction
        else:
            args.method = args.method or DEFAULT_METHOD
            vflowopt.config_for(args.method, budget=args.budget)  # validated at construction
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    if args.startup_trials < 0:
        raise CLIError(f"--startup-trials must be >= 0, got {args.startup_trials}")
    records = _optimize_data(args, console)

    from vflowopt.search import default_study_name
    from vflowopt.tiny import build_inputs

    model, processor, model_name = _model_for(args, console)
    if methods is None:
        try:  # the method declares a search space that this model's depth can realise at this budget
            from vflowopt.models.base import adapter_for
            from vflowopt.search.space import space_for

            space_for(args.method, args.budget, adapter_for(model).num_llm_layers)
        except vflowopt.ConfigError as exc:
            raise CLIError(str(exc)) from None

    samples = []
    for rec in records:
        try:
            samples.append(build_inputs(processor, [rec.image], [rec.prompt]).to(args.device))
        except Exception as exc:  # noqa: BLE001 - a processor that cannot format this sample
            raise CLIError(f"line {rec.line}: the processor could not prepare the prompt and image: "
                           f"{_one_line(exc)}") from None

    if methods is None:
        study_name = args.study_name or default_study_name(args.method, args.budget)
        out = Path(args.out) if args.out else Path(f"{study_name}.json")
    else:
        study_name = args.study_name
        out = Path(args.out) if args.out else Path(f"auto-budget{args.budget:g}.json")
    try:
        if methods is None:
            report = _optimize_one(args, model, samples, study_name, out)
        else:
            report = _optimize_many(args, model, samples, methods, out, console)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    except vflowopt.PruningError as exc:
        raise CLIError(str(exc), code=1) from None
    except KeyboardInterrupt:
        where = f"study '{study_name}'" if methods is None else "the studies of the methods"
        raise CLIError(
            f"interrupted; every finished trial is kept in {where}: run the same command again to continue",
            code=130,
        ) from None
    report = {
        "model": model_name,
        "model_class": type(model).__name__,
        "random_weights": False,  # always False since the default is the trained VQA model; kept for JSON readers
        "data": args.data if args.data is not None else "shipped samples",
        **report,
        "out": str(out),
        "plot": args.plot,
    }
    if args.json:
        print(json.dumps(report))
    elif methods is None:
        _print_optimize_report(console, report)
    else:
        _print_ranking_report(console, report)
    return 0


def _optimize_one(args, model, samples, study_name: str, out: Path) -> dict:
    from vflowopt.search import run_optimization
    from vflowopt.search.plot import plot_history

    result = run_optimization(
        model, samples, args.budget, trials=args.trials, seed=args.seed, storage=args.storage,
        method=args.method, study_name=study_name, n_startup_trials=args.startup_trials,
        progress=not args.json, out=out, keep_best=args.keep_best,
    )
    if args.plot:
        plot_history(result, args.plot)
    strategy = {k: _round(v, 6) for k, v in result.config.to_dict().items() if k != "schema_version"}
    return {
        "samples": result.n_samples,
        "method": result.config.method,
        "budget": result.config.budget,
        "study": result.study_name,
        "storage": result.storage,
        "trials_complete": result.trials_complete,
        "trials_feasible": result.trials_feasible,
        "trials_new": result.trials_new,
        "trials_running_ignored": result.trials_running_ignored,
        "best_trial": result.best_trial,
        "objective": _round(result.value, 6),
        "default_objective": _round(result.default_value, 6),
        "default_refused": result.default_refused,
        "mean_retention": _round(result.mean_retention, 6),
        "search_space": result.space.summary(),
        "strategy": strategy,
        "written": result.written,
    }


def _optimize_many(args, model, samples, methods: list[str], out: Path, console) -> dict:
    from vflowopt.search import run_method_search
    from vflowopt.search.plot import plot_ranking

    def on_method(row) -> None:
        if args.json:
            return
        if row.status == "ok":
            text = f"{row.method}: mean cos {row.mean_cosine:.4f} ({row.source})"
        else:
            text = f"{row.method}: refused ({row.reason})"
        print(f"vflowopt: {text}", file=sys.stderr, flush=True)

    result = run_method_search(
        model, samples, args.budget, methods, trials=args.trials, seed=args.seed, storage=args.storage,
        study_name=args.study_name, n_startup_trials=args.startup_trials, progress=not args.json, out=out,
        keep_best=args.keep_best, on_method=on_method,
    )
    if args.plot:
        plot_ranking(result, args.plot)
    ranking = []
    for row in result.ranking:
        item = row.to_dict()
        for key in ("objective", "mean_cosine", "mean_retention"):
            item[key] = _round(item[key], 6)
        if item["strategy"] is not None:
            item["strategy"] = {k: _round(v, 6) for k, v in item["strategy"].items()}
        ranking.append(item)
    return {
        "samples": result.n_samples,
        "method": result.method,
        "methods": methods,
        "budget": result.budget,
        "storage": result.storage,
        "trials": args.trials,
        "trials_split": result.trials_split,
        "objective": _round(result.value, 6),
        "strategy": ranking[0]["strategy"],
        "ranking": ranking,
        "seconds": _round(result.seconds, 2),
    }


def _print_ranking_report(console, report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    n = report["samples"]
    table = Table(title=f"Methods ranked by the objective (mean cos over {n} samples, budget {report['budget']:g})",
                  title_justify="left")
    for name, justify in (("#", "right"), ("method", "left"), ("mean cos", "right"), ("strategy", "left"),
                          ("retention", "right"), ("trials", "right")):
        table.add_column(name, justify=justify)
    rank = 0
    for row in report["ranking"]:
        if row["status"] != "ok":
            table.add_row("-", row["method"], "refused", escape(row["reason"] or ""), "", "")
            continue
        rank += 1
        table.add_row(str(rank), row["method"], f"{row['mean_cosine']:.4f}",
                      escape(_strategy_text(row)), f"{row['mean_retention']:.3f}", str(row["trials"]))
    console.print(table)
    console.print(f"best: [bold]{escape(report['method'])}[/]; its strategy was written to {escape(report['out'])}"
                  + (f"; plot: {escape(report['plot'])}" if report["plot"] else "")
                  + f" (studies in {escape(report['storage'])}, {report['seconds']:.0f} s)")


_CONTEXT_FIELDS = ("method", "budget", "model_family", "num_layers", "positions", "image_mean", "image_std",
                   "vision_layer", "seed")


def _strategy_text(row: dict) -> str:
    """The searched / method-specific fields of a row's strategy, short."""
    source = row["source"]
    s = row["strategy"] or {}
    parts = []
    for key, value in s.items():
        if key in _CONTEXT_FIELDS:
            continue
        if isinstance(value, list):
            value = "[" + ", ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in value) + "]"
        elif isinstance(value, float):
            value = f"{value:.3g}"
        parts.append(f"{key}={value}")
    label = {"untuned": "nothing to tune", "default": "default"}.get(source, f"best {source}")
    return f"{label}: " + (", ".join(parts) if parts else "-")


def _print_optimize_report(console, report: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    n = report["samples"]
    s = report["strategy"]
    table = Table(title="Best strategy found", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", escape(f"{report['model']} ({report['model_class']})"))
    table.add_row("method / budget", f"{report['method']} / {report['budget']:g}")
    table.add_row("study", escape(f"{report['study']} in {report['storage']}"))
    infeasible = report["trials_complete"] - report["trials_feasible"]
    table.add_row("trials", f"{report['trials_complete']} complete ({report['trials_new']} this run), "
                            f"{infeasible} infeasible; best: trial {report['best_trial']}")
    if report["trials_running_ignored"]:
        table.add_row("  ignored", f"{report['trials_running_ignored']} trial(s) left RUNNING (killed runs)")
    table.add_row("objective (best)", f"{report['objective']:.4f} of {n} (mean cos {report['objective'] / n:.4f})")
    if report["default_objective"] is None:
        table.add_row("objective (default)",
                      escape(f"the default strategy cannot run here: {report['default_refused']}"))
    else:
        table.add_row("objective (default)", f"{report['default_objective']:.4f} of {n} "
                                             f"(mean cos {report['default_objective'] / n:.4f}; "
                                             f"{report['method']} defaults at budget {report['budget']:g})")
    if "retention" in s:
        table.add_row("retention R1, R2, R3", ", ".join(f"{r:.4f}" for r in s["retention"]))
    for key, label in (("stage_layers", "stage layers"), ("threshold", "threshold t"),
                       ("entropy_weight", "entropy weight α"), ("grid_size", "grid size a")):
        if key in s:
            value = s[key]
            table.add_row(label, ", ".join(map(str, value)) if isinstance(value, list) else f"{value:.4g}")
    if report["written"] == "default":
        table.add_row("[yellow]note[/]", "the best trial scored below the method's default strategy, so the "
                                         "default strategy was written (--keep-best writes the best trial's)")
    table.add_row("written to", escape(report["out"]) + (f"; plot: {escape(report['plot'])}" if report["plot"] else ""))
    console.print(table)
