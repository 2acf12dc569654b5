"""`vflowopt run`: answer one prompt with pruning attached and show what pruning did."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .common import (
    DEFAULT_BUDGET,
    DEFAULT_METHOD,
    SAMPLE_SCENE,
    CLIError,
    _budget,
    _image_tokens_note,
    _layer_ranges,
    _load_image,
    _model_for,
    _note,
    _one_line,
    _positive_int,
    _prompt_text,
    _round,
    _shipped_sample,
    _sync,
    add_model_arguments,
)

DEFAULT_MAX_NEW_TOKENS = 32
STRATEGY_FILE = "vflowopt_strategy.json"  # a model folder's own strategy, used when none is asked for
PREFILL_REPEATS = 3


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="answer one prompt with pruning attached and show what pruning did",
        description=(
            "Answer one prompt about one image with visual-token pruning attached, and report the "
            "strategy, the tokens kept at every stage, the KV-cache lengths and the timings. "
            "Without --model the small LLaVA trained on vflowopt's procedural VQA scenes is used (it "
            "answers one-word questions about such scenes); without --image and --prompt, a shipped "
            "sample scene and its question. --model takes a local directory or a hub id (fetched into the "
            "Hugging Face cache, or read from it offline)."
        ),
    )
    p.add_argument("--model", metavar="DIR|ID",
                   help="local model directory or hub id (AutoModelForImageTextToText + AutoProcessor); "
                        "default: the shipped VQA model (vflowopt/assets/vqa_model)")
    p.add_argument("--image", metavar="FILE", help=f"image file; default: the shipped sample scene {SAMPLE_SCENE}")
    p.add_argument("--prompt", metavar="TEXT", type=_prompt_text,
                   help="the question about the image; default (only without --image): the sample scene's question")
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
    p.add_argument("--compare", action="store_true",
                   help="also answer without pruning and show both side by side: the answer, tokens into the "
                        "LLM, KV-cache bytes and prefill time (median of 3) of each")
    add_model_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=_cmd_run)


def _model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return Path(args.model).expanduser()
    from vflowopt.vqa.model import shipped_model_path

    return shipped_model_path()


def _run_config(args: argparse.Namespace):
    """(config, where it came from), validated before anything heavy is loaded.

    With none of --method, --budget and --strategy: the strategy shipped in the model folder
    (vflowopt_strategy.json, e.g. the one `vflowopt optimize --methods all` found for the shipped model),
    else VFlowOpt's default strategy at the default budget."""
    import vflowopt

    if args.strategy is None and args.method is None and args.budget is None:
        shipped = _model_dir(args) / STRATEGY_FILE
        if shipped.is_file():
            try:
                cfg = vflowopt.load_config(shipped)
                if args.positions is not None:
                    if not any(f.name == "positions" for f in dataclasses.fields(cfg)):
                        raise CLIError(f"method '{cfg.method}' (the strategy shipped with the model) has no "
                                       "positions option")
                    cfg = dataclasses.replace(cfg, positions=args.positions)
            except vflowopt.ConfigError as exc:
                raise CLIError(f"the strategy shipped with the model ({shipped}): {exc}") from None
            return cfg, (f"shipped with the model ({STRATEGY_FILE}); give --method, --budget or --strategy "
                         "for another")
    try:
        if args.strategy is not None:
            if args.budget is not None:
                raise CLIError(
                    "--budget cannot be combined with --strategy: the strategy file fixes the budget "
                    "(edit the file, or drop --strategy to use --budget)"
                )
            cfg = vflowopt.load_config(args.strategy)
            source = f"--strategy {args.strategy}"
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
            if args.method is None and args.budget is None:
                source = (f"{DEFAULT_METHOD}'s default strategy at budget {DEFAULT_BUDGET:g} (the model folder "
                          f"has no {STRATEGY_FILE})")
            else:
                source = f"{method}'s default strategy at budget {budget:g}"
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
    return cfg, source


