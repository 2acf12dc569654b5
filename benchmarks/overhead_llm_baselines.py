"""Pruning overhead of the LLM-attention baselines (FastV, PDrop, SparseVLM) on a ≈0.5B-shaped model.

Reuses the model and inputs of ``benchmarks/prefill_cpu.py`` (LLaVA-OneVision layout: SigLIP-B-like ViT,
Qwen2-0.5B-shaped 24-layer LLM, random weights, one 384 px image = 1485 image tokens). For each method
at one budget it times full prefills (``model(**inputs, logits_to_keep=1, use_cache=True)``) with the
method attached and reports ``handle.stats.pruning_ms`` (time spent in the method's attention taps and
selections, as the runtime measures it) and its share of the prefill. Rows (no hooks + each method)
run in interleaved rounds with a rotating order, so background load hits every row alike; medians over
the rounds are reported, with the 1-minute load average after each run.

PDrop's default stages (⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋ = 6, 12, 18) cannot reach a budget below 6/24 = 0.25, so
below that this script gives it ``--pdrop-stages`` (default 2 8 16). FastV and SparseVLM use their
defaults (K = 2; SparseVLM's stages scaled from the official 32-layer ones: 2, 5, 12).

Example::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/overhead_llm_baselines.py --budget 0.1 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prefill_cpu import build_inputs, build_model, prefill  # noqa: E402

import vflowopt  # noqa: E402
from vflowopt.methods.fastv import FastVConfig  # noqa: E402
from vflowopt.methods.pdrop import PDropConfig  # noqa: E402
from vflowopt.methods.sparsevlm import SparseVLMConfig  # noqa: E402


def _load() -> float:
    return os.getloadavg()[0]


def configs(args) -> dict[str, object]:
    pdrop_stages = tuple(args.pdrop_stages) if args.budget < 0.25 else None
    return {
        "fastv": FastVConfig(budget=args.budget),
        "pdrop": PDropConfig(budget=args.budget, stage_layers=pdrop_stages),
        "sparsevlm": SparseVLMConfig(budget=args.budget),
    }


def run_once(model, inputs, cfg) -> dict:
    handle = vflowopt.prune(model, cfg) if cfg is not None else None
    try:
        ms, _ = prefill(model, inputs)
        out = {"ms": ms, "load": _load()}
        if handle is not None:
            st = handle.stats
            out.update(pruning_ms=st.pruning_ms, mean_retention=st.mean_retention, stages=st.stages,
                       kv_tokens_per_layer=st.kv_tokens_per_layer, recycled_tokens=st.recycled_tokens,
                       config=handle.config.to_dict())
    finally:
        if handle is not None:
            handle.remove()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--methods", nargs="+", default=["fastv", "pdrop", "sparsevlm"])
    p.add_argument("--pdrop-stages", type=int, nargs="+", default=[2, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--text-tokens", type=int, default=20)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_args = argparse.Namespace(vision_layers=12, llm_layers=24, vocab=32000, attn="sdpa", seed=0, images=1,
                                    image_size=384, text_tokens=args.text_tokens)
    t0 = time.perf_counter()
    model = build_model(model_args)
    inputs, layout = build_inputs(model, model_args)
    print(f"built in {time.perf_counter() - t0:.1f} s; {layout['image_tokens']} image tokens, prompt "
          f"{layout['prompt_tokens']}", file=sys.stderr, flush=True)
    cfgs = {name: cfg for name, cfg in configs(args).items() if name in args.methods}
    rows = ["no hooks", *cfgs]
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    for rnd in range(args.warmup + args.repeats):
        shift = rnd % len(rows)
        for name in rows[shift:] + rows[:shift]:
            run = run_once(model, inputs, cfgs.get(name))
            print(f"  round {rnd} [{name}]: {run['ms']:.0f} ms, pruning {run.get('pruning_ms', 0):.1f} ms, "
                  f"load {run['load']:.2f}", file=sys.stderr, flush=True)
            if rnd >= args.warmup:
                runs[name].append(run)
    base = statistics.median(r["ms"] for r in runs["no hooks"])
    results = []
    print(f"\nbudget {args.budget}, {args.threads} threads; no-hooks prefill {base:.0f} ms")
    print(f"{'method':<10} {'prefill ms':>10} {'pruning ms':>10} {'share':>7} {'mean R':>7}  load(1 min)  stages")
    for name in cfgs:
        rs = runs[name]
        ms = statistics.median(r["ms"] for r in rs)
        pr = statistics.median(r["pruning_ms"] for r in rs)
        loads = [round(r["load"], 2) for r in rs]
        stages = ", ".join(f"{s}: {n}" for s, n in rs[-1]["stages"])
        print(f"{name:<10} {ms:>10.0f} {pr:>10.1f} {pr / ms:>7.2%} {rs[-1]['mean_retention']:>7.3f}  {loads}  {stages}")
        results.append(dict(method=name, prefill_ms=ms, prefill_ms_runs=[r["ms"] for r in rs], pruning_ms=pr,
                            pruning_ms_runs=[r["pruning_ms"] for r in rs], pruning_share=pr / ms,
                            loadavg_1min_runs=loads, mean_retention=rs[-1]["mean_retention"],
                            stages=rs[-1]["stages"], recycled_tokens=rs[-1]["recycled_tokens"],
                            config=rs[-1]["config"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(budget=args.budget, threads=args.threads, layout=layout,
                                             no_hooks_prefill_ms=base, rows=results,
                                             no_hooks_runs=[r["ms"] for r in runs["no hooks"]]), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
