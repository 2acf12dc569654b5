"""LLM attention rows read from inside a layer's attention call, for every family's text model."""

from __future__ import annotations

import pytest
import torch

from conftest import one_image_inputs
from vflowopt.signals.llm_attention import attention_rows, tap_attention
from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import tiny_qwen2_vl, tiny_qwen3_vl


def _models():
    yield "llava", None
    yield "qwen2_vl", tiny_qwen2_vl
    yield "qwen3_vl", tiny_qwen3_vl


@pytest.mark.parametrize("family,builder", list(_models()))
def test_tapped_rows_equal_eager_attention_and_outputs_are_unchanged(make_model, family, builder):
    if builder is None:
        model, proc = make_model("llava", "eager")
    else:
        model, proc = builder(attn_implementation="eager")
    inputs = build_inputs(proc, [example_image(), example_image(seed=3)], ["Compare them.", "What?"])
    layer = 2
    attn = model.model.language_model.layers[layer].self_attn
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True)
    seen = {}

    def callback(module, query, key, value, mask, scaling):
        rows = torch.arange(query.shape[2]).expand(query.shape[0], -1)
        seen["rows"] = attention_rows(query, key, rows, scaling, mask)

    untap = tap_attention(attn, callback)
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        untap()
    assert attn.config is model.model.language_model.config or attn.config._attn_implementation == "eager"
    assert torch.equal(out.logits, ref.logits)
    expected = ref.attentions[layer].float().mean(1)  # heads averaged
    valid = inputs["attention_mask"].bool()
    got = seen["rows"]
    for b in range(expected.shape[0]):
        rows = valid[b].nonzero().squeeze(-1)  # padded query rows are meaningless in both
        assert torch.allclose(got[b, rows], expected[b, rows], atol=1e-5)


def test_tap_is_bit_identical_under_sdpa(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
    untap = tap_attention(model.model.language_model.layers[1].self_attn, lambda *a: None)
    with torch.no_grad():
        out = model(**inputs).logits
    untap()
    assert torch.equal(out, ref)
    assert model.model.language_model.layers[1].self_attn.config is model.model.language_model.config
