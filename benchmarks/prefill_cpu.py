"""CPU prefill benchmark: VFlowOpt on a LLaVA-OneVision-0.5B-shaped model with random weights.

Nothing is downloaded. The model is built from configs:

* vision: SigLIP ViT-B-like (hidden 768, 12 layers, 12 heads, MLP 3072, 384 px, 14 px patches -> 27 x 27 =
  729 patches per crop, no pooling head);
* projector: LLaVA 2-layer GELU MLP (768 -> 896 -> 896);
* LLM: Qwen2-0.5B-shaped (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, tied embeddings), with a
  32k vocabulary instead of 151k to save memory (only the LM head on the last token depends on it).

Input layout. Stock ``LlavaOnevisionModel.get_image_features`` always tiles a lone image (anyres): the
number of crops comes from ``image_sizes`` and is at least 2 (base image + >= 1 tile), whatever shape
``pixel_values`` has. So a single untiled crop is impossible with one image; ``--images 1`` (default) is
what LLaVA-OneVision does with one 384 x 384 image: base crop + one 384 x 384 tile = 2 crops,
729 + 27 x (27 + 1 newline) = 1485 image tokens. With ``--images N`` (N >= 2) the sample holds N images,
which are not tiled (``batch_num_images=[N]``): N crops of 729 tokens + 1 newline each.

Every row times full prefills ``model(**inputs, logits_to_keep=1, use_cache=True)`` under
``torch.inference_mode`` (vision encoder, projector and LLM), float32, sdpa attention. The "no hooks" row
is the stock model; the budget rows have ``vflowopt.prune(model, VFlowOptConfig(budget=B))`` attached
(also at budget 1.0, so the scoring overhead is paid but nothing is dropped). Rows are measured in
interleaved rounds (each round runs every row once, in a rotating order) so that load from other
processes on the machine hits every row alike; the median and the minimum over the rounds are reported,
with the 1-minute load average after each run in the JSON.

Analytic FLOPs (``vflowopt.bench.flops``; FLOPs = 2 x multiply-adds, matmuls only, full n x n attention):
vision + projector + LLM at ``stats.kv_tokens_per_layer`` + LM head on 1 token. The ViT attention map
VFlowOpt recomputes for scoring is reported separately (``scoring_gflops``).

Example::

    .venv/bin/python benchmarks/prefill_cpu.py --json results/prefill_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig

import vflowopt
from vflowopt.bench.flops import (
    llm_prefill_flops,
    projector_flops,
    vision_flops,
    vision_scoring_flops,
)

IMAGE_TOKEN_ID = 31999
VIDEO_TOKEN_ID = 31998


def build_model(args: argparse.Namespace) -> LlavaOnevisionForConditionalGeneration:
    vision = SiglipVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=args.vision_layers, num_attention_heads=12,
        num_channels=3, image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=args.vocab, hidden_size=896, intermediate_size=4864, num_hidden_layers=args.llm_layers,
        num_attention_heads=14, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=2,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(),
        image_token_index=IMAGE_TOKEN_ID, video_token_index=VIDEO_TOKEN_ID,
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation(args.attn)
    return model.eval()


def build_inputs(model, args: argparse.Namespace) -> tuple[dict, dict]:
    """pixel_values / image_sizes for the chosen layout, and input_ids with the verified token count."""
    cfg = model.config
    gen = torch.Generator().manual_seed(args.seed + 1)
    side = cfg.vision_config.image_size
    if args.images == 1:
        image_sizes = torch.tensor([[args.image_size, args.image_size]])
        crops = transformers.models.llava_onevision.modeling_llava_onevision.image_size_to_num_patches(
            image_sizes[0], cfg.image_grid_pinpoints, side
        )
        pixel_values = torch.randn(1, crops, 3, side, side, generator=gen)
        batch_num_images = None
    else:
        image_sizes = torch.tensor([[side, side]] * args.images)
        pixel_values = torch.randn(args.images, 1, 3, side, side, generator=gen)
        batch_num_images = torch.tensor([args.images])
        crops = args.images
    with torch.inference_mode():
        feats = model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes,
            vision_feature_layer=cfg.vision_feature_layer,
            vision_feature_select_strategy=cfg.vision_feature_select_strategy,
            vision_aspect_ratio=cfg.vision_aspect_ratio, batch_num_images=batch_num_images,
        ).pooler_output
    per_image = [int(f.shape[0]) for f in feats]

    def text(n: int) -> list[int]:
        return torch.randint(100, args.vocab - 100, (n,), generator=gen).tolist()

    n_before = args.text_tokens // 4
    ids = text(n_before)
    for k, n in enumerate(per_image):
        if k:
            ids += text(1)
        ids += [IMAGE_TOKEN_ID] * n
    ids += text(args.text_tokens - n_before - (len(per_image) - 1))
    input_ids = torch.tensor([ids])
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pixel_values,
                  image_sizes=image_sizes)
    if batch_num_images is not None:
        inputs["batch_num_images"] = batch_num_images
    patches = (side // cfg.vision_config.patch_size) ** 2
    layout = dict(images=args.images, image_size=args.image_size if args.images == 1 else side, crops=crops,
                  patches_per_crop=patches, image_tokens_per_image=per_image, image_tokens=sum(per_image),
                  text_tokens=len(ids) - sum(per_image), prompt_tokens=len(ids))
    return inputs, layout


def prefill(model, inputs: dict) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model(**inputs, logits_to_keep=1, use_cache=True)
        dt = time.perf_counter() - t0
    return 1000.0 * dt, out.logits[:, -1].float()


def flops_row(model, layout: dict, kv_tokens: list[int], pruned: bool) -> dict:
    cfg = model.config
    vis = vision_flops(cfg.vision_config, layout["crops"])
    proj = projector_flops(cfg, layout["crops"] * layout["patches_per_crop"])
    llm = llm_prefill_flops(cfg.text_config, kv_tokens, logits_tokens=1)
    scoring = vision_scoring_flops(cfg.vision_config, layout["crops"]) if pruned else 0
    return dict(vision_gflops=vis / 1e9, projector_gflops=proj / 1e9, llm_gflops=llm / 1e9,
                total_gflops=(vis + proj + llm) / 1e9, scoring_gflops=scoring / 1e9)


def _label(budget: float | None) -> str:
    return "no hooks" if budget is None else f"budget {budget}"


def measure_once(model, inputs: dict, budget: float | None) -> dict:
    """One prefill with pruning at `budget` attached (None: stock model); hooks are removed afterwards."""
    handle = vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=budget)) if budget is not None else None
    try:
        ms, logits = prefill(model, inputs)
        run = dict(ms=ms, load=_loadavg(), logits=logits)
        if handle is not None:
            st = handle.stats
            run["pruning_ms"] = st.pruning_ms
            run["stats"] = dict(
                visual_tokens=st.visual_tokens, prompt_tokens=st.prompt_tokens, tokens_into_llm=st.tokens_into_llm,
                kv_tokens_per_layer=list(st.kv_tokens_per_layer),
                visual_tokens_per_layer=list(st.visual_tokens_per_layer), mean_retention=st.mean_retention,
                stages=[list(x) for x in st.stages], recycled_tokens=st.recycled_tokens,
                resolved_retention=list(handle.config.retention), stage_layers=list(handle.config.stage_layers),
            )
    finally:
        if handle is not None:
            handle.remove()
    return run


def measure(model, inputs: dict, layout: dict, args: argparse.Namespace) -> list[dict]:
    """Rows: no hooks, then each budget. Rounds are interleaved (every row runs once per round, the order
    rotating each round), so background load on the machine is spread evenly over the rows."""
    specs: list[float | None] = [None, *args.budgets]
    runs: dict[int, list[dict]] = {k: [] for k in range(len(specs))}
    for rnd in range(args.warmup + args.repeats):
        tag = "warm-up" if rnd < args.warmup else f"round {rnd - args.warmup + 1}"
        shift = rnd % len(specs)
        for k in [*range(shift, len(specs)), *range(shift)]:
            run = measure_once(model, inputs, specs[k])
            print(f"  {tag} [{_label(specs[k])}]: {run['ms']:.0f} ms (pruning {run.get('pruning_ms', 0.0):.0f} ms,"
                  f" load {run['load']:.2f})", file=sys.stderr, flush=True)
            if rnd >= args.warmup:
                runs[k].append(run)

    n_layers = model.config.text_config.num_hidden_layers
    rows = []
    for k, budget in enumerate(specs):
        rs = runs[k]
        times = [r["ms"] for r in rs]
        pruning = [r["pruning_ms"] for r in rs if "pruning_ms" in r]
        if budget is None:
            n = layout["prompt_tokens"]
            stats = dict(prompt_tokens=n, tokens_into_llm=n, kv_tokens_per_layer=[n] * n_layers, mean_retention=1.0)
        else:
            stats = rs[-1]["stats"]
            if any(r["stats"]["kv_tokens_per_layer"] != stats["kv_tokens_per_layer"] for r in rs):
                print(f"  note: {_label(budget)} kept different token counts across runs", file=sys.stderr)
        prefill_ms = statistics.median(times)
        pruning_ms = statistics.median(pruning) if pruning else 0.0
        flops = flops_row(model, layout, stats["kv_tokens_per_layer"], budget is not None)
        rows.append(dict(label=_label(budget), budget=budget, prefill_ms=prefill_ms, prefill_ms_min=min(times),
                         prefill_ms_runs=times, loadavg_1min_runs=[r["load"] for r in rs],
                         pruning_ms=pruning_ms, pruning_ms_runs=pruning, pruning_share=pruning_ms / prefill_ms,
                         **stats, **flops, last_logits=rs[-1]["logits"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.1])
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (one prefill per row each; median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--images", type=int, default=1,
                   help="1: one anyres image (base + tiles); N >= 2: N untiled single-crop images")
    p.add_argument("--image-size", type=int, default=384, help="side of the single image (--images 1)")
    p.add_argument("--text-tokens", type=int, default=20, help="text tokens around the image tokens")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vision-layers", type=int, default=12)
    p.add_argument("--llm-layers", type=int, default=24)
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be >= 1")

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = build_model(args)
    inputs, layout = build_inputs(model, args)
    print(f"built model in {time.perf_counter() - t0:.1f} s; {layout['crops']} crop(s), "
          f"{layout['image_tokens']} image tokens {layout['image_tokens_per_image']}, "
          f"{layout['text_tokens']} text tokens, prompt {layout['prompt_tokens']}", file=sys.stderr, flush=True)

    rows = measure(model, inputs, layout, args)

    base = rows[0]
    ref = next((r for r in rows if r["budget"] == 1.0), base)
    for r in rows:
        r["flops_ratio"] = r["total_gflops"] / ref["total_gflops"]
        r["llm_flops_ratio"] = r["llm_gflops"] / ref["llm_gflops"]
        r["speedup_vs_no_hooks"] = base["prefill_ms"] / r["prefill_ms"]
        r["time_ratio_vs_budget_1"] = r["prefill_ms"] / ref["prefill_ms"]
        r["max_abs_logit_diff_vs_no_hooks"] = float((r["last_logits"] - base["last_logits"]).abs().max())
    for r in rows:
        del r["last_logits"]

    header = (f"{'row':<12}{'prefill ms':>11}{'min ms':>8}{'vs none':>8}{'prune ms':>9}{'share':>7}{'into LLM':>9}"
              f"{'kv tokens (first/mid/last)':>28}{'retain':>7}{'GFLOPs':>9}{'ratio':>7}{'LLM ratio':>10}"
              f"{'+score GF':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        kv = r["kv_tokens_per_layer"]
        kv_s = f"{kv[0]}/{kv[len(kv) // 2]}/{kv[-1]}"
        print(f"{r['label']:<12}{r['prefill_ms']:>11.0f}{r['prefill_ms_min']:>8.0f}{r['speedup_vs_no_hooks']:>7.2f}x{r['pruning_ms']:>9.1f}"
              f"{100 * r['pruning_share']:>6.1f}%{r['tokens_into_llm']:>9}{kv_s:>28}{r['mean_retention']:>7.3f}"
              f"{r['total_gflops']:>9.1f}{r['flops_ratio']:>7.3f}{r['llm_flops_ratio']:>10.3f}"
              f"{r['scoring_gflops']:>10.2f}")

    if args.json is not None:
        result = dict(
            machine=dict(cpu=_cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(),
                         python=platform.python_version(), torch=torch.__version__,
                         transformers=transformers.__version__),
            settings=dict(vars(args), json=str(args.json), dtype="float32"),
            layout=layout,
            rows=rows,
        )
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _loadavg() -> float:
    """1-minute load average (other processes competing for the cores make timings noisy)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    raise SystemExit(main())
