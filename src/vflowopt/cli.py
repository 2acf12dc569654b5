"""The `vflowopt` command.

`vflowopt run` prunes one prompt on a local model (or, with no --model, on the bundled tiny randomly
initialised model) and shows what pruning did. `vflowopt optimize` searches a pruning strategy for a
model and budget (VFlowOpt paper 3.3) and writes it as a strategy JSON for `run --strategy`. Every
subcommand is one `_add_<name>` function that registers its parser and sets `func`; `main` only
parses and dispatches, so `optimize` and `bench` slot in the same way.

Exit codes: 0 success, 1 a forward the runtime could not prune, 2 bad arguments, a bad config or
strategy, or a model/image that could not be loaded, 130 an optimization interrupted by Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_METHOD = "vflowopt"
DEFAULT_BUDGET = 0.25
DEFAULT_MAX_NEW_TOKENS = 32
TINY_MODEL_NAME = "bundled tiny-llava-onevision"
EXAMPLE_IMAGE = "vflowopt/assets/example.png"
NO_HUB = "local files only; no hub downloads are attempted"


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------------
# Parser
# ---------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _budget(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vflowopt",
        description="Visual-token pruning for Hugging Face transformers multimodal models.",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    _add_run(sub)
    _add_optimize(sub)
    _add_bench(sub)
    return parser


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="answer one prompt with pruning attached and show what pruning did",
        description=(
            "Answer one prompt about one image with visual-token pruning attached, and report the "
            "strategy, the tokens kept at every stage, the KV-cache lengths and the timings. "
            "Without --model the bundled tiny RANDOMLY INITIALISED model is used (meaningless "
            "answers; it shows the mechanics only). Models are read from local directories only; "
            "nothing is downloaded."
        ),
    )
    p.add_argument("--model", metavar="DIR",
                   help="local model directory (AutoModelForImageTextToText + AutoProcessor); "
                        "default: the bundled tiny random LLaVA-OneVision")
    p.add_argument("--image", metavar="FILE", help=f"image file; default: the bundled {EXAMPLE_IMAGE}")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question about the image")
    p.add_argument("--method", metavar="NAME",
                   help=f"pruning method (default: {DEFAULT_METHOD}); see vflowopt.available_methods()")
    p.add_argument("--budget", type=_budget, metavar="B",
                   help=f"mean fraction of visual tokens kept over the LLM layers, in (0, 1] "
                        f"(default: {DEFAULT_BUDGET}); not with --strategy")
    p.add_argument("--strategy", metavar="FILE", help="a saved config (JSON written by cfg.save)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"tokens to generate (default: {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--positions", choices=("keep", "compact"),
                   help="keep the original position ids (default) or renumber after the pre-LLM stage "
                        "as the official code does")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=_cmd_run)


def main(argv: Sequence[str] | None = None) -> int:
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


def _error(message: str) -> None:
    print(f"vflowopt: error: {message}", file=sys.stderr)


def _note(message: str, args: argparse.Namespace, console, style: str | None = None) -> None:
    """Notices go to stdout with the tables, or to stderr when stdout carries JSON."""
    if args.json:
        print(f"vflowopt: {message}", file=sys.stderr)
    else:
        console.print(message, style=style, markup=False, highlight=False)


# ---------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------


def _run_config(args: argparse.Namespace):
    """The config to apply, validated before anything heavy is loaded."""
    import vflowopt

    try:
        if args.strategy is not None:
            if args.budget is not None:
                raise CLIError(
                    "--budget cannot be combined with --strategy: the strategy file fixes the budget "
                    "(edit the file, or drop --strategy to use --budget)"
                )
            cfg = vflowopt.load_config(args.strategy)
            if args.method is not None and args.method != cfg.method:
                raise CLIError(
                    f"--method {args.method} contradicts the strategy file {args.strategy}, which is for "
                    f"method '{cfg.method}'"
                )
            if args.positions is not None:
                if not any(f.name == "positions" for f in dataclasses.fields(cfg)):
                    raise CLIError(f"method '{cfg.method}' has no positions option")
                cfg = dataclasses.replace(cfg, positions=args.positions)
        else:
            method = args.method if args.method is not None else DEFAULT_METHOD
            budget = args.budget if args.budget is not None else DEFAULT_BUDGET
            kwargs: dict[str, Any] = {"budget": budget}
            if args.positions is not None:
                kwargs["positions"] = args.positions
            try:
                cfg = vflowopt.config_for(method, **kwargs)
            except TypeError as exc:  # a method without one of these options
                raise CLIError(f"method '{method}' does not accept these options: {exc}") from None
        cfg.validate()
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    return cfg


def _load_image(path: str | None):
    from PIL import Image, UnidentifiedImageError

    if path is None:
        with resources.files("vflowopt").joinpath("assets", "example.png").open("rb") as fh:
            return Image.open(fh).convert("RGB")
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"image file not found: {path}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CLIError(f"cannot read image {path}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _processor_class_name(path: Path) -> str | None:
    """The processor class a model directory asks for (its JSON files, else the model type's default)."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get("processor_class")
            except (OSError, ValueError, AttributeError):
                value = None
            if isinstance(value, str) and value:
                return value
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    except (OSError, ValueError, AttributeError, ImportError):
        return None
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return name if isinstance(name, str) else None


def _processor_from_parts(path: Path):
    """Build the processor from its image processor and tokenizer, with no video processor.

    transformers 5.23 cannot build a video processor (nor type-check an empty video slot) without
    torchvision, which makes AutoProcessor fail for e.g. LLaVA-OneVision. Like `tiny.py`, we use a
    subclass of the model's own processor class that accepts `video_processor=None`; images and text
    work, videos do not.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    name = _processor_class_name(path)
    base = getattr(transformers, name, None) if name else None
    if base is None or not hasattr(base, "get_attributes"):
        raise ValueError(f"cannot tell which processor class to build (found {name!r})")

    class _NoVideoProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    _NoVideoProcessor.__name__ = _NoVideoProcessor.__qualname__ = base.__name__

    parts = []
    for attribute in _NoVideoProcessor.get_attributes():
        if attribute == "image_processor":
            parts.append(AutoImageProcessor.from_pretrained(path, local_files_only=True))
        elif attribute == "tokenizer":
            parts.append(AutoTokenizer.from_pretrained(path, local_files_only=True))
        elif attribute == "video_processor":
            parts.append(None)
        else:
            raise ValueError(f"{base.__name__} needs a '{attribute}', which vflowopt cannot build without it")
    processor_dict, extra = _NoVideoProcessor.get_processor_dict(path, local_files_only=True)
    return _NoVideoProcessor.from_args_and_dict(parts, processor_dict, **extra)


def _load_model(directory: str):
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise CLIError(f"model directory not found: {directory} (--model takes a local directory; {NO_HUB})")
    if not (path / "config.json").is_file():
        raise CLIError(f"{directory} has no config.json, so it is not a saved transformers model ({NO_HUB})")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
        raise CLIError(f"could not load a model from {directory}: {_one_line(exc)} ({NO_HUB})") from None
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as auto_exc:  # noqa: BLE001
        try:
            processor = _processor_from_parts(path)
        except Exception as parts_exc:  # noqa: BLE001
            raise CLIError(
                f"could not load the processor from {directory}: {_one_line(auto_exc)}; building it from "
                f"its image processor and tokenizer failed too: {_one_line(parts_exc)} ({NO_HUB})"
            ) from None
    if getattr(processor, "tokenizer", None) is None:
        raise CLIError(f"the processor loaded from {directory} has no tokenizer")
    model.eval()
    return model, processor


def _layer_ranges(values: Sequence[int]) -> str:
    """[56, 56, 56, 42] -> 'layers 0-2: 56, 3: 42'."""
    parts = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{span}: {values[start]}")
            start = i
    return ("layers " + ", ".join(parts)) if parts else "-"


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    return value


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    cfg = _run_config(args)  # fails fast, before any model is loaded

    import torch

    import vflowopt
    from vflowopt.tiny import build_inputs, tiny_llava_onevision

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    image = _load_image(args.image)
    random_weights = args.model is None
    if random_weights:
        _note(
            "Using the bundled tiny RANDOMLY INITIALISED model: its answers are meaningless; it "
            "demonstrates the pruning mechanics only. Pass --model DIR for a real model.",
            args, console, style="bold yellow",
        )
        model, processor = tiny_llava_onevision()
        model_name = TINY_MODEL_NAME
    else:
        model, processor = _load_model(args.model)
        model_name = args.model
    if args.image is None:
        _note(f"No --image given: using the bundled example picture ({EXAMPLE_IMAGE}).", args, console)
    model.to(args.device)

    try:
        inputs = build_inputs(processor, [image], [args.prompt]).to(args.device)
    except Exception as exc:  # noqa: BLE001 - a processor that cannot format this prompt
        raise CLIError(f"the processor could not prepare the prompt and image: {_one_line(exc)}") from None
    prompt_len = int(inputs["input_ids"].shape[1])

    try:
        handle = vflowopt.prune(model, cfg)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    try:
        try:
            # Generation first: it also warms up, so the prefill timed below excludes one-time costs.
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            _sync(args.device)
            generate_ms = 1000.0 * (time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.inference_mode():
                model(**inputs, logits_to_keep=1)
            _sync(args.device)
            prefill_ms = 1000.0 * (time.perf_counter() - t0)
        except vflowopt.ConfigError as exc:
            raise CLIError(str(exc)) from None
        except vflowopt.PruningError as exc:
            raise CLIError(str(exc), code=1) from None
        stats = handle.stats
        resolved = handle.config
    finally:
        handle.remove()

    new_tokens = out[0, prompt_len:]
    answer = processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    strategy = {k: _round(v) for k, v in resolved.to_dict().items() if k != "schema_version"}
    report = {
        "model": model_name,
        "model_class": type(model).__name__,
        "random_weights": random_weights,
        "image": args.image if args.image is not None else EXAMPLE_IMAGE,
        "prompt": args.prompt,
        "answer": answer,
        "new_tokens": int(new_tokens.numel()),
        "method": resolved.method,
        "budget": _round(resolved.budget),
        "strategy": strategy,
        "visual_tokens": stats.visual_tokens,
        "stages": [{"stage": name, "visual_tokens_kept": n} for name, n in stats.stages],
        "recycled_tokens": stats.recycled_tokens,
        "prompt_tokens": stats.prompt_tokens,
        "tokens_into_llm": stats.tokens_into_llm,
        "visual_tokens_per_layer": list(stats.visual_tokens_per_layer),
        "kv_tokens_per_layer": list(stats.kv_tokens_per_layer),
        "mean_retention": _round(stats.mean_retention),
        "prefill_ms": _round(prefill_ms, 2),
        "pruning_ms": _round(stats.pruning_ms, 2),
        "generate_ms": _round(generate_ms, 2),
        "device": args.device,
    }
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(console, report, stats)
    return 0


def _print_report(console, report: dict, stats) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    answer = report["answer"] or "(empty)"
    title = "Answer (random weights: meaningless)" if report["random_weights"] else "Answer"
    console.print(Panel(escape(answer), title=title, title_align="left", expand=False))

    s = report["strategy"]
    n_vis = report["visual_tokens"]
    table = Table(title="What pruning did", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", escape(f"{report['model']} ({report['model_class']})"))
    table.add_row("method / budget", f"{report['method']} / {report['budget']}")
    if "retention" in s:
        table.add_row("retention R1, R2, R3", ", ".join(f"{r:.4g}" for r in s["retention"]))
    for key, label in (("stage_layers", "stage layers"), ("threshold", "threshold t"),
                       ("entropy_weight", "entropy weight α"), ("grid_size", "grid size a"),
                       ("positions", "positions")):
        if key in s:
            value = s[key]
            table.add_row(label, ", ".join(map(str, value)) if isinstance(value, list) else str(value))
    table.add_row("visual tokens produced", str(n_vis))
    if stats.stages:
        table.add_row("visual tokens kept", ", ".join(f"{name}: {n}" for name, n in stats.stages))
        table.add_row("  of which recycled", str(report["recycled_tokens"]))
    table.add_row("tokens into the LLM", f"{report['tokens_into_llm']} of {report['prompt_tokens']} prompt tokens")
    table.add_row("KV tokens per layer", _layer_ranges(report["kv_tokens_per_layer"]))
    table.add_row("mean retention", f"{report['mean_retention']:.4f}")
    table.add_row("prefill", f"{report['prefill_ms']:.1f} ms")
    table.add_row("pruning overhead", f"{report['pruning_ms']:.1f} ms (within the prefill)")
    table.add_row("generation", f"{report['generate_ms']:.1f} ms for {report['new_tokens']} new tokens")
    console.print(table)


# ---------------------------------------------------------------------------------------------------
# optimize
# ---------------------------------------------------------------------------------------------------


def _add_optimize(sub: argparse._SubParsersAction) -> None:
    from .search import DEFAULT_SAMPLES, DEFAULT_STARTUP_TRIALS, DEFAULT_STORAGE_FILE, DEFAULT_TRIALS

    p = sub.add_parser(
        "optimize",
        help="search the pruning strategy for a model and budget (Bayesian optimization)",
        description=(
            "Search the pruning strategy (R1, R2, t, alpha, a; R3 solved from the budget) that keeps the "
            "last prompt token's last-layer representation closest to the unpruned model's on a few "
            "unlabeled samples (VFlowOpt paper 3.3), with Optuna's GPSampler. The study lives in a "
            "storage (default: a SQLite file), so re-running the same command continues an interrupted "
            "search up to --trials. The best strategy is written as a JSON for `vflowopt run --strategy`. "
            "Without --model the bundled tiny RANDOMLY INITIALISED model is used; without --data the "
            "procedural sample images shipped with vflowopt. Nothing is downloaded."
        ),
    )
    p.add_argument("--model", metavar="DIR",
                   help="local model directory; default: the bundled tiny random LLaVA-OneVision")
    p.add_argument("--data", metavar="FILE.jsonl",
                   help='one {"image": path, "prompt": text} object per line (paths relative to the file); '
                        "default: the sample images shipped with vflowopt")
    p.add_argument("--budget", type=_budget, required=True, metavar="B",
                   help="mean fraction of visual tokens kept over the LLM layers, in (0, 1]")
    p.add_argument("--method", default=DEFAULT_METHOD, metavar="NAME",
                   help=f"method to tune (default: {DEFAULT_METHOD})")
    p.add_argument("--trials", type=_positive_int, default=DEFAULT_TRIALS, metavar="N",
                   help=f"total complete trials wanted in the study (default: {DEFAULT_TRIALS}); "
                        "a re-run continues up to it")
    p.add_argument("--samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N",
                   help=f"samples used (default: {DEFAULT_SAMPLES}); a seeded random subset of a larger file")
    p.add_argument("--storage", metavar="URL",
                   help=f"Optuna storage URL or SQLite file (default: {DEFAULT_STORAGE_FILE} next to --out)")
    p.add_argument("--study-name", metavar="NAME", help="default: <method>-budget<B>")
    p.add_argument("--out", metavar="FILE", help="strategy JSON to write (default: <study name>.json)")
    p.add_argument("--plot", metavar="FILE.png", help="write the optimization history (needs matplotlib)")
    p.add_argument("--seed", type=int, default=0, help="makes the search reproducible (default: 0)")
    p.add_argument("--startup-trials", type=int, default=DEFAULT_STARTUP_TRIALS, metavar="N",
                   help=f"uniform (Sobol) trials before the Gaussian process takes over "
                        f"(default: {DEFAULT_STARTUP_TRIALS})")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
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
        _note(f"No --data given: using {len(records)} procedural sample images shipped with vflowopt.",
              args, console)
    return records


def _cmd_optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    import vflowopt

    console = Console()
    try:  # fail fast, before any model is loaded
        cfg = vflowopt.config_for(args.method, budget=args.budget)
        cfg.validate()
        from vflowopt.search.space import space_for

        space_for(args.method, args.budget, 3)  # the method declares a search space
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    if args.startup_trials < 0:
        raise CLIError(f"--startup-trials must be >= 0, got {args.startup_trials}")
    records = _optimize_data(args, console)

    import torch

    from vflowopt.search import default_study_name, run_optimization
    from vflowopt.search.plot import plot_history
    from vflowopt.tiny import build_inputs, tiny_llava_onevision

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    random_weights = args.model is None
    if random_weights:
        _note("Using the bundled tiny RANDOMLY INITIALISED model: the strategy found is meaningless for any "
              "real model; it demonstrates the search only. Pass --model DIR for a real model.",
              args, console, style="bold yellow")
        model, processor = tiny_llava_onevision()
        model_name = TINY_MODEL_NAME
    else:
        model, processor = _load_model(args.model)
        model_name = args.model
    model.to(args.device)

    samples = []
    for rec in records:
        try:
            samples.append(build_inputs(processor, [rec.image], [rec.prompt]).to(args.device))
        except Exception as exc:  # noqa: BLE001 - a processor that cannot format this sample
            raise CLIError(f"line {rec.line}: the processor could not prepare the prompt and image: "
                           f"{_one_line(exc)}") from None

    study_name = args.study_name or default_study_name(args.method, args.budget)
    out = Path(args.out) if args.out else Path(f"{study_name}.json")
    try:
        result = run_optimization(
            model, samples, args.budget, trials=args.trials, seed=args.seed, storage=args.storage,
            method=args.method, study_name=study_name, n_startup_trials=args.startup_trials,
            progress=True, out=out,
        )
        if args.plot:
            plot_history(result, args.plot)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    except vflowopt.PruningError as exc:
        raise CLIError(str(exc), code=1) from None
    except KeyboardInterrupt:
        raise CLIError(
            f"interrupted; every finished trial is kept in study '{study_name}': run the same command again "
            "to continue", code=130,
        ) from None

    strategy = {k: _round(v, 6) for k, v in result.config.to_dict().items() if k != "schema_version"}
    report = {
        "model": model_name,
        "model_class": type(model).__name__,
        "random_weights": random_weights,
        "data": args.data if args.data is not None else "shipped samples",
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
        "search_space": result.space.summary(),
        "strategy": strategy,
        "out": str(out),
        "plot": args.plot,
    }
    if args.json:
        print(json.dumps(report))
    else:
        _print_optimize_report(console, report)
    return 0


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
    table.add_row("written to", escape(report["out"]) + (f"; plot: {escape(report['plot'])}" if report["plot"] else ""))
    console.print(table)


# ---------------------------------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------------------------------

BENCH_BUDGETS = "1.0,0.5,0.25,0.1"
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.pt", "*.pth")


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench.realmodels import REAL_MODELS

    p = sub.add_parser(
        "bench",
        help="measure FLOPs, KV cache, latency, memory and fidelity of methods at budgets",
        description=(
            "Measure every method at every budget on one model and one input, the same way for all: "
            "analytic prefill FLOPs (2 x multiply-adds), KV-cache bytes after prefill, prefill and "
            "end-to-end latency (median of --repeats after warm-up), peak memory, pruning overhead, and "
            "fidelity to the unpruned model (cosine of the last hidden state, next-token KL, greedy "
            "token agreement). --model takes a local directory or one of the shipped architectures "
            f"({', '.join(REAL_MODELS)}), built with RANDOM weights for timing at real scale. Without "
            "--model the bundled tiny random LLaVA-OneVision is used. Nothing is downloaded."
        ),
    )
    p.add_argument("--model", metavar="DIR|NAME",
                   help="local model directory, or a shipped architecture name; default: the bundled tiny model")
    p.add_argument("--methods", metavar="A,B,...",
                   help="comma-separated methods (default: every registered one); see vflowopt.available_methods()")
    p.add_argument("--budgets", default=BENCH_BUDGETS, metavar="B1,B2,...",
                   help=f"comma-separated budgets in (0, 1] (default: {BENCH_BUDGETS})")
    p.add_argument("--images", nargs="+", metavar="FILE",
                   help="image file(s), all in one prompt; default: a procedural picture (see --image-size)")
    p.add_argument("--num-images", type=_positive_int, default=1, metavar="K",
                   help="without --images: how many procedural pictures to put in the prompt (default: 1)")
    p.add_argument("--image-size", type=_positive_int, metavar="PX",
                   help="without --images: side of the procedural pictures (default: the vision tower's "
                        "input size; 448 for Qwen-VL)")
    p.add_argument("--prompt", default="Describe the image in detail.", metavar="TEXT", help="the text prompt")
    p.add_argument("--new-tokens", type=_positive_int, default=8, metavar="N",
                   help="tokens generated for end-to-end latency and token agreement (default: 8)")
    p.add_argument("--repeats", type=_positive_int, default=3, metavar="R", help="timed runs per cell (default: 3)")
    p.add_argument("--warmup", type=int, default=1, metavar="W", help="untimed runs per cell first (default: 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    p.add_argument("--dtype", choices=tuple(_DTYPES),
                   help="weights and activations (default: fp32 on cpu, bf16 on cuda)")
    p.add_argument("--threads", type=_positive_int, metavar="N", help="torch.set_num_threads (default: torch's)")
    p.add_argument("--json", metavar="OUT.json", help="write the records (updated after every cell)")
    p.add_argument("--csv", metavar="OUT.csv", help="write the records as CSV (updated after every cell)")
    p.add_argument("--plot", metavar="OUT.png", help="plot speedup and fidelity against budget")
    p.add_argument("--allow-random", action="store_true",
                   help="accept a model directory holding only a config: random weights, meaningless fidelity")
    p.set_defaults(func=_cmd_bench)


def _split_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise CLIError(f"--{what} needs at least one value")
    return items


def _bench_grid(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    import vflowopt
    from vflowopt.bench.run import validate_grid

    methods = None if args.methods is None else _split_list(args.methods, "methods")
    budgets = []
    for text in _split_list(args.budgets, "budgets"):
        try:
            budgets.append(float(text))
        except ValueError:
            raise CLIError(f"budget must be a number in (0, 1], got {text!r}") from None
    try:
        return validate_grid(methods, budgets)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    except TypeError as exc:  # a method whose config takes no budget
        raise CLIError(f"a method does not accept a budget: {exc}") from None


def _has_weights(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in _WEIGHT_FILES)


def _bench_model(args: argparse.Namespace, dtype):
    """(model, processor, name, random_weights), on args.device in `dtype`, or a CLIError."""
    import torch

    from vflowopt.bench.realmodels import (
        REAL_MODELS,
        build_random_model,
        load_real_config,
        offline_processor,
        set_generation_ids,
    )

    if args.model is None:
        from vflowopt.tiny import tiny_llava_onevision

        model, processor = tiny_llava_onevision()
        return model.to(args.device, dtype), processor, TINY_MODEL_NAME, True
    if args.model in REAL_MODELS:
        config = load_real_config(args.model)
        processor = offline_processor(config, args.model)
        model = build_random_model(config, dtype=dtype, device=args.device)
        set_generation_ids(model, processor)
        return model, processor, f"{args.model} (shipped architecture, random weights)", True
    path = Path(args.model).expanduser()
    if not path.is_dir():
        raise CLIError(f"model directory not found: {args.model} (--model takes a local directory or one of "
                       f"{', '.join(REAL_MODELS)}; {NO_HUB})")
    if not (path / "config.json").is_file():
        raise CLIError(f"{args.model} has no config.json, so it is not a saved transformers model ({NO_HUB})")
    if _has_weights(path):
        model, processor = _load_model(args.model)
        return model.to(args.device, dtype), processor, args.model, False
    if not args.allow_random:
        raise CLIError(f"{args.model} holds a config but no weights; pass --allow-random to benchmark it with "
                       "random weights (timing only: fidelity is then meaningless)")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"could not read the config in {args.model}: {_one_line(exc)}") from None
    try:
        processor = _processor_from_parts(path)
    except Exception:  # noqa: BLE001 - no processor files: build one offline from the config
        try:
            processor = offline_processor(config)
        except Exception as exc:  # noqa: BLE001
            raise CLIError(f"no processor in {args.model} and none can be built offline: {_one_line(exc)}") from None
    try:
        model = build_random_model(config, dtype=dtype, device=args.device)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise CLIError(f"out of memory building {args.model} with random weights: {_one_line(exc)}") from None
    except Exception as exc:  # noqa: BLE001
        raise CLIError(f"could not build a model from {args.model}/config.json: {_one_line(exc)}") from None
    if getattr(processor.tokenizer, "image_token_id", None) is not None and hasattr(processor, "image_token"):
        set_generation_ids(model, processor)
    return model, processor, f"{args.model} (random weights)", True


def _bench_images(args: argparse.Namespace, model) -> tuple[list, dict]:
    from vflowopt.tiny import example_image

    if args.images:
        return [_load_image(f) for f in args.images], {"images": list(args.images)}
    vc = model.config.vision_config
    qwen = str(getattr(vc, "model_type", "")).startswith("qwen")
    side = args.image_size or (448 if qwen else int(vc.image_size))
    images = [example_image(seed=i, size=(side, side)) for i in range(args.num_images)]
    return images, {"images": f"{args.num_images} procedural picture(s) of {side}x{side} px"}


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console() if sys.stdout.isatty() else Console(width=200)
    methods, budgets = _bench_grid(args)  # fails fast, before any model is loaded
    if args.warmup < 0:
        raise CLIError(f"--warmup must be >= 0, got {args.warmup}")
    if args.images:
        for f in args.images:
            if not Path(f).is_file():
                raise CLIError(f"image file not found: {f}")

    import torch

    import vflowopt
    from vflowopt.bench.report import RANDOM_WEIGHTS_NOTE, bench_meta, plot_bench, print_table, write_csv, write_json
    from vflowopt.bench.run import run_bench
    from vflowopt.tiny import build_inputs

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = getattr(torch, _DTYPES[dtype_name])
    model, processor, model_name, random_weights = _bench_model(args, dtype)
    try:
        vflowopt.models.base.adapter_for(model)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    images, inputs_info = _bench_images(args, model)
    try:
        inputs = build_inputs(processor, images, [args.prompt])
    except Exception as exc:  # noqa: BLE001 - a processor that cannot format this prompt
        raise CLIError(f"the processor could not prepare the prompt and images: {_one_line(exc)}") from None
    if "pixel_values" in inputs and torch.is_floating_point(inputs["pixel_values"]):
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    image_id = vflowopt.models.base.adapter_for(model).image_token_id
    inputs_info.update(prompt=args.prompt, prompt_tokens=int(inputs["input_ids"].shape[1]),
                       image_tokens=int((inputs["input_ids"] == image_id).sum()))
    meta = bench_meta(model, model_name=model_name, device=args.device, random_weights=random_weights,
                      new_tokens=args.new_tokens, repeats=args.repeats, warmup=args.warmup, inputs_info=inputs_info)
    if random_weights:
        console.print(f"{RANDOM_WEIGHTS_NOTE} ({model_name}); timings, FLOPs and memory are valid.",
                      style="bold yellow", markup=False, highlight=False)
    console.print(f"{model_name}: {inputs_info['prompt_tokens']} prompt tokens, {inputs_info['image_tokens']} image "
                  f"tokens; {len(methods)} method(s) x {len(budgets)} budget(s) + unpruned reference",
                  markup=False, highlight=False)

    records: list = []

    def save(record) -> None:
        records.append(record)
        if args.json:
            write_json(args.json, records, meta)
        if args.csv:
            write_csv(args.csv, records, meta)

    try:
        run_bench(model, inputs, methods, budgets, new_tokens=args.new_tokens, repeats=args.repeats,
                  warmup=args.warmup, random_weights=random_weights, progress=True, on_record=save)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    except KeyboardInterrupt:
        raise CLIError(f"interrupted after {len(records)} record(s); those are in the --json/--csv outputs",
                       code=130) from None
    except Exception as exc:  # noqa: BLE001 - the unpruned reference itself failed (e.g. out of memory)
        raise CLIError(f"the unpruned reference run failed: {_one_line(exc)}", code=1) from None
    print_table(console, records, meta)
    if args.plot:
        plot_bench(args.plot, records, meta)
    written = [x for x in (args.json, args.csv, args.plot) if x]
    if written:
        console.print("wrote " + ", ".join(written), markup=False, highlight=False)
    failed = [r for r in records if r.error]
    if failed:
        _error(f"{len(failed)} cell(s) failed (recorded with their error): "
               + "; ".join(f"{r.method}@{r.budget:g}: {r.error}" for r in failed[:3]))
        # out of memory, or a budget a method cannot reach on this model (ConfigError), is a result;
        # anything else is a failure of the method on this model
        if any(not r.error.startswith(("out of memory", "ConfigError")) for r in failed):
            return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
