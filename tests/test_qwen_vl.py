"""VFlowOpt on tiny Qwen2-VL, Qwen2.5-VL and Qwen3-VL models: M-RoPE positions, merged patch groups,
window order, deepstack."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import vflowopt
from checks import check_batch_equals_singles, check_cache_and_decode, check_identity, generate, no_cache_last_logits
from conftest import all_hooks
from vflowopt.models.base import adapter_for
from vflowopt.signals.qwen_vision import qwen_vision_attention_probs
from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import QWEN_FAMILIES

FAMILIES = list(QWEN_FAMILIES)
ATTN = ["sdpa", "eager"]
STRATEGY = dict(threshold=1.5, entropy_weight=0.5, grid_size=2)
SIZE = (112, 168)  # 4×6 merged tokens with 14 px patches (Qwen3-VL, 16 px: 3×5)


@functools.cache
def _model(family: str, attn: str):
    return QWEN_FAMILIES[family](attn_implementation=attn)


@pytest.fixture(autouse=True)
def _unprune():
    yield
    for model, _ in _BUILT:
        vflowopt.unprune(model)


_BUILT: list = []


def make(family: str, attn: str = "sdpa"):
    pair = _model(family, attn)
    if pair not in _BUILT:
        _BUILT.append(pair)
    return pair


def _inputs(proc, seeds=(0,), prompt="What is in the image?"):
    return build_inputs(proc, [example_image(seed=s, size=SIZE) for s in seeds], [prompt])


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_full_budget(family, attn):
    model, proc = make(family, attn)
    check_identity(model, _inputs(proc), vflowopt.VFlowOptConfig(budget=1.0, **STRATEGY))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_lengths_and_generate_decode_match_no_cache_forward(family, attn):
    # the no-cache forward computes the M-RoPE positions itself (get_rope_index): this proves them
    model, proc = make(family, attn)
    inputs = _inputs(proc)
    stats = check_cache_and_decode(model, inputs, vflowopt.VFlowOptConfig(budget=0.3, **STRATEGY))
    assert stats.kv_tokens_per_layer[0] < inputs["input_ids"].shape[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_manual_decode_loop_continues_at_full_positions(family):
    """Without position_ids the model would continue at pruned-cache length + rope_deltas."""
    model, proc = make(family)
    inputs = _inputs(proc)
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.3, **STRATEGY)):
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            past, ids, logits = out.past_key_values, inputs["input_ids"], out.logits[:, -1]
            for _ in range(3):
                nxt = logits.argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
                step = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, logits = step.past_key_values, step.logits[:, -1]
        no_cache = no_cache_last_logits(model, inputs, ids)
        assert int(model.model.rope_deltas.abs().max()) > 0  # really M-RoPE, not 1-D positions
    assert torch.allclose(no_cache, logits, atol=1e-4)


def test_kept_tokens_keep_their_mrope_columns():
    model, proc = make("qwen2_vl")
    inputs = _inputs(proc)
    full, _ = model.model.get_rope_index(
        inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"], None, inputs["attention_mask"]
    )
    seen = []
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.3, **STRATEGY)) as h:
        spy = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.append(kw["position_ids"].clone()), with_kwargs=True
        )
        try:
            generate(model, inputs, 2)
        finally:
            spy.remove()
        engine = h._engine
        keep1 = engine._plan.keep1
    prefill, decode = seen[0], seen[1]
    assert prefill.shape[0] == 4 and prefill.shape[-1] == keep1.shape[1]  # generate(): [text; t; h; w]
    assert torch.equal(prefill[1:], full[:, :, keep1[0]])
    # the first decoded token sits right after the full prompt: max M-RoPE position + 1
    assert decode[1:, 0, 0].tolist() == [int(full.max()) + 1] * 3


def test_importance_and_entropy_pooling_by_hand():
    model, _ = make("qwen2_vl")
    adapter = adapter_for(model)
    # one image of 4×6 patches -> a 2×3 merged grid, behind 3 text tokens
    grid = torch.tensor([[1, 4, 6]])
    ids = torch.tensor([[9, 9, 9] + [5] * 6 + [9]])
    layout = adapter.layout(ids == 5, {"image_grid_thw": grid}, 24)
    t = layout.tokens
    assert t.seq_index[0].tolist() == list(range(3, 9))
    assert t.row[0].tolist() == [0, 0, 0, 1, 1, 1] and t.col[0].tolist() == [0, 1, 2, 0, 1, 2]
    assert torch.equal(t.region[0, 4], torch.tensor([28.0, 28.0, 56.0, 56.0]))  # (1, 1): a 28 px square
    # a ViT map in patch order (block-major: 4 consecutive patches per token) -> the mean of each group
    vit = torch.arange(24.0)
    assert layout.pack([vit])[0].tolist() == [1.5, 5.5, 9.5, 13.5, 17.5, 21.5]
    # entropy: over the whole 28×28 region of the group; token 0 flat, token 1 half black / half white
    adapter.on_vision_input((None,), {"grid_thw": grid})
    mean, std = adapter.image_mean, adapter.image_std
    px = torch.zeros(24, 3, 2, 14, 14)
    for c in range(3):
        px[:, c] = (0.5 - mean[c]) / std[c]  # mid grey everywhere
        px[4:6, c] = (0.0 - mean[c]) / std[c]  # token 1: two black patches ...
        px[6:8, c] = (1.0 - mean[c]) / std[c]  # ... and two white ones
    (h,) = adapter.patch_entropy(px.reshape(24, -1), mean, std)
    assert h.shape == (24,) and bool((h[:4] == 0).all())
    assert torch.allclose(h[4:8], torch.full((4,), math.log(2)))
    assert bool((h[8:] == 0).all())


def _block_inputs(model, inputs, block):
    """The inputs the ViT gives to `block`'s attention (captured with a throwaway hook)."""
    got = {}
    attn = model.model.visual.blocks[block].attn
    hook = attn.register_forward_pre_hook(lambda m, a, kw: got.update(hidden=a[0], **kw), with_kwargs=True)
    try:
        with torch.no_grad():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    finally:
        hook.remove()
    return attn, got