def _prepare(args: argparse.Namespace, console, cfg, *, announce: bool = True,
             check_image: Callable[[str], None] | None = None):
    """The picture and prompt (default: the shipped sample scene and its question, announced when
    `announce`), the model, and the processor's inputs on args.device, or a CLIError for a bad one.
    Returns (image, expected answer or None, model, processor, model name, inputs); shared by run and show."""
    from vflowopt.tiny import build_inputs

    expected = None
    if args.image is None:
        sample = _shipped_sample()
        image = sample["image"]
        if args.prompt is None:
            args.prompt, expected = sample["prompt"], sample.get("answer")
        if announce:
            _note(f"No --image given: using the shipped sample scene ({SAMPLE_SCENE})"
                  + (f" and its question: {args.prompt!r}." if expected is not None else "."), args, console)
    elif args.prompt is None:
        raise CLIError("--prompt is required with --image (only the shipped sample scene has a default question)")
    else:
        if check_image is not None:
            check_image(args.image)
        image = _load_image(args.image)
    model, processor, model_name = _model_for(args, console, strategy=cfg)
    try:
        inputs = build_inputs(processor, [image], [args.prompt]).to(args.device)
    except Exception as exc:  # noqa: BLE001 - a processor that cannot format this prompt
        raise CLIError(f"the processor could not prepare the prompt and image: {_one_line(exc)}") from None
    _image_tokens_note([image], inputs, model)
    return image, expected, model, processor, model_name, inputs


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    cfg, source = _run_config(args)  # fails fast, before any model is loaded

    import vflowopt

    image, expected, model, processor, model_name, inputs = _prepare(args, console, cfg)
    prompt_len = int(inputs["input_ids"].shape[1])

    try:
        handle = vflowopt.prune(model, cfg)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    try:
        try:
            pruned_run = _measure(model, inputs, args)
        except vflowopt.ConfigError as exc:
            raise CLIError(str(exc)) from None
        except vflowopt.PruningError as exc:
            raise CLIError(str(exc), code=1) from None
        stats = handle.stats
        resolved = handle.config
    finally:
        handle.remove()
    unpruned = _measure(model, inputs, args) if args.compare else None
    out, generate_ms, prefill_ms = pruned_run["out"], pruned_run["generate_ms"], pruned_run["prefill_ms"]

    new_tokens = out[0, prompt_len:]
    answer = processor.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    strategy = {k: _round(v) for k, v in resolved.to_dict().items() if k != "schema_version"}
    report = {
        "model": model_name,
        "model_class": type(model).__name__,
        "random_weights": False,  # always False since the default is the trained VQA model; kept for JSON readers
        "image": args.image if args.image is not None else SAMPLE_SCENE,
        "prompt": args.prompt,
        "answer": answer,
        "expected_answer": expected,
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
        "kv_bytes": pruned_run["kv_bytes"],
        "pruning_ms": _round(stats.pruning_ms, 2),
        "method_info": dict(stats.method_info),
        "generate_ms": _round(generate_ms, 2),
        "device": args.device,
        "strategy_source": source,
    }
    if unpruned is not None:
        answer_full = processor.tokenizer.decode(unpruned["out"][0, prompt_len:], skip_special_tokens=True).strip()
        report["unpruned"] = {
            "answer": answer_full,
            "tokens_into_llm": prompt_len,
            "kv_bytes": unpruned["kv_bytes"],
            "prefill_ms": _round(unpruned["prefill_ms"], 2),
            "generate_ms": _round(unpruned["generate_ms"], 2),
            "new_tokens": int(unpruned["out"].shape[1] - prompt_len),
        }
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(console, report, stats)
        if unpruned is not None:
            _print_compare(console, report)
    return 0


