"""ToMe (token merging): the bipartite matching on a hand-made 6-token case, merging over several rounds with
sizes, the schedule, configs and refusals, and end to end: the V point averages the merged rows by size,
proportional attention reaches the next layer's mask, Qwen merges whole 2×2 groups, and anyres images are
fitted to their exact share before the LLM. What every method must pass on every family (identity at 1.0,
KV lengths, decode, remove, JSON, batch) is in test_conformance.py."""

from __future__ import annotations

import pytest
import torch

import vflowopt
from conftest import one_image_inputs
from vflowopt.budget import keep_count
from vflowopt.config import ConfigError
from vflowopt.methods.base import VisionMerge, VisionState, merged_rows
from vflowopt.methods.tome import ToMeConfig, bipartite_match, merge_plan, merge_schedule
from vflowopt.models.base import adapter_for
from vflowopt.runtime.vision_point import _merge_rows
from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import tiny_qwen2_vl

# -- the matching on hand-made tensors -----------------------------------------------------------------------
# Six tokens in sequence order; A = the even positions (t0, t2, t4), B = the odd ones (t1, t3, t5).
METRIC = torch.tensor([[1, 0], [1, 0.1], [0, 1], [0.2, 1], [-1, 0.05], [0.6, 0.8]])
# cosine similarities, A rows against B columns:
#          t1      t3      t5
#   t0   0.995   0.196   0.600     -> best t1 (0.995)
#   t2   0.100   0.981   0.800     -> best t3 (0.981)
#   t4  -0.989  -0.147  -0.559     -> best t3 (-0.147)


def _ints(t: torch.Tensor) -> list[int]:
    return [int(v) for v in t]


def test_each_a_token_merges_into_its_most_similar_b_token_best_pairs_first():
    assert [_ints(t) for t in bipartite_match(METRIC, 1)] == [[0], [1]]
    assert [_ints(t) for t in bipartite_match(METRIC, 2)] == [[0, 2], [1, 3]]
    # two A tokens may share a destination: t2 and t4 both into t3
    assert [_ints(t) for t in bipartite_match(METRIC, 3)] == [[0, 2, 4], [1, 3, 3]]
    # one round merges at most the A tokens
    assert [_ints(t) for t in bipartite_match(METRIC, 5)] == [[0, 2, 4], [1, 3, 3]]
    # a protected (CLS) token is in neither set: t0 can neither merge nor receive
    protected = torch.tensor([True, False, False, False, False, False])
    assert [_ints(t) for t in bipartite_match(METRIC, 1, protected)] == [[2], [3]]
    assert [_ints(t) for t in bipartite_match(METRIC, 9, protected)] == [[2, 4], [3, 3]]
    # B tokens only: nothing to merge; nothing asked: nothing merged
    assert bipartite_match(METRIC[:1], 1)[0].numel() == 0 and bipartite_match(METRIC, 0)[0].numel() == 0


def test_ties_go_to_the_earliest_token():
    # t0 is equally similar to t1 and t3; t0 and t2 have equal best scores
    metric = torch.tensor([[1.0, 0], [1, 0], [1, 0], [1, 0]])
    assert [_ints(t) for t in bipartite_match(metric, 1)] == [[0], [1]]
    assert [_ints(t) for t in bipartite_match(metric, 2)] == [[0, 2], [1, 1]]


def test_merge_plan_tracks_sizes_and_merges_in_rounds():
    size = torch.tensor([1.0, 1, 2, 1, 1, 1])  # t2 already holds two tokens
    into, new = merge_plan(METRIC, size, 3)
    assert _ints(into) == [1, 1, 3, 3, 3, 5] and new.tolist() == [0, 2, 0, 4, 0, 1]
    # merged features: size-weighted means (t3 = (1·t3 + 2·t2 + 1·t4) / 4)
    rows, means = merged_rows(METRIC, size, into)
    assert _ints(rows) == [1, 3]
    assert torch.allclose(means[1], (METRIC[3] + 2 * METRIC[2] + METRIC[4]) / 4)
    assert torch.allclose(means[0], (METRIC[0] + METRIC[1]) / 2)
    # r = 4 needs a second round over the survivors t1, t3, t5 (A = t1, t5; B = t3), whose metric is the
    # size-weighted mean of their members: t1 ~ t0 + t1 = (2, .1), t3 ~ 2·t2 + t3 + t4 = (-.8, 3.05).
    # cos(t1, t3) = -0.21 < cos(t5, t3) = 0.62, so t5 goes into t3
    into, new = merge_plan(METRIC, size, 4)
    assert _ints(into) == [1, 1, 3, 3, 3, 3] and new.tolist() == [0, 2, 0, 5, 0, 0]
    into, new = merge_plan(METRIC, size, 5)  # a third round: t1 into t3
    assert _ints(into) == [3] * 6 and new.tolist() == [0, 0, 0, 7, 0, 0]
    into, _ = merge_plan(METRIC, size, 0)
    assert _ints(into) == list(range(6))


