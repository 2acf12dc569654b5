"""The analytic FLOPs model (`vflowopt.bench.flops`) against torch's FlopCounterMode.

Every model runs with eager attention: its attention matmuls are plain bmm calls that FlopCounterMode
counts over the full n x n square, exactly as the analytic model does. (With sdpa on CPU the fused
kernel `_scaled_dot_product_flash_attention_for_cpu` has no flop formula and would be counted as 0.)
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

import vflowopt
from vflowopt.bench.flops import (
    head_dim,
    llm_layer_flops,
    llm_prefill_flops,
    projector_flops,
    vision_flops,
    vision_scoring_flops,
    vision_tokens_per_image,
)


def _counted(fn, *args, **kwargs) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _seeded(cls, config):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(config).eval()


@functools.cache
def _qwen2():
    cfg = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=300, attn_implementation="eager",
    )
    return _seeded(Qwen2ForCausalLM, cfg)


@functools.cache
def _llama():
    # head_dim (32) != hidden / heads (16), a single KV head, and biases on attention and MLP.
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, vocab_size=300, attention_bias=True, mlp_bias=True,
        attn_implementation="eager",
    )
    return _seeded(LlamaForCausalLM, cfg)


def _tokens(n: int) -> torch.Tensor:
    return torch.arange(n).remainder(300).view(1, n)


@pytest.mark.parametrize("n", [1, 9, 40])
@pytest.mark.parametrize("build", [_qwen2, _llama], ids=["qwen2", "llama"])
def test_llm_prefill_matches_flop_counter(build, n):
    model = build()
    cfg = model.config
    counted = _counted(lambda: model(input_ids=_tokens(n), logits_to_keep=1))
    assert counted == llm_prefill_flops(cfg, [n] * cfg.num_hidden_layers, logits_tokens=1)


def test_llm_logits_tokens_and_batch():
    model = _qwen2()
    cfg = model.config
    ids = _tokens(11).repeat(3, 1)
    counted = _counted(lambda: model(input_ids=ids, logits_to_keep=4))
    assert counted == 3 * llm_prefill_flops(cfg, [11] * cfg.num_hidden_layers, logits_tokens=4)


def test_head_dim_and_gqa_terms():
    cfg = _llama().config
    assert head_dim(cfg) == 32
    n, h, d, heads, kv, inter = 5, 64, 32, 4, 1, 96
    expected = 2 * n * (h * heads * d + 2 * h * kv * d + heads * d * h) + 2 * 2 * heads * n * n * d
    expected += 3 * 2 * n * h * inter
    assert llm_layer_flops(cfg, n) == expected
    with pytest.raises(ValueError):
        llm_prefill_flops(cfg, [5, 5])


def test_uneven_tokens_per_layer_are_additive():
    """Pruning-like schedule: each decoder layer run on its own token count, counted one by one."""
    model = _qwen2()
    cfg = model.config
    schedule = [23, 23, 12, 5]
    counted = 0
    for layer, n in zip(model.model.layers, schedule):
        hidden = torch.randn(1, n, cfg.hidden_size)
        pos = torch.arange(n).view(1, n)
        rope = model.model.rotary_emb(hidden, pos)
        counted += _counted(layer, hidden, attention_mask=None, position_ids=pos, position_embeddings=rope)
    counted += _counted(model.lm_head, torch.randn(1, 1, cfg.hidden_size))
    assert counted == llm_prefill_flops(cfg, schedule, logits_tokens=1)
    assert llm_prefill_flops(cfg, schedule) == sum(llm_layer_flops(cfg, n) for n in schedule) + 2 * 64 * 300


def _vision_kwargs(**extra):
    return dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=56, patch_size=14, attn_implementation="eager", **extra)


def test_clip_vision_matches_flop_counter():
    cfg = CLIPVisionConfig(**_vision_kwargs())
    model = _seeded(CLIPVisionModel, cfg)
    assert vision_tokens_per_image(cfg) == 17  # 16 patches + CLS
    counted = _counted(lambda: model(pixel_values=torch.randn(3, 3, 56, 56)))
    assert counted == vision_flops(cfg, n_images=3, tokens=17) == vision_flops(cfg, 3)


@pytest.mark.parametrize("use_head", [False, True])
def test_siglip_vision_matches_flop_counter(use_head):
    cfg = SiglipVisionConfig(**_vision_kwargs(vision_use_head=use_head))
    model = _seeded(SiglipVisionModel, cfg)
    assert vision_tokens_per_image(cfg) == 16
    counted = _counted(lambda: model(pixel_values=torch.randn(2, 3, 56, 56)))
    assert counted == vision_flops(cfg, n_images=2, tokens=16)


@functools.cache
def _tiny_onevision():
    raw = json.loads(
        resources.files("vflowopt").joinpath("assets/tiny_llava_onevision/config.json").read_text()
    )
    raw.pop("model_type", None)
    model = _seeded(LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig(**raw))
    model.set_attn_implementation("eager")
    return model


def _onevision_inputs(model):
    # One 56x56 image: base crop + one 56x56 tile -> 16 + 4 x (4 + newline) = 36 image tokens.
    image_id = model.config.image_token_id
    ids = torch.tensor([[10] * 5 + [image_id] * 36 + [11] * 6])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(1, 2, 3, 56, 56),
                image_sizes=torch.tensor([[56, 56]]))


def test_llava_onevision_end_to_end_unpruned_and_pruned():
    """Vision + projector + LLM; pruned: the LLM at kv_tokens_per_layer plus the ViT scoring overhead."""
    model = _tiny_onevision()
    cfg = model.config
    inputs = _onevision_inputs(model)
    n_layers = cfg.text_config.num_hidden_layers
    prompt = inputs["input_ids"].shape[1]
    front = vision_flops(cfg.vision_config, n_images=2) + projector_flops(cfg, 2 * 16)

    counted = _counted(lambda: model(**inputs, logits_to_keep=1))
    assert counted == front + llm_prefill_flops(cfg.text_config, [prompt] * n_layers)

    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.25)) as handle:
        counted = _counted(lambda: model(**inputs, logits_to_keep=1))
        kv = list(handle.stats.kv_tokens_per_layer)
    assert len(kv) == n_layers and max(kv) < prompt
    expected = front + vision_scoring_flops(cfg.vision_config, n_images=2)
    expected += llm_prefill_flops(cfg.text_config, kv)
    assert counted == expected
