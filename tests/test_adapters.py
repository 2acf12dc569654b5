"""Adapters: every visual token is located, and ViT-level maps align 1:1 with the features."""

from __future__ import annotations

import torch

from conftest import one_image_inputs
from vflowopt.models.base import adapter_for
from vflowopt.tiny import build_inputs, example_image


def _vit_level_features(model, pixel_values):
    """Projected features before packing: (n_crops, n_patches, D)."""
    base = model.model
    out = base.vision_tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[model.config.vision_feature_layer]
    if model.config.vision_feature_select_strategy == "default":
        hidden = hidden[:, 1:]
    return base.multi_modal_projector(hidden)


def _layout(model, inputs, crops):
    adapter = adapter_for(model)
    mask = inputs["input_ids"] == model.config.image_token_id
    kw = {k: inputs.get(k) for k in ("image_sizes", "batch_num_images")}
    return adapter.layout(mask, kw, crops)


def _check_alignment(model, inputs, pixel_values):
    with torch.no_grad():
        vit = _vit_level_features(model, pixel_values)
        layout = _layout(model, inputs, vit.shape[0])
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
        merged = model.model(**inputs, output_hidden_states=True).hidden_states[0]
    tokens = layout.tokens
    visual = torch.gather(merged, 1, tokens.seq_index.unsqueeze(-1).expand(-1, -1, merged.shape[-1]))
    for channel in (0, 5, 17):
        packed = layout.pack(vit[..., channel])
        ok = tokens.prunable
        # pack() went through the same reshaping, unpadding and resizing as the features
        assert torch.allclose(packed[ok], visual[..., channel][ok], atol=1e-5)
        assert torch.isnan(packed[~ok]).all()
    assert not torch.equal(visual, torch.gather(embeds, 1, tokens.seq_index.unsqueeze(-1).expand_as(visual)))
    return layout


def test_onevision_anyres_map_aligns_with_features(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    n_crops = inputs["pixel_values"].shape[1]
    layout = _check_alignment(model, inputs, inputs["pixel_values"][0, :n_crops])
    t = layout.tokens
    # 16 base tokens, then the unpadded 8x6 crop grid with a newline column
    assert t.count == 72 and int((~t.prunable).sum()) == 8
    assert (t.grid[0, :16] == 0).all() and (t.grid[0, 16:] == 1).all()
    crop = slice(16, None)
    assert t.col[0, crop][~t.prunable[0, crop]].unique().tolist() == [6]
    assert t.row[0, crop].max() == 7 and t.col[0, crop][t.prunable[0, crop]].max() == 5
    # base grid regions are the 14 px patches of the 56 px base image
    assert torch.equal(t.region[0, 5], torch.tensor([14.0, 14.0, 28.0, 28.0]))


def test_onevision_downscaled_grid_aligns(make_model):
    """A large image whose crop grid exceeds anyres_max_9 is bilinearly downscaled."""
    model, proc = make_model("llava_onevision", "sdpa")
    old = model.config.vision_aspect_ratio
    # force the downscaling branch on a tiny model (processor and model agree on the token count)
    model.config.vision_aspect_ratio = proc.vision_aspect_ratio = "anyres_max_1"
    try:
        inputs = one_image_inputs(proc)
        n_crops = inputs["pixel_values"].shape[1]
        layout = _check_alignment(model, inputs, inputs["pixel_values"][0, :n_crops])
    finally:
        model.config.vision_aspect_ratio = proc.vision_aspect_ratio = old
    assert layout.tokens.count < 72


def test_onevision_multi_image_prompt(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = build_inputs(proc, [example_image(seed=1), example_image(seed=2, size=(64, 64))], ["Compare."])
    layout = _check_alignment(model, inputs, inputs["pixel_values"][:, 0])
    t = layout.tokens
    assert t.image[0].unique().tolist() == [0, 1]
    assert int((~t.prunable).sum()) == 2  # one trailing newline per untiled image


def test_llava_tokens_are_the_patch_grid(make_model):
    model, proc = make_model("llava", "sdpa")
    inputs = one_image_inputs(proc)
    layout = _check_alignment(model, inputs, inputs["pixel_values"])
    t = layout.tokens
    assert t.count == 16 and bool(t.prunable.all())
    assert t.row[0].tolist() == [r for r in range(4) for _ in range(4)]
    assert t.col[0].tolist() == list(range(4)) * 4
    assert torch.equal(t.region[0, 7], torch.tensor([14.0, 42.0, 28.0, 56.0]))


def test_feature_layer_follows_the_config(make_model):
    llava, _ = make_model("llava", "sdpa")
    ov, _ = make_model("llava_onevision", "sdpa")
    # LLaVA: features from hidden_states[-2] = output of layer n-2; OneVision: the last layer
    assert adapter_for(llava).feature_layer() == len(llava.model.vision_tower.encoder.layers) - 2
    assert adapter_for(ov).feature_layer() == len(ov.model.vision_tower.encoder.layers) - 1