def test_schedule():
    assert merge_schedule(10, 3) == [4, 3, 3]  # constant r, the remainder on the first layers
    assert merge_schedule(12, 3, -1.0) == [8, 4, 0]  # official parse_r((4, -1)) over 3 layers
    assert merge_schedule(12, 3, 1.0) == [0, 4, 8]
    assert merge_schedule(10, 3, -1.0) == [7, 3, 0] and merge_schedule(7, 4, 0.5) == [1, 1, 2, 3]
    assert merge_schedule(5, 1) == [5] and merge_schedule(0, 4) == [0, 0, 0, 0] and merge_schedule(3, 0) == []


def test_the_vision_point_averages_merged_rows_by_weight():
    state = VisionState(ids=torch.arange(4).expand(2, 4), flat=False, prefix=1, full=[4, 4])
    hidden = torch.arange(24, dtype=torch.float32).view(2, 4, 3)
    keep = torch.tensor([[True, True, False, True], [True, False, True, True]])
    into = torch.tensor([[-1, -1, 1, -1], [-1, 3, -1, -1]])
    weight = torch.tensor([[1.0, 3, 1, 1], [1, 1, 1, 2]])
    out = _merge_rows(state, hidden, VisionMerge(keep=keep, into=into, weight=weight))
    assert torch.equal(out[0, 1], (3 * hidden[0, 1] + hidden[0, 2]) / 4)
    assert torch.equal(out[1, 3], (2 * hidden[1, 3] + hidden[1, 1]) / 3)
    untouched = torch.ones(2, 4, dtype=torch.bool)
    untouched[0, 1] = untouched[1, 3] = False
    assert torch.equal(out[untouched], hidden[untouched])
    with pytest.raises(vflowopt.PruningError, match="must name a kept row"):  # into a removed row
        _merge_rows(state, hidden, VisionMerge(keep=keep, into=torch.tensor([[-1, -1, 2, -1], [-1, 3, -1, -1]]),
                                                weight=weight))


# -- configs ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, match", [
    ({}, "needs a budget"),
    ({"budget": 0.5, "start_layer": 0}, "start_layer must be an integer >= 1"),
    ({"budget": 0.5, "start_layer": 1.0}, "start_layer must be"),
    ({"budget": 0.5, "inflect": 1.5}, r"inflect must be a number in \[-1, 1\]"),
    ({"budget": 0.5, "proportional_attention": "yes"}, "proportional_attention must be"),
])
def test_bad_configs_are_refused_at_construction(fields, match):
    with pytest.raises(ConfigError, match=match):
        ToMeConfig(**fields)


def test_resolve_and_search_space(make_model):
    model, _ = make_model("llava", "sdpa")
    adapter = adapter_for(model)
    cfg = ToMeConfig(budget=0.5).resolve(adapter)
    f = adapter.feature_layer()
    assert (cfg.start_layer, cfg.vision_layer, cfg.proportional_attention) == (1, f, True)
    assert ToMeConfig(budget=0.5, proportional_attention=False).resolve(adapter).proportional_attention is False
    with pytest.raises(ConfigError, match=rf"start_layer must lie in \[1, {f}\]"):
        ToMeConfig(budget=0.5, start_layer=f + 1).resolve(adapter)
    with pytest.raises(ConfigError, match="vision_layer 0 has none"):
        ToMeConfig(budget=0.5, vision_layer=0).resolve(adapter)
    space = ToMeConfig.search_space(0.25, 32)
    assert space.names == ("inflect", "proportional_attention")
    assert space.candidate({"inflect": -0.5, "proportional_attention": 0}).fields == {
        "inflect": -0.5, "proportional_attention": False}
    assert space.candidate({"inflect": 0.0, "proportional_attention": 1}).fields["proportional_attention"] is None


# -- end to end ---------------------------------------------------------------------------------------------
def _spy_merges(method):
    seen = []
    original = method.at_vision_layer

    def spy(layer, state):
        out = original(layer, state)
        seen.append((layer, out))
        return out

    method.at_vision_layer = spy
    return seen


