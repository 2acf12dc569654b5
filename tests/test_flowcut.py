"""FlowCut: prune number, entropy ratio, cumulative score, schedule, fp16 safety, generate() end to end.

What every method must pass on every family (identity, KV caches, decode, remove, JSON, batches) is in
test_conformance.py."""

from __future__ import annotations

import math

import pytest
import torch

import vflowopt
from conftest import one_image_inputs
from vflowopt.methods.flowcut import (
    cumulative,
    entropy_ratio,
    importance,
    prune_number,
    two_phase_ratios,
    vit_schedule,
    vit_signals,
)
from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import tiny_qwen2_vl


def test_entropy_ratio_by_hand():
    assert torch.allclose(entropy_ratio(torch.full((4,), 0.25)), torch.tensor(1.0))
    assert float(entropy_ratio(torch.tensor([1.0, 0.0, 0.0, 0.0]))) == 0.0
    a = torch.tensor([0.5, 0.5, 0.0, 0.0])  # H = ln 2, ratio = ln2/ln4 = 0.5
    assert torch.allclose(entropy_ratio(a), torch.tensor(0.5))
    # unnormalised input is normalised first
    assert torch.allclose(entropy_ratio(torch.tensor([2.0, 2.0, 0.0, 0.0])), torch.tensor(0.5))


def test_prune_number_by_hand():
    # N=100, T=20, L=16, r=0.5: 80/4 * 0.75 = 15
    assert prune_number(100, 20, 16, 0.5) == 15
    # uniform attention prunes nothing; concentrated (r=0) prunes (N-T)/sqrt(L)
    assert prune_number(100, 20, 16, 1.0) == 0
    assert prune_number(100, 20, 16, 0.0) == 20
    # the last step lands on T; never below T
    assert prune_number(100, 20, 0, 0.9) == 80
    assert prune_number(30, 20, 1, 0.0) == 10
    assert prune_number(20, 20, 4, 0.0) == 0


def test_importance_and_cumulative_by_hand():
    a = torch.tensor([1.0, 3.0])  # /4 -> .25, .75
    s = torch.tensor([2.0, 2.0])  # /4 -> .5, .5
    v = torch.tensor([2.0, 1.0])
    cur = importance(a, s, v)
    assert torch.allclose(cur, torch.tensor([1.5, 1.25]))
    assert torch.equal(cumulative(None, cur, 0.5), cur)
    assert torch.allclose(cumulative(torch.tensor([0.5, 0.25]), cur, 0.5), torch.tensor([1.0, 0.75]))
    assert torch.allclose(cumulative(torch.tensor([0.5, 0.25]), cur, 0.8), torch.tensor([0.7, 0.45]))


def test_vit_signals_cls_and_mean_token():
    h, n, d = 2, 5, 4
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(h, n, d, generator=g) for _ in range(3))
    a, s, vn, r = vit_signals(q, k, v, has_cls=True)
    ref = torch.softmax(torch.einsum("hd,hnd->hn", q[:, 0], k) / 2.0, -1).mean(0)[1:]
    assert torch.allclose(a, ref / ref.sum()) and a.shape == (n - 1,)
    assert torch.allclose(vn, v[:, 1:].abs().sum(-1).sum(0))
    a2, _, vn2, _ = vit_signals(q, k, v, has_cls=False)
    ref2 = torch.softmax(torch.einsum("hd,hnd->hn", q.mean(1), k) / 2.0, -1).mean(0)
    assert torch.allclose(a2, ref2) and vn2.shape == (n,)


def test_fp16_one_hot_attention_is_finite():
    one_hot = torch.zeros(576, dtype=torch.float16)
    one_hot[3] = 1.0
    r = entropy_ratio(one_hot)
    assert torch.isfinite(r) and float(r) == 0.0
    assert torch.isfinite(entropy_ratio(torch.zeros(8, dtype=torch.float16)))
    p = prune_number(576, 64, 20, float(r))
    assert 0 < p <= 576 - 64
    s = importance(one_hot, torch.zeros(576, dtype=torch.float16), torch.ones(576, dtype=torch.float16))
    assert bool(torch.isfinite(s).all())
    # huge fp16 logits: q·k overflows nothing because signals are computed in float32
    q = torch.full((2, 6, 8), 60.0, dtype=torch.float16)
    q[:, 0] = 200.0
    a, sem, vn, r = vit_signals(q, q, q, has_cls=True)
    assert all(bool(torch.isfinite(t).all()) for t in (a, sem, vn, r))


