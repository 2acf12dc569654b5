"""VFlowOpt on a tiny LLaVA-NeXT: CLIP with CLS, anyres tiles with unpadding and newline tokens."""

from __future__ import annotations

import functools

import pytest
import torch

import vflowopt
from checks import check_batch_equals_singles, check_cache_and_decode, check_identity, generate
from vflowopt.models.base import adapter_for
from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import tiny_llava_next

ATTN = ["sdpa", "eager"]
STRATEGY = dict(threshold=1.5, entropy_weight=0.5, grid_size=2)
_BUILT: list = []


@functools.cache
def _model(attn: str):
    pair = tiny_llava_next(attn_implementation=attn)
    _BUILT.append(pair[0])
    return pair


@pytest.fixture(autouse=True)
def _unprune():
    yield
    for model in _BUILT:
        vflowopt.unprune(model)


def _inputs(proc, seeds=(0,), sizes=((80, 120),), prompt="What is in the image?"):
    return build_inputs(proc, [example_image(seed=s, size=z) for s, z in zip(seeds, sizes)], [prompt])


@pytest.mark.parametrize("attn", ATTN)
def test_identity_at_full_budget(attn):
    model, proc = _model(attn)
    check_identity(model, _inputs(proc), vflowopt.VFlowOptConfig(budget=1.0, **STRATEGY))


@pytest.mark.parametrize("attn", ATTN)
def test_cache_lengths_and_decode_match_no_cache_forward(attn):
    model, proc = _model(attn)
    stats = check_cache_and_decode(model, _inputs(proc), vflowopt.VFlowOptConfig(budget=0.3, **STRATEGY))
    assert stats.visual_tokens == 64  # newline tokens are kept and not counted as visual tokens


def _vit_level_features(model, pixel_values):
    """Projected features per crop before packing (CLS dropped): (n_crops, 16, D)."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    return model.model.multi_modal_projector(hidden[model.config.vision_feature_layer][:, 1:])


def _check_alignment(model, inputs, pixel_values):
    adapter = adapter_for(model)
    mask = inputs["input_ids"] == model.config.image_token_id
    with torch.no_grad():
        vit = _vit_level_features(model, pixel_values)
        layout = adapter.layout(mask, {"image_sizes": inputs["image_sizes"]}, vit.shape[0])
        merged = model.model(**inputs, output_hidden_states=True).hidden_states[0]
    t = layout.tokens
    visual = torch.gather(merged, 1, t.seq_index.unsqueeze(-1).expand(-1, -1, merged.shape[-1]))
    for channel in (0, 7, 31):
        packed = layout.pack(vit[..., channel])
        assert torch.allclose(packed[t.prunable], visual[..., channel][t.prunable], atol=1e-5)
        assert torch.isnan(packed[~t.prunable]).all()
    # newline tokens carry the model's image_newline
    assert torch.allclose(visual[~t.prunable], model.model.image_newline.expand(int((~t.prunable).sum()), -1))
    return layout


def test_anyres_tiles_unpadding_and_newlines_align_with_features():
    model, proc = _model("sdpa")
    inputs = _inputs(proc)  # 80×120 (w×h): pinpoint 112×112, base tile + 2×2 crops
    n_crops = int(inputs["pixel_values"].shape[1])
    layout = _check_alignment(model, inputs, inputs["pixel_values"][0, :n_crops])
    t = layout.tokens
    # 16 base tokens, then an 8-row × (6 + newline) unpadded crop grid
    assert t.count == 16 + 8 * 7 and int((~t.prunable).sum()) == 8
    assert (t.grid[0, :16] == 0).all() and (t.grid[0, 16:] == 1).all()
    crop = slice(16, None)
    assert t.col[0, crop][~t.prunable[0, crop]].unique().tolist() == [6]
    assert t.row[0, crop].max() == 7 and t.col[0, crop][t.prunable[0, crop]].max() == 5
    assert torch.equal(t.region[0, 5], torch.tensor([14.0, 14.0, 28.0, 28.0]))
    assert adapter_for(model).vit_prefix_tokens == 1


def test_importance_pooling_by_hand():
    """A ViT map packs to the right tokens: base tile as is, crops reassembled and unpadded."""
    model, proc = _model("sdpa")
    inputs = _inputs(proc)
    adapter = adapter_for(model)
    layout = adapter.layout(inputs["input_ids"] == 5, {"image_sizes": inputs["image_sizes"]}, 5)
    # crop k (0 = base) patch p gets value 100·k + p
    vit = 100.0 * torch.arange(5.0).view(5, 1) + torch.arange(16.0).view(1, 16)
    packed = layout.pack(vit)[0]
    assert packed[:16].tolist() == list(range(16))
    # 120 h × 80 w on the 112×112 pinpoint: 2×2 crops = an 8×8 patch canvas. The image fills
    # round(80·8/120) = 5 columns, so unpadding drops (8 - 5) // 2 = 1 column on each side: 8×6 tokens,
    # each row followed by a newline. Crop-grid token (r, c) is canvas patch (r, c + 1).
    crop = packed[16:].view(8, 7)
    assert torch.isnan(crop[:, -1]).all()
    for r in range(8):
        for c in range(6):
            y, x = r, c + 1
            assert crop[r, c].item() == 100 * (1 + (y // 4) * 2 + x // 4) + (y % 4) * 4 + x % 4


def test_batch_equals_singles():
    model, proc = _model("sdpa")
    images = [example_image(seed=1), example_image(seed=2)]
    check_batch_equals_singles(model, proc, images, vflowopt.VFlowOptConfig(budget=0.25, **STRATEGY), n_new=4)


def test_two_images_in_one_prompt_each_keep_their_share():
    model, proc = _model("sdpa")
    inputs = _inputs(proc, seeds=(1, 2), sizes=((80, 120), (112, 56)), prompt="Compare them.")
    layout = _check_alignment(model, inputs, torch.cat([inputs["pixel_values"][0, :5], inputs["pixel_values"][1, :3]]))
    assert layout.tokens.image[0].unique().tolist() == [0, 1]
    kept = {}
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.5, **STRATEGY)) as h:
        original = h._engine.method.before_llm

        def spy(ctx):
            sel = original(ctx)
            t = ctx.layout.tokens
            for img in t.image[0].unique().tolist():
                on = (t.image[0] == img) & t.prunable[0]
                kept[img] = (int(on.sum()), int((sel.keep[0] & on).sum()))
            return sel

        h._engine.method.before_llm = spy
        generate(model, inputs, 2)
    r1 = h.config.retention[0]
    assert len(kept) == 2 and all(k == round(r1 * n) for n, k in kept.values())