def test_llava_merges_by_size_and_biases_the_next_layers_attention(make_model):
    """LLaVA-1.5 (CLIP, CLS): at the input of layer 1 each kept row is the size-weighted mean of its members
    of layer 0's output, CLS is never merged, layer 1's attention gets log(size) per key, and the LLM
    receives keep_count(16, 0.25) tokens."""
    model, proc = make_model("llava", "sdpa")
    inputs = one_image_inputs(proc)
    layers = adapter_for(model).vision_layers
    with vflowopt.pruned(model, vflowopt.config_for("tome", budget=0.25)) as h:
        assert h.config.vision_layer == 1 and h.config.proportional_attention
        seen, got = _spy_merges(h._engine.method), {}
        hooks = [layers[0].register_forward_hook(lambda m, a, o: got.update(out0=o.detach().clone())),
                 layers[1].register_forward_pre_hook(
                     lambda m, a, kw: got.update(in1=a[0].detach().clone(), mask1=a[1]), with_kwargs=True)]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for hook in hooks:
                hook.remove()
        stats = h.stats
    (layer, merge), = seen
    assert layer == 1 and isinstance(merge, VisionMerge)
    n = merge.keep.shape[1]  # 1 CLS + 16 patches
    assert bool(merge.keep[:, 0].all()) and int(merge.keep.sum()) == 1 + keep_count(16, 0.25)
    target = torch.where(merge.keep, torch.arange(n), merge.into)
    rows, means = merged_rows(got["out0"][0], merge.weight[0], target[0])
    expected = got["out0"][0].clone()
    expected[rows] = means
    assert torch.allclose(got["in1"][0], expected[merge.keep[0]], atol=1e-6)
    sizes = torch.zeros(n).index_add_(0, target[0], merge.weight[0])[merge.keep[0]]
    assert float(sizes.sum()) == n and float(sizes[0]) == 1.0  # every token counted once, CLS alone
    assert got["mask1"].shape == (1, 1, 1, int(merge.keep.sum()))
    assert torch.allclose(got["mask1"][0, 0, 0], sizes.log())
    assert stats.stages == [("vision encoder", 4), ("before LLM", 4)]
    # without proportional attention the layers get no mask
    with vflowopt.pruned(model, vflowopt.config_for("tome", budget=0.25, proportional_attention=False)):
        hook = layers[1].register_forward_pre_hook(lambda m, a, kw: got.update(mask1=a[1]), with_kwargs=True)
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            hook.remove()
    assert got["mask1"] is None


def test_qwen2_vl_merges_whole_groups_row_by_row():
    model, proc = tiny_qwen2_vl()
    inputs = build_inputs(proc, [example_image(seed=0)], ["What is in the image?"])
    with pytest.raises(ConfigError, match="proportional_attention=True is not available"):
        vflowopt.prune(model, vflowopt.config_for("tome", budget=0.5, proportional_attention=True))
    with vflowopt.pruned(model, vflowopt.config_for("tome", budget=0.25)) as h:
        assert h.config.proportional_attention is False
        seen = _spy_merges(h._engine.method)
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    merges = [m for _, m in seen if m is not None]
    assert merges
    g = 4
    for merge in merges:
        keep = merge.keep.view(-1, g)
        assert bool((keep == keep[:, :1]).all())  # whole 2×2 groups
        src = (~merge.keep).nonzero().squeeze(-1)
        assert bool((merge.into[src] % g == src % g).all())  # row j of a group into row j of its match
    groups = stats.visual_tokens
    assert stats.stages == [("vision encoder", keep_count(groups, 0.25)), ("before LLM", keep_count(groups, 0.25))]


def test_anyres_images_are_fitted_to_their_share_before_the_llm(make_model):
    """LLaVA-OneVision: crops keep their share rounded up in the ViT; unpadding leaves more survivors than
    the image's share here, and the surplus is merged on the projected features (recycled tokens)."""
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = build_inputs(proc, [example_image(seed=1, size=(64, 64))], ["What is in the image?"])
    with vflowopt.pruned(model, vflowopt.config_for("tome", budget=0.7)) as h:
        with torch.no_grad():
            model(**inputs)
        stats = h.stats
    n = stats.visual_tokens
    (_, vit), (_, llm) = stats.stages
    assert vit > llm == keep_count(n, 0.7) and stats.recycled_tokens > 0