def _measure(model, inputs, args: argparse.Namespace) -> dict[str, Any]:
    """Greedy generation (which also warms up), then the prefill timed alone (median of
    PREFILL_REPEATS) and the KV-cache bytes it leaves, with whatever pruning is attached."""
    import statistics

    import torch

    from vflowopt.bench.memory import kv_cache_bytes
    from vflowopt.runtime.compat import cache_from_output

    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    _sync(args.device)
    generate_ms = 1000.0 * (time.perf_counter() - t0)
    times, kv = [], 0
    for _ in range(PREFILL_REPEATS):
        t0 = time.perf_counter()
        with torch.inference_mode():
            prefill = model(**inputs, logits_to_keep=1, use_cache=True)
        _sync(args.device)
        times.append(1000.0 * (time.perf_counter() - t0))
        kv = sum(kv_cache_bytes(cache_from_output(prefill)))
        del prefill
    return {"out": out, "generate_ms": generate_ms, "prefill_ms": statistics.median(times), "kv_bytes": int(kv)}


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _print_compare(console, report: dict) -> None:
    """Unpruned beside pruned: what pruning bought (tokens, KV bytes, prefill time) and what it cost."""
    from rich.markup import escape
    from rich.table import Table

    full = report["unpruned"]
    pruned_label = f"pruned ({report['method']}, budget {report['budget']:g})"
    table = Table(title="Unpruned vs pruned (same prompt, same machine, measured one after the other)",
                  title_justify="left")
    table.add_column("")
    table.add_column("unpruned", justify="right")
    table.add_column(pruned_label, justify="right")
    table.add_column("pruned / unpruned", justify="right")

    def ratio(a, b) -> str:
        return f"{b / a:.2f}x" if a else "-"

    table.add_row("answer", escape(full["answer"] or "(empty)"), escape(report["answer"] or "(empty)"),
                  "same" if full["answer"] == report["answer"] else "[yellow]differs[/]")
    table.add_row("tokens into the LLM", str(full["tokens_into_llm"]), str(report["tokens_into_llm"]),
                  ratio(full["tokens_into_llm"], report["tokens_into_llm"]))
    table.add_row("KV cache after prefill", _bytes(full["kv_bytes"]), _bytes(report["kv_bytes"]),
                  ratio(full["kv_bytes"], report["kv_bytes"]))
    table.add_row(f"prefill (median of {PREFILL_REPEATS})", f"{full['prefill_ms']:.1f} ms",
                  f"{report['prefill_ms']:.1f} ms", ratio(full["prefill_ms"], report["prefill_ms"]))
    table.add_row("generation", f"{full['generate_ms']:.1f} ms ({full['new_tokens']} tok)",
                  f"{report['generate_ms']:.1f} ms ({report['new_tokens']} tok)",
                  ratio(full["generate_ms"], report["generate_ms"]))
    console.print(table)


def _print_report(console, report: dict, stats) -> None:
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    answer = report["answer"] or "(empty)"
    title = "Answer"
    if report.get("expected_answer") is not None:
        answer += f"   (expected: {report['expected_answer']})"
    console.print(Panel(escape(answer), title=title, title_align="left", expand=False))

    s = report["strategy"]
    n_vis = report["visual_tokens"]
    table = Table(title="What pruning did", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("model", escape(f"{report['model']} ({report['model_class']})"))
    table.add_row("method / budget", f"{report['method']} / {report['budget']}")
    table.add_row("strategy", escape(report["strategy_source"]))
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
    info = report.get("method_info") or {}
    if "calibration_set_size" in info:
        sizes, mass = info["calibration_set_size"], info["calibration_mass"]
        if info["calibration_empty"] == len(sizes):
            text = (f"empty (no token above t = {info['threshold']:g}x the mean attention): every token's "
                    "attention was used")
        else:
            text = (f"|K| {', '.join(map(str, sizes))} per crop/image, holding "
                    f"{', '.join(f'{100 * m:.0f}%' for m in mass)} of the attention")
        table.add_row("calibration set K", text)
    table.add_row("tokens into the LLM", f"{report['tokens_into_llm']} of {report['prompt_tokens']} prompt tokens")
    table.add_row("KV tokens per layer", _layer_ranges(report["kv_tokens_per_layer"]))
    table.add_row("mean retention", f"{report['mean_retention']:.4f}")
    table.add_row(f"prefill (median of {PREFILL_REPEATS})", f"{report['prefill_ms']:.1f} ms")
    table.add_row("pruning overhead", f"{report['pruning_ms']:.1f} ms (within the prefill)")
    table.add_row("generation", f"{report['generate_ms']:.1f} ms for {report['new_tokens']} new tokens")
    console.print(table)
