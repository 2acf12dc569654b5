"""Prompt throughput of vLLM with and without vflowopt's image pruning, side by side in one run.

One in-process engine serves every budget: the plugin's plan is switched between rows (`set_plan`; the engine
starts with a pruning plan so that its runner recomputes M-RoPE positions, and budget 1.0 then keeps every
token through the same code path). Each row sends `--prompts` requests at once (one distinct picture each,
so no cache answers; prefix and processor caches are off) with `--max-tokens` output tokens, after a warm-up
batch; rows run in `--rounds` interleaved rounds and the median is reported.

Reported per budget: requests/s, prompt tokens/s (prompt tokens as vLLM counts them, i.e. after pruning,
divided by the wall time of the batch), the mean prompt length, and the mean time to first token.

On this CPU machine (no hub): a tiny random Qwen2.5-VL built like the plugin's tests
(tests/vllm_plugin/harness.py):

    .venv-vllm/bin/python benchmarks/vllm_bench.py --tiny qwen2_5_vl --json out.json

On a GPU server: `--model Qwen/Qwen2.5-VL-7B-Instruct` (and drop the CPU-only environment defaults below by
setting them yourself).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _images(n: int, size: tuple[int, int], offset: int):
    from vflowopt.tiny import example_image

    return [example_image(seed=offset + i).resize(size) for i in range(n)]


def _prompt_for(model_dir: str, proc) -> str:
    if proc is not None:
        import harness

        return harness.prompt(proc, question="Describe the image in detail.")
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    content = [{"type": "image"}, {"type": "text", "text": "Describe the image in detail."}]
    return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def run_batch(llm, prompt: str, images, max_tokens: int) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    requests = [{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images]
    start = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=False)
    wall = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    ttft = [o.metrics.first_token_latency for o in outs
            if getattr(o, "metrics", None) is not None and getattr(o.metrics, "first_token_latency", None)]
    return {"wall_s": wall, "requests_per_s": len(outs) / wall, "prompt_tokens_per_s": prompt_tokens / wall,
            "mean_prompt_tokens": prompt_tokens / len(outs), "mean_ttft_s": statistics.mean(ttft) if ttft else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="a local folder or hub id vLLM can serve (a family the plugin prunes)")
    src.add_argument("--tiny", choices=["qwen2_5_vl", "qwen3_vl", "qwen2_vl", "llava_onevision", "llava"],
                     help="build a tiny random model here (llava: the shipped trained VQA model)")
    ap.add_argument("--method", default="vflowopt")
    ap.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=1, help="output tokens per request (1: prompt throughput)")
    ap.add_argument("--image-size", type=int, nargs=2, default=[448, 448], metavar=("W", "H"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--tiny-text", type=int, nargs=2, default=[512, 8], metavar=("HIDDEN", "LAYERS"),
                    help="--tiny: the text model's width and depth (head_dim 32), so that the LLM's prefill weighs")
    ap.add_argument("--tiny-image-tokens", type=int, default=256, help="--tiny: most visual tokens per image")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    for key, value in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2"}.items():
        os.environ.setdefault(key, value)
    from vflowopt import config_for
    from vflowopt.serving import vllm as plugin
    from vflowopt.serving.plan import FAMILIES, SERVED_POSITIONS, ServingPlan
    from vflowopt.serving.vllm_compat import install

    install()  # CPU-only machines: before anything imports transformers' torchvision-only modules
    model_dir = args.model
    if args.tiny:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        sys.path.insert(0, str(ROOT / "tests" / "vllm_plugin"))
        import harness

        hidden, layers = args.tiny_text
        model, proc = harness.build(args.tiny, text_hidden=hidden, text_layers=layers,
                                    max_image_tokens=args.tiny_image_tokens)
        model_dir = str(harness.save(model, proc, Path(tempfile.mkdtemp(prefix="vllm_bench_")) / args.tiny))
        del model
    else:
        proc = None
    from transformers import AutoConfig

    arch = (AutoConfig.from_pretrained(model_dir).architectures or [""])[0]
    if arch not in FAMILIES:
        ap.error(f"--model {model_dir}: architecture {arch or '(none)'} is not pruned by the plugin; "
                 f"pruned: {', '.join(FAMILIES)}")
    positions = SERVED_POSITIONS[FAMILIES[arch]]  # what vLLM realises for the family (LLaVA-OneVision: compact)
    plans = {b: ServingPlan(config_for(args.method, budget=b, positions=positions), source=f"{args.method}@{b}")
             for b in args.budgets}
    # start with a pruning plan: the runner then recomputes positions for every row (budget 1.0 included)
    plugin.set_plan(ServingPlan(config_for(args.method, budget=0.5, positions=positions)))
    plugin.register()
    prompt = _prompt_for(model_dir, proc)

    from vllm import LLM

    llm = LLM(model=model_dir, enforce_eager=True, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=args.prompts, max_num_batched_tokens=max(8192, args.max_model_len), seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0}, enable_prefix_caching=False, mm_processor_cache_gb=0)
    size = tuple(args.image_size)
    offset = 0
    plugin.set_plan(plans[args.budgets[0]])
    run_batch(llm, prompt, _images(min(8, args.prompts), size, 10_000), args.max_tokens)  # warm-up
    rows: dict[float, list[dict]] = {b: [] for b in args.budgets}
    for r in range(args.rounds):
        order = args.budgets[r % len(args.budgets):] + args.budgets[: r % len(args.budgets)]
        for b in order:
            plugin.set_plan(plans[b])
            rows[b].append(run_batch(llm, prompt, _images(args.prompts, size, offset), args.max_tokens))
            offset += args.prompts
    load = os.getloadavg()[0]
    shape = f" (random weights, text hidden {args.tiny_text[0]} x {args.tiny_text[1]} layers)" if args.tiny else ""
    if args.tiny == "llava":
        shape = " (the shipped trained VQA model: CLIP 224 px, 256 visual tokens, text hidden 128 x 8 layers)"
    result = {"model": (args.model or f"tiny {args.tiny}") + shape, "method": args.method,
              "prompts": args.prompts, "max_tokens": args.max_tokens, "image_size": list(size),
              "rounds": args.rounds, "dtype": args.dtype, "cpu_count": os.cpu_count(), "loadavg_1min": load,
              "rows": {}}
    base = None
    print(f"{'budget':>6} {'req/s':>8} {'prompt tok/s':>13} {'prompt tok':>11} {'TTFT s':>8} {'speed-up':>9}")
    for b in args.budgets:
        med = {k: statistics.median(x[k] for x in rows[b]) if rows[b][0][k] is not None else None
               for k in rows[b][0]}
        base = base or med["requests_per_s"]
        med["speedup_vs_first"] = med["requests_per_s"] / base
        result["rows"][str(b)] = {"median": med, "runs": rows[b]}
        ttft = f"{med['mean_ttft_s']:.3f}" if med["mean_ttft_s"] is not None else "-"
        print(f"{b:>6} {med['requests_per_s']:>8.2f} {med['prompt_tokens_per_s']:>13.1f} "
              f"{med['mean_prompt_tokens']:>11.1f} {ttft:>8} {med['speedup_vs_first']:>8.2f}x")
    print(f"load average (1 min) after the run: {load:.2f} on {os.cpu_count()} CPUs")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
