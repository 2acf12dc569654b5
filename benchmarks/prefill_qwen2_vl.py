"""CPU prefill benchmark: VFlowOpt on a Qwen2-VL model with a 0.5B-shaped LLM and random weights.

Nothing is downloaded. Vision: the real Qwen2-VL ViT shape (depth 32, embed 1280, 16 heads, MLP ratio 4,
14 px patches, 2x2 merger); LLM: Qwen2-0.5B-shaped (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP
4864, M-RoPE sections [8, 12, 12] (head_dim 64)); float32, sdpa, 2 threads. Input: one 448x448 image -> 32x32 patches
-> 256 merged visual tokens, through the package's offline Qwen2-VL processor (tiny tokenizer).

Rows: the stock model, then VFlowOpt at each budget (hooks attached at 1.0 too). Rounds interleave the
rows so background load hits every row alike; the median and minimum prefill times are reported beside
the analytic LLM FLOPs ratio (vflowopt.bench.flops, from the per-layer KV lengths actually kept). The
ViT is not pruned by VFlowOpt, so its time is a fixed part of every row; it is timed on its own too.

    .venv/bin/python benchmarks/prefill_qwen2_vl.py --json /tmp/qwen2_vl.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

import vflowopt
from vflowopt.bench.flops import llm_prefill_flops
from vflowopt.tiny import build_inputs, example_image, tiny_tokenizer
from vflowopt.tiny_families import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _qwen_config_kwargs, _qwen_processor


def build(args):
    tok = tiny_tokenizer("chatml")
    text = dict(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=args.llm_layers,
                num_attention_heads=14, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
                rms_norm_eps=1e-6, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]})
    vision = dict(depth=args.vision_layers, embed_dim=1280, hidden_size=896, num_heads=16, mlp_ratio=4,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, **_qwen_config_kwargs(tok))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    proc = _qwen_processor("Qwen2VLProcessor", 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tok, max_tokens=256)
    side = args.image_size
    inputs = build_inputs(proc, [example_image(seed=0, size=(side, side))], ["What is in the image? " * 2])
    return model, dict(inputs)


def prefill(model, inputs):
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(**inputs, logits_to_keep=1, use_cache=True)
        return 1000 * (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.25, 0.1])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--vision-layers", type=int, default=32)
    p.add_argument("--llm-layers", type=int, default=24)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    model, inputs = build(args)
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"prompt {inputs['input_ids'].shape[1]} tokens, {n_visual} visual", file=sys.stderr)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
        vit_ms = 1000 * (time.perf_counter() - t0)
    specs = [None, *args.budgets]
    runs = {i: [] for i in range(len(specs))}
    stats = {}
    for rnd in range(1 + args.repeats):
        order = [*range(rnd % len(specs), len(specs)), *range(rnd % len(specs))]
        for i in order:
            h = vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=specs[i])) if specs[i] is not None else None
            try:
                ms = prefill(model, inputs)
                if h is not None:
                    stats[i] = (list(h.stats.kv_tokens_per_layer), h.stats.pruning_ms, h.stats.mean_retention)
            finally:
                if h is not None:
                    h.remove()
            print(f"  round {rnd} {specs[i]}: {ms:.0f} ms", file=sys.stderr, flush=True)
            if rnd:
                runs[i].append((ms, stats.get(i, (None, 0.0, 1.0))[1]))
    n = inputs["input_ids"].shape[1]
    full = llm_prefill_flops(model.config.text_config, [n] * args.llm_layers)
    rows = []
    for i, b in enumerate(specs):
        kv, _, retention = stats.get(i, ([n] * args.llm_layers, 0.0, 1.0))
        times = [t for t, _ in runs[i]]
        prune_ms = statistics.median([pm for _, pm in runs[i]])
        rows.append(dict(budget=b, prefill_ms=statistics.median(times), prefill_ms_min=min(times), runs_ms=times,
                         pruning_ms=prune_ms, mean_retention=retention, kv_first_last=[kv[0], kv[-1]],
                         llm_flops_ratio=llm_prefill_flops(model.config.text_config, kv) / full))
    base = rows[0]["prefill_ms"]
    print(f"ViT alone: {vit_ms:.0f} ms")
    print(f"{'row':<12}{'median ms':>10}{'min ms':>9}{'vs stock':>9}{'prune ms':>9}{'kv first/last':>15}"
          f"{'retain':>8}{'LLM FLOPs':>10}")
    for r in rows:
        label = "stock" if r["budget"] is None else f"budget {r['budget']}"
        print(f"{label:<12}{r['prefill_ms']:>10.0f}{r['prefill_ms_min']:>9.0f}{r['prefill_ms'] / base:>9.2f}"
              f"{r['pruning_ms']:>9.1f}{'/'.join(map(str, r['kv_first_last'])):>15}{r['mean_retention']:>8.3f}"
              f"{r['llm_flops_ratio']:>10.3f}")
    if args.json:
        args.json.write_text(json.dumps(dict(vit_ms=vit_ms, prompt_tokens=n, visual_tokens=n_visual, rows=rows), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
