"""DART (duplication-aware token reduction): the pivot and duplicate selection on hand-made tensors, the
budget arithmetic (as FastV's) and its refusals, bad configs, the search space, and end to end on a tiny
model with two images (each keeps its share, its own pivots among them). What every method must pass on
every family (identity at 1.0, KV lengths, decode, remove, JSON, batch) is in test_conformance.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import vflowopt
from vflowopt.config import ConfigError, config_for
from vflowopt.methods.dart import DARTConfig, dart_keep_ratio, dart_select, split_quota
from vflowopt.methods.pdrop import staged_mean
from vflowopt.tiny import build_inputs, example_image


def _adapter(num_layers: int = 32, min_layer: int = 0, family: str = "llava"):
    return SimpleNamespace(num_llm_layers=num_layers, min_llm_prune_layer=min_layer, family=family)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


# -- selection on hand-made tensors ----------------------------------------------------------------------
# Six image tokens in 2-D: t0 = (1, 0) has the largest key norm (the image pivot); one text token (0, 1).
STATES = _t([[1, 0], [0.9, 0.1], [0, 1], [-1, 0], [0.1, 0.9], [0.7, 0.7]])
NORMS = _t([5, 1, 1, 1, 1, 1])
TEXT, TEXT_NORMS = _t([[0, 1]]), _t([1])


def test_each_pivot_takes_the_tokens_least_similar_to_it():
    # keep 3 = the image pivot t0 + 2 more, one per pivot (2 pivots: t0, then the text token):
    #   t0 = (1, 0): cosines t1 .99, t2 0, t3 -1, t4 .11, t5 .71 -> t3 (the opposite direction)
    #   text (0, 1): cosines t1 .11, t2 1, t4 .99, t5 .71 -> t1
    # t2 and t4 duplicate the text pivot, t5 sits between both: dropped
    assert dart_select(STATES, NORMS, TEXT, TEXT_NORMS, 3, 1, 1).tolist() == [0, 1, 3]
    # no text pivot: t0 takes both -> t3 (-1), then t2 (0)
    assert dart_select(STATES, NORMS, TEXT[:0], TEXT_NORMS[:0], 3, 1, 0).tolist() == [0, 2, 3]
    # an uneven split: 3 more over 2 pivots -> t0 takes 2 (t3, t2), the text pivot 1 (t1)
    assert dart_select(STATES, NORMS, TEXT, TEXT_NORMS, 4, 1, 1).tolist() == [0, 1, 2, 3]
    # the keys are not the states: pivots follow the key norm (here t5), duplicates the states
    norms = _t([1, 1, 1, 1, 1, 9])  # pivot t5 = (.7, .7): cosines t0 .71, t1 .78, t2 .71, t3 -.71, t4 .78
    assert dart_select(STATES, norms, TEXT[:0], TEXT_NORMS[:0], 2, 1, 0).tolist() == [3, 5]


def test_duplicates_of_a_pivot_are_dropped_first():
    # four copies of one vector (the first has the largest key norm) and two distinct tokens: keeping 3
    # keeps one copy and the two distinct tokens, whatever their norms
    states = _t([[1, 0], [1, 0], [1, 0], [1, 0], [0, 1], [-0.6, 0.8]])
    norms = _t([3, 2, 2, 2, 0.1, 0.1])
    assert dart_select(states, norms, TEXT[:0], TEXT_NORMS[:0], 3, 1, 0).tolist() == [0, 4, 5]


def test_pivots_ties_and_small_counts():
    # keep <= pivot_image_tokens: the largest key norms only
    assert dart_select(STATES, NORMS, TEXT, TEXT_NORMS, 2, 4, 4).tolist() == [0, 1]  # norm ties: the earliest
    assert dart_select(STATES, _t([1, 2, 3, 4, 5, 6]), TEXT, TEXT_NORMS, 2, 4, 4).tolist() == [4, 5]
    # equal cosines: the earliest token
    states = _t([[1, 0], [0, 1], [0, -1], [0, 1]])
    assert dart_select(states, _t([9, 1, 1, 1]), TEXT[:0], TEXT_NORMS[:0], 2, 1, 0).tolist() == [0, 1]
    # keep everything / nothing
    assert dart_select(STATES, NORMS, TEXT, TEXT_NORMS, 6, 4, 4).tolist() == list(range(6))
    assert dart_select(STATES, NORMS, TEXT, TEXT_NORMS, 0, 4, 4).tolist() == []
    # more text pivots asked than text tokens: every text token is a pivot
    assert dart_select(STATES, NORMS, TEXT, TEXT_NORMS, 3, 1, 8).tolist() == [0, 1, 3]
    assert split_quota(7, 3) == [3, 2, 2] and split_quota(2, 4) == [1, 1, 0, 0] and split_quota(5, 0) == []


# -- budget -------------------------------------------------------------------------------------------------
def test_budget_arithmetic_and_refusals():
    assert dart_keep_ratio(0.25, 2, 32) == pytest.approx((8 - 2) / 30)
    assert dart_keep_ratio(1.0, 2, 6) == 1.0
    cfg = DARTConfig(budget=0.25).resolve(_adapter(32))
    assert cfg.layer == 2 and cfg.keep_ratio == pytest.approx(0.2)
    assert (cfg.pivot_image_tokens, cfg.pivot_text_tokens) == (4, 4)
    assert staged_mean([cfg.keep_ratio], [cfg.layer], 32) == pytest.approx(0.25)
    # the official reduction_ratio 0.778 at K = 2 of 32 layers: keep_ratio 0.222, the budget derived
    cfg = DARTConfig(keep_ratio=0.222).resolve(_adapter(32))
    assert cfg.budget == pytest.approx((2 + 0.222 * 30) / 32)
    with pytest.raises(ConfigError, match=r"2/32 = 0\.0625 of the mean retention already; budget 0\.05 is below "
                                          r"that\. Use a budget >= 0\.0625 or an earlier layer \(K <= 1\)"):
        DARTConfig(budget=0.05).resolve(_adapter(32))
    with pytest.raises(ConfigError, match=r"no layer K >= 1 reaches a budget below 1/32"):
        DARTConfig(budget=0.02).resolve(_adapter(32))
    with pytest.raises(ConfigError, match="not the budget"):
        DARTConfig(budget=0.5, keep_ratio=0.9).resolve(_adapter(32))
    with pytest.raises(ConfigError, match=r"must lie in \[1, 5\]"):
        DARTConfig(budget=0.9, layer=6).resolve(_adapter(6))
    # deepstack (Qwen3-VL): pruning only from the adapter's first allowed layer on
    assert DARTConfig(budget=0.5).resolve(_adapter(36, min_layer=3, family="qwen3_vl")).layer == 3
    with pytest.raises(ConfigError, match="only from layer 3"):
        DARTConfig(budget=0.5, layer=2).resolve(_adapter(36, min_layer=3, family="qwen3_vl"))


@pytest.mark.parametrize("fields, match", [
    ({}, "needs a budget"),
    ({"budget": 0.5, "layer": 0}, ">= 1"),
    ({"budget": 0.5, "layer": 2.0}, "integer"),
    ({"keep_ratio": 1.5}, r"keep_ratio must be a number in \[0, 1\]"),
    ({"budget": 0.5, "pivot_image_tokens": 0}, "pivot_image_tokens must be an integer >= 1"),
    ({"budget": 0.5, "pivot_text_tokens": -1}, "pivot_text_tokens must be an integer >= 0"),
    ({"budget": 0.5, "pivot_text_tokens": 4.0}, "pivot_text_tokens must be an integer"),
    ({"budget": 0.5, "pivot_image_tokens": None}, "pivot_image_tokens must be an integer"),
])
def test_bad_configs_are_refused_at_construction(fields, match):
    with pytest.raises(ConfigError, match=match):
        DARTConfig(**fields)


def test_search_space():
    space = DARTConfig.search_space(0.25, 32)
    assert space.names == ("K", "image_pivots", "text_pivots")
    assert space.summary() == {"K": [1, 8], "image_pivots": [1, 16], "text_pivots": [0, 16]}
    cand = space.candidate({"K": 4, "image_pivots": 2, "text_pivots": 0})
    assert cand.fields == {"layer": 4, "pivot_image_tokens": 2, "pivot_text_tokens": 0} and cand.feasible
    assert cand.info["keep_ratio"] == pytest.approx(4 / 28)
    assert space.candidate({"K": 8, "image_pivots": 1, "text_pivots": 1}).info["keep_ratio"] == 0.0
    cfg = DARTConfig(budget=0.25, **cand.fields).resolve(_adapter(32))
    assert staged_mean([cfg.keep_ratio], [cfg.layer], 32) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="cannot meet budget"):
        DARTConfig.search_space(0.02, 32)


# -- end to end -----------------------------------------------------------------------------------------
def test_two_images_keep_their_share_and_their_pivots(make_model):
    """LLaVA-OneVision, two images of different sizes: each keeps round(r·n) of its own tokens, among them
    its own 4 largest-key-norm tokens; newline tokens are never dropped."""
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = build_inputs(proc, [example_image(seed=1), example_image(seed=2, size=(64, 64))], ["Compare them."])
    seen = {}
    with vflowopt.pruned(model, config_for("dart", budget=0.75)) as h:
        method = h._engine.method
        original = method.at_layer

        def spy(ctx, layer, current, hidden):
            seen.update(norms=method._key_norms.clone(), pos=ctx.visual_pos.clone(), tokens=ctx.layout.tokens,
                        current=current.clone(), layer=layer)
            seen["keep"] = original(ctx, layer, current, hidden)
            return seen["keep"]

        method.at_layer = spy
        with torch.no_grad():
            model(**inputs)
        stats, cfg = h.stats, h.config
    assert seen["layer"] == 2 and cfg.keep_ratio == pytest.approx(0.625)
    t, cur, keep = seen["tokens"], seen["current"][0], seen["keep"][0]
    image, prunable = t.image[0, cur], t.prunable[0, cur]
    total = 0
    for g in (0, 1):
        mine = (image == g) & prunable
        n = int(mine.sum())
        kept = int((keep & mine).sum())
        assert kept == round(0.625 * n) and kept > 4
        total += kept
        norms = seen["norms"][0, seen["pos"][0, mine]]
        pivots = mine.nonzero().squeeze(-1)[torch.argsort(norms, descending=True, stable=True)[:4]]
        assert bool(keep[pivots].all())
    assert not bool(keep[~prunable].any())  # the runtime keeps newline tokens; the method never proposes them
    assert stats.stages[-1] == ("layer 2", total)