def test_vision_attention_equals_eager_per_segment():
    from transformers.models.qwen2_vl import modeling_qwen2_vl as q2

    model, proc = make("qwen2_vl")
    inputs = _inputs(proc, seeds=(1, 2))
    attn, got = _block_inputs(model, inputs, 1)
    lengths = [int(x.prod()) for x in inputs["image_grid_thw"]]
    maps = qwen_vision_attention_probs(attn, got["hidden"], got["cu_seqlens"], got["position_embeddings"], lengths)
    n = got["hidden"].shape[0]
    q, k, v = attn.qkv(got["hidden"]).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = q2.apply_rotary_pos_emb_vision(q, k, *got["position_embeddings"])
    start = 0
    for m, length in zip(maps, lengths):
        sl = slice(start, start + length)
        qs, ks, vs = (x[sl].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        _, weights = q2.eager_attention_forward(attn, qs, ks, vs, None, scaling=attn.scaling)
        assert torch.allclose(m, weights[0].mean(0), atol=1e-6)
        start += length


def test_qwen2_5_unpermutes_window_order_by_hand():
    model, proc = make("qwen2_5_vl")
    adapter = adapter_for(model)
    assert adapter.feature_layer() == 2  # the last full-attention block of [1, 2], not the last block
    inputs = _inputs(proc)
    gh, gw = (int(x) // 2 for x in inputs["image_grid_thw"][0, 1:])  # 4×6 merged, windows of 2×2
    adapter.on_vision_input((None,), {"grid_thw": inputs["image_grid_thw"]})
    by_hand = [(2 * wy + dy) * gw + 2 * wx + dx
               for wy in range(math.ceil(gh / 2)) for wx in range(math.ceil(gw / 2))
               for dy in range(2) for dx in range(2) if 2 * wy + dy < gh and 2 * wx + dx < gw]
    assert adapter.window_index().tolist() == by_hand
    # running position j holds merged token by_hand[j // 4], sub-patch j % 4
    running = [4 * by_hand[j // 4] + j % 4 for j in range(4 * gh * gw)]
    (order,) = adapter._image_order()
    assert [running[int(o)] for o in order] == list(range(4 * gh * gw))
    # the full-attention block's map un-permuted == the same attention computed in image order
    attn, got = _block_inputs(model, inputs, 2)
    (maps,) = adapter.vision_attention_probs(attn, (got["hidden"],), got)
    cos, sin = got["position_embeddings"]
    n = got["hidden"].shape[0]
    image_order = qwen_vision_attention_probs(
        attn, got["hidden"][order], torch.tensor([0, n]), (cos[order], sin[order]), [n]
    )[0]
    assert torch.allclose(maps, image_order, atol=1e-6)
    # a windowed block gives a map that is block-diagonal over windows (in image order: 2×2-token squares)
    attn0, got0 = _block_inputs(model, inputs, 0)
    (win,) = adapter.vision_attention_probs(attn0, (got0["hidden"],), got0)
    tok = torch.arange(n) // 4
    window_of = (tok // gw // 2) * 10 + (tok % gw) // 2
    assert bool((win[window_of[:, None] != window_of[None, :]] == 0).all())
    assert torch.allclose(win.sum(-1), torch.ones(n))


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_singles(family):
    model, proc = make(family)
    images = [example_image(seed=1, size=SIZE), example_image(seed=2, size=SIZE)]
    check_batch_equals_singles(model, proc, images, vflowopt.VFlowOptConfig(budget=0.25, **STRATEGY), n_new=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_images_in_one_prompt_each_keep_their_share(family):
    model, proc = make(family)
    inputs = build_inputs(proc, [example_image(seed=1, size=SIZE), example_image(seed=2, size=(56, 112))],
                          ["Compare them."])
    kept = {}
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.5, **STRATEGY)) as h:
        original = h._engine.method.before_llm

        def spy(ctx):
            sel = original(ctx)
            t = ctx.layout.tokens
            for img in t.image[0].unique().tolist():
                on = t.image[0] == img
                kept[img] = (int(on.sum()), int((sel.keep[0] & on).sum()))
            return sel

        h._engine.method.before_llm = spy
        out = generate(model, inputs, 3, return_dict_in_generate=True, output_logits=True)
        no_cache = no_cache_last_logits(model, inputs, out.sequences[:, :-1])
    r1 = h.config.retention[0]
    grid = inputs["image_grid_thw"]
    assert [n for n, _ in kept.values()] == [int(g.prod()) // 4 for g in grid]
    assert all(k == round(r1 * n) for n, k in kept.values())
    assert torch.allclose(no_cache, out.logits[-1], atol=1e-4)


def test_qwen3_refuses_pruning_before_the_deepstack_layers():
    model, _ = make("qwen3_vl")
    before = all_hooks(model)
    with pytest.raises(vflowopt.ConfigError, match="only from layer 2"):
        vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=0.3, stage_layers=(1, 4)))
    assert all_hooks(model) == before and "get_image_features" not in vars(model.model)
    vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=0.3, stage_layers=(2, 4))).remove()


def test_qwen3_pre_llm_pruning_slices_the_deepstack_inputs():
    model, proc = make("qwen3_vl")
    inputs = _inputs(proc)
    seen = {}
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.3, **STRATEGY)) as h:
        spy = model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: seen.update(kw), with_kwargs=True
        )
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            spy.remove()
        keep1 = h._engine._plan.keep1
    image = inputs["input_ids"][0, keep1[0]] == model.config.image_token_id
    assert torch.equal(seen["visual_pos_masks"][0], image)
    assert all(e.shape[0] == int(image.sum()) for e in seen["deepstack_visual_embeds"])