def test_schedule_lands_on_target():
    assert vit_schedule(22, 2) == tuple(range(2, 23, 2))
    assert vit_schedule(5, 2) == (1, 3, 5)
    g = torch.Generator().manual_seed(1)
    for f, every, n, t in [(22, 2, 576, 64), (25, 2, 729, 73), (7, 3, 100, 10), (4, 1, 50, 49)]:
        for layer in vit_schedule(f, every):
            r = float(torch.rand(1, generator=g))
            n -= prune_number(n, t, f - layer, r)
            assert n >= t
        assert n == t


def test_two_phase_budget_solution():
    r_v, r_f = two_phase_ratios(0.1, 28, 2, 2.0)
    assert math.isclose(r_v, 2 * r_f)
    assert math.isclose((2 * r_v + 26 * r_f) / 28, 0.1)
    assert two_phase_ratios(1.0, 28, 2, 2.0) == (1.0, 1.0)


def test_search_space_and_bad_configs():  # the JSON round trip: test_conformance.py
    cfg = vflowopt.config_for("flowcut", budget=0.2, history_weight=0.6)
    space = type(cfg).search_space(0.2, 6)
    assert space.names == ("history_weight", "prune_every")
    assert space.candidate({"history_weight": 0.3, "prune_every": 2}).fields["prune_every"] == 2
    for bad in (dict(prune_every=0), dict(history_weight=2.0), dict(vision_ratio=0.5)):
        with pytest.raises(vflowopt.ConfigError):
            vflowopt.config_for("flowcut", budget=0.2, **bad).validate()


def _vit_input_lengths(layers):
    seen = []
    hooks = [m.register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[-2] if a[0].dim() == 3
                                                                  else a[0].shape[0])) for m in layers]
    return seen, hooks


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_end_to_end_llava(make_model, family):
    model, proc = make_model(family, "sdpa")  # identity at budget 1.0: test_conformance.py
    inputs = one_image_inputs(proc)
    with vflowopt.pruned(model, vflowopt.config_for("flowcut", budget=0.3)) as h:
        layers = model.model.vision_tower.encoder.layers
        seen, hooks = _vit_input_lengths(layers)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for hk in hooks:
            hk.remove()
        st = h.stats
        assert seen[-1] < seen[0]  # the vision encoder ran on fewer tokens after pruning
        assert st.stages[0][0] == "vision encoder"
        n = st.visual_tokens
        assert abs(st.mean_retention - 0.3) <= 1.0 / n + 1e-9
        if family == "llava":  # single phase: what enters the LLM is the budget
            assert st.visual_tokens_per_layer[0] == round(0.3 * n) and not h.config.two_phase
        else:
            assert h.config.two_phase and st.visual_tokens_per_layer[2] < st.visual_tokens_per_layer[0]
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_end_to_end_qwen2_vl_whole_merge_groups():
    model, proc = tiny_qwen2_vl()
    inputs = build_inputs(proc, [example_image(seed=0), example_image(seed=1)],
                          ["What is in the image?", "How many circles?"])
    with vflowopt.pruned(model, vflowopt.config_for("flowcut", budget=0.3)) as h:
        seen, hooks = _vit_input_lengths(model.model.visual.blocks)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        for hk in hooks:
            hk.remove()
        st = h.stats
    assert seen[-1] < seen[0] and seen[-1] % 4 == 0
    assert seen[-1] // 4 == 2 * st.stages[0][1]  # two images, each its share, in whole 2×2 groups
    assert abs(st.mean_retention - 0.3) <= 1.0 / st.visual_tokens + 1e-9
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_vit_normalisation_follows_the_official_head_average_with_cls():
    torch.manual_seed(0)
    h, n, d = 4, 9, 8  # CLS + 8 patches
    q, k, v = torch.randn(h, n, d), torch.randn(h, n, d), torch.randn(h, n, d)
    k[0, 0] = 4 * q[0, 0] / q[0, 0].norm()  # head 0 looks mostly at CLS, as real CLIP heads often do
    attn, sem, vnorm, _ = vit_signals(q, k, v, has_cls=True)
    # official: per-head softmax over every token (CLS included), head mean, patches, renormalised
    full = torch.softmax(q[:, 0:1] @ k.transpose(1, 2) / math.sqrt(d), dim=-1)[:, 0].mean(0)[1:]
    assert torch.allclose(attn, full / full.sum(), atol=1e-6)
    full_s = torch.softmax(v[:, 0:1] @ v.transpose(1, 2) / math.sqrt(d), dim=-1)[:, 0].mean(0)[1:]
    assert torch.allclose(sem, full_s / full_s.sum(), atol=1e-6)
    # not the same as a softmax over the patches alone (heads weighted equally)
    patch_only = torch.softmax(q[:, 0:1] @ k[:, 1:].transpose(1, 2) / math.sqrt(d), dim=-1)[:, 0].mean(0)
    assert not torch.allclose(attn, patch_only, atol=1e-3)
    assert torch.allclose(vnorm, v[:, 1:].abs().sum(-1).sum(0))
