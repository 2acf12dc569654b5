"""Pruning overhead of the pre-LLM baselines (visionzip, divprune, random, pool) on CPU.

Same model and inputs as ``benchmarks/prefill_cpu.py`` (imported, not copied): a LLaVA-OneVision-0.5B-
shaped model with random weights (SigLIP-B-like ViT, Qwen2-0.5B-shaped LLM), one 384 px image = base
crop + one tile = 1485 image tokens (1458 prunable + 27 newlines), float32, sdpa. Nothing is downloaded.

Each row times full prefills ``model(**inputs, logits_to_keep=1, use_cache=True)`` with the method
attached at the budget; ``pruning_ms`` is the runtime's own measure (``handle.stats.pruning_ms``: the
method's vision-side signal work plus its selection before the LLM), ``share`` = pruning_ms / prefill.
Rows run in interleaved rounds (rotating order) so that load from other processes hits every row alike;
medians over the rounds are reported with the 1-minute load average.

Example::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/overhead_pre_baselines.py --repeats 3
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
from prefill_cpu import build_inputs, build_model  # noqa: E402

import vflowopt  # noqa: E402
from vflowopt.config import config_for  # noqa: E402


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def once(model, inputs, method: str | None, budget: float) -> dict:
    handle = vflowopt.prune(model, config_for(method, budget=budget)) if method else None
    try:
        with torch.inference_mode():
            t0 = time.perf_counter()
            model(**inputs, logits_to_keep=1, use_cache=True)
            ms = 1000.0 * (time.perf_counter() - t0)
        run = dict(ms=ms, load=_load())
        if handle is not None:
            st = handle.stats
            run.update(pruning_ms=st.pruning_ms, into_llm=st.tokens_into_llm, kept=st.stages[0][1],
                       visual=st.visual_tokens, recycled=st.recycled_tokens)
    finally:
        if handle is not None:
            handle.remove()
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["visionzip", "divprune", "random", "pool"])
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    # the model/input settings of prefill_cpu.py's defaults
    shape = argparse.Namespace(images=1, image_size=384, text_tokens=20, vocab=32000, vision_layers=12,
                               llm_layers=24, attn="sdpa", seed=0)
    torch.set_num_threads(args.threads)
    model = build_model(shape)
    inputs, layout = build_inputs(model, shape)
    print(f"{layout['image_tokens']} image tokens, prompt {layout['prompt_tokens']}", file=sys.stderr)
    specs = [None, *args.methods]
    runs: dict[int, list[dict]] = {k: [] for k in range(len(specs))}
    for rnd in range(args.warmup + args.repeats):
        shift = rnd % len(specs)
        for k in [*range(shift, len(specs)), *range(shift)]:
            run = once(model, inputs, specs[k], args.budget)
            print(f"  round {rnd} [{specs[k] or 'no hooks'}] {run['ms']:.0f} ms, pruning "
                  f"{run.get('pruning_ms', 0.0):.1f} ms, load {run['load']:.2f}", file=sys.stderr, flush=True)
            if rnd >= args.warmup:
                runs[k].append(run)
    rows = []
    print(f"{'row':<11}{'prefill ms':>11}{'prune ms':>10}{'share':>8}{'kept':>7}{'into LLM':>9}{'load':>7}")
    for k, spec in enumerate(specs):
        rs = runs[k]
        ms = statistics.median(r["ms"] for r in rs)
        prune_ms = statistics.median(r.get("pruning_ms", 0.0) for r in rs)
        row = dict(method=spec or "no hooks", budget=args.budget if spec else None, prefill_ms=ms,
                   prefill_ms_all=[r["ms"] for r in rs], pruning_ms=prune_ms, pruning_share=prune_ms / ms,
                   load=[r["load"] for r in rs], kept=rs[-1].get("kept"), visual=rs[-1].get("visual"),
                   into_llm=rs[-1].get("into_llm"), recycled=rs[-1].get("recycled"))
        rows.append(row)
        print(f"{row['method']:<11}{ms:>11.0f}{prune_ms:>10.1f}{100 * row['pruning_share']:>7.2f}%"
              f"{row['kept'] or '-':>7}{row['into_llm'] or layout['prompt_tokens']:>9}"
              f"{statistics.median(row['load']):>7.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(layout=layout, threads=args.threads, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
