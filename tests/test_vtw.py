"""VTW (visual tokens withdrawal): K from the budget and the refusal of budgets that are not a multiple of
1/L, bad configs, the withdrawal on hand-made tensors, and end to end on tiny models (one token per image
kept by default, none with withdraw_all). What every method must pass on every family (identity at 1.0,
KV lengths, decode, remove, JSON, batch) is in test_conformance.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vflowopt
from checks import check_cache_and_decode
from conftest import one_image_inputs
from vflowopt.config import ConfigError, config_for
from vflowopt.methods.base import PrefillContext
from vflowopt.methods.vtw import VTWConfig, VTWMethod, vtw_layer
from vflowopt.models.base import VisualTokens
from vflowopt.tiny import build_inputs, example_image


def _adapter(num_layers: int = 32, min_layer: int = 0, family: str = "llava"):
    return SimpleNamespace(num_llm_layers=num_layers, min_llm_prune_layer=min_layer, family=family)


# -- K from the budget ------------------------------------------------------------------------------
def test_the_budget_fixes_k():
    assert vtw_layer(0.5, 32) == 16  # the official K for LLaVA-1.5-7B (32 layers)
    assert vtw_layer(0.5, 40) == 20  # ... and for 13B (40 layers)
    assert vtw_layer(0.25, 32) == 8
    assert vtw_layer(0.094, 32) == 3  # within 1e-3 of 3/32 = 0.09375
    assert vtw_layer(0.333, 6) == 2
    assert vtw_layer(1.0, 6) == 6  # K = L: nothing withdrawn
    cfg = VTWConfig(budget=0.094).resolve(_adapter(32))
    assert cfg.layer == 3 and cfg.budget == 3 / 32  # the resolved config records the budget spent
    assert cfg.model_family == "llava" and cfg.num_layers == 32
    assert cfg.resolve(_adapter(32)) == cfg  # resolving again changes nothing
    # K given instead of the budget
    assert VTWConfig(layer=4).resolve(_adapter(6)).budget == pytest.approx(4 / 6)
    assert VTWConfig(layer=4, budget=0.6667).resolve(_adapter(6)).layer == 4


def test_a_budget_off_the_grid_is_refused_with_the_nearest_ones():
    with pytest.raises(ConfigError, match=r"multiple of 1/32 = 0\.0312.*budget 0\.1 is not one of them\. "
                                          r"Nearest: 0\.0938 \(K = 3\) or 0\.1250 \(K = 4\)"):
        VTWConfig(budget=0.1).resolve(_adapter(32))
    with pytest.raises(ConfigError, match=r"Nearest: 0\.1667 \(K = 1\) or 0\.3333 \(K = 2\)"):
        VTWConfig(budget=0.33).resolve(_adapter(6))
    with pytest.raises(ConfigError, match=r"Nearest: 0\.1667 \(K = 1\);"):  # K = 0 is no option
        VTWConfig(budget=0.1).resolve(_adapter(6))
    # deepstack (Qwen3-VL): withdrawal only from the adapter's first allowed layer on
    qwen3 = _adapter(6, min_layer=2, family="qwen3_vl")
    with pytest.raises(ConfigError, match=r"needs K = 1, but this model can withdraw visual tokens only from "
                                          r"layer 2 on.*Nearest: 0\.3333 \(K = 2\)"):
        VTWConfig(budget=1 / 6).resolve(qwen3)
    with pytest.raises(ConfigError, match=r"only from layer 2 on\); budget 0\.1 is not one.*0\.3333 \(K = 2\)"):
        VTWConfig(budget=0.1).resolve(qwen3)
    assert VTWConfig(budget=0.5).resolve(qwen3).layer == 3
    with pytest.raises(ConfigError, match=r"must lie in \[2, 6\]"):
        VTWConfig(layer=1).resolve(qwen3)
    with pytest.raises(ConfigError, match=r"must lie in \[1, 6\]"):
        VTWConfig(layer=7).resolve(_adapter(6))
    with pytest.raises(ConfigError, match="not the budget"):
        VTWConfig(layer=3, budget=0.25).resolve(_adapter(6))


@pytest.mark.parametrize("fields, match", [
    ({}, "needs a budget"),
    ({"layer": 0}, ">= 1"),
    ({"layer": True}, "integer"),
    ({"layer": 2.0}, "integer"),
    ({"budget": 0.0}, r"\(0, 1\]"),
    ({"budget": 1.5}, r"\(0, 1\]"),
    ({"budget": 0.5, "withdraw_all": "yes"}, "true or false"),
])
def test_bad_configs_are_refused_at_construction(fields, match):
    with pytest.raises(ConfigError, match=match):
        VTWConfig(**fields)


def test_no_search_space():
    with pytest.raises(ConfigError, match="no numeric hyper-parameter.*K = B·L"):
        VTWConfig.search_space(0.5, 32)


# -- the withdrawal on hand-made tensors ------------------------------------------------------------------
def _ctx(images: list[int], prunable: list[bool]) -> PrefillContext:
    n = len(images)
    z = torch.zeros(1, n, dtype=torch.long)
    tokens = VisualTokens(seq_index=torch.arange(3, 3 + n).view(1, n), image=torch.tensor([images]), grid=z, row=z,
                          col=z, region=torch.zeros(1, n, 4), prunable=torch.tensor([prunable]))
    layout = SimpleNamespace(tokens=tokens)
    return PrefillContext(layout=layout, features=torch.zeros(1, n, 2),
                          image_mask=torch.zeros(1, n + 5, dtype=torch.bool))


def test_each_image_keeps_its_last_token_or_none():
    # image 0: tokens 0-3 (3 is a newline: never a candidate); image 1: tokens 4-6
    ctx = _ctx([0, 0, 0, 0, 1, 1, 1], [True, True, True, False, True, True, True])
    current = torch.tensor([[0, 1, 2, 3, 4, 5, 6]])
    method = VTWMethod(VTWConfig(budget=0.5).resolve(_adapter(6)), _adapter(6))
    assert method.llm_layers == (3,) and method.llm_attention_layers == () and not method.prunes_before_llm
    keep = method.at_layer(ctx, 3, current, torch.zeros(1, 12, 2))
    assert keep[0].nonzero().squeeze(-1).tolist() == [2, 6]  # the last prunable token of each image
    # a subset still present (e.g. after earlier pruning): the last one present
    keep = method.at_layer(ctx, 3, torch.tensor([[0, 1, 4, 5]]), torch.zeros(1, 12, 2))
    assert keep[0].tolist() == [False, True, False, True]
    withdraw = VTWMethod(VTWConfig(budget=0.5, withdraw_all=True).resolve(_adapter(6)), _adapter(6))
    assert not bool(withdraw.at_layer(ctx, 3, current, torch.zeros(1, 12, 2)).any())
    # K = L: no layer to prune at, nothing installed inside the LLM
    assert VTWMethod(VTWConfig(budget=1.0).resolve(_adapter(6)), _adapter(6)).llm_layers == ()


# -- end to end -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("withdraw_all", [False, True])
def test_withdrawal_end_to_end(make_model, withdraw_all):
    """LLaVA-OneVision (newline tokens stay, as every method keeps them): layers K.. see one visual token
    per image (or none), their caches hold what they saw, decoding equals a no-cache forward."""
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    stats = check_cache_and_decode(model, inputs, VTWConfig(budget=0.5, withdraw_all=withdraw_all), n_new=3)
    n, kept = stats.visual_tokens, 0 if withdraw_all else 1
    assert stats.stages == [("before LLM", n), ("layer 3", kept)]
    assert stats.visual_tokens_per_layer == [n] * 3 + [kept] * 3
    prompt = inputs["input_ids"].shape[1]
    assert stats.kv_tokens_per_layer == [prompt] * 3 + [prompt - n + kept] * 3
    assert stats.mean_retention == pytest.approx(0.5 + (0 if withdraw_all else 3 / (6 * n)))


def test_two_images_keep_their_last_token_each(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = build_inputs(proc, [example_image(seed=1), example_image(seed=2, size=(64, 64))], ["Compare them."])
    seen = {}
    with vflowopt.pruned(model, config_for("vtw", budget=0.5)) as h:
        original = h._engine.method.at_layer

        def spy(ctx, layer, current, hidden):
            keep = original(ctx, layer, current, hidden)
            seen.update(keep=keep, current=current, tokens=ctx.layout.tokens)
            return keep

        h._engine.method.at_layer = spy
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    t = seen["tokens"]
    kept = seen["current"][0][seen["keep"][0]]
    last = [int(t.seq_index[0][(t.image[0] == g) & t.prunable[0]].max()) for g in (0, 1)]
    assert t.seq_index[0, kept].tolist() == last
    assert stats.stages[-1] == ("layer 3", 2)
