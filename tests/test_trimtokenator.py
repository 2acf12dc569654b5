"""TrimTokenator: alignment score, greedy RepMax, budget, generate() on tiny models.

What every method must pass on every family (identity, KV caches, decode, remove, JSON, batches) is in
test_conformance.py."""

from __future__ import annotations

import pytest
import torch

import vflowopt
from conftest import one_image_inputs
from vflowopt.methods.trimtokenator import alignment_scores, cosine_matrix, greedy_repmax, trim_select
from vflowopt.tiny_families import tiny_qwen2_vl


def test_alignment_score_by_hand():
    v = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 0.0], [6.0, 8.0]])
    # token 0: distances 0 and 10 -> -5; token 1: 5 and 5 -> -5
    assert torch.allclose(alignment_scores(v, t), torch.tensor([-5.0, -5.0]))
    v = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0], [4.0, 0.0]])
    assert torch.allclose(alignment_scores(v, t), torch.tensor([-(1.0 + 1.0 + 3.0) / 3]))


def _greedy_by_rule(x: torch.Tensor, n: int) -> list[int]:
    """The greedy rule from scratch: no accumulation, every mean recomputed."""
    c = cosine_matrix(x)
    chosen = [int(torch.argmin(c.mean(1)))]
    while len(chosen) < n:
        rest = [i for i in range(x.shape[0]) if i not in chosen]
        means = {i: float(c[i, chosen].mean()) for i in rest}
        chosen.append(min(rest, key=lambda i: (means[i], i)))
    return chosen


@pytest.mark.parametrize("seed", range(6))
def test_greedy_repmax_matches_brute_force_greedy_rule(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 4, generator=g, dtype=torch.float64)
    for n in (1, 3, 5, 9):
        picked = greedy_repmax(x, n).tolist()
        assert picked == _greedy_by_rule(x, n)
        # each step is the exact optimum of the rule over all remaining candidates
        c = cosine_matrix(x)
        for t in range(1, n):
            sel = picked[:t]
            best = min(float(c[i, sel].mean()) for i in set(range(9)) - set(sel))
            assert float(c[picked[t], sel].mean()) <= best + 1e-6


def test_greedy_repmax_hand_worked_2d():
    # x0 = (1, 0), x1 = (0, 2), x2 = (-3, -4), x3 = (4, 3): cosines are multiples of 0.2 (3-4-5 triangles)
    #   C = [[1, 0, -.6, .8], [0, 1, -.8, .6], [-.6, -.8, 1, -.96], [.8, .6, -.96, 1]]
    # means: .30, .20, -.34, .36 -> seed x2; σ = C[2] -> remaining σ: x0 -.6, x1 -.8, x3 -.96 -> x3;
    # σ += C[3] -> x0 -.6+.8 = .2, x1 -.8+.6 = -.2 -> x1; then x0.
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, -4.0], [4.0, 3.0]])
    assert torch.allclose(cosine_matrix(x).mean(1), torch.tensor([0.30, 0.20, -0.34, 0.36]), atol=1e-6)
    assert greedy_repmax(x, 4).tolist() == [2, 3, 1, 0]
    assert greedy_repmax(x, 2).tolist() == [2, 3]


def test_trim_select_counts_and_stage1():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20, 8, generator=g)
    t = torch.randn(5, 8, generator=g)
    keep = trim_select(v, t, n1=16, n2=6)
    assert int(keep.sum()) == 6
    alpha = alignment_scores(v, t)
    worst = torch.argsort(alpha)[:4]  # outside the N1 = 16 best aligned
    assert not bool(keep[worst].any())
    assert bool(trim_select(v, t, n1=16, n2=20).all())


def test_search_space_and_bad_configs():  # the JSON round trip: test_conformance.py
    cfg = vflowopt.config_for("trimtokenator", budget=0.2, stage1_ratio=0.9)
    space = type(cfg).search_space(0.2, 6)
    assert space.names == ("stage1_ratio",)
    assert space.candidate({"stage1_ratio": 0.7}).fields == {"stage1_ratio": 0.7}
    with pytest.raises(vflowopt.ConfigError):
        vflowopt.config_for("trimtokenator", budget=0.2, stage1_ratio=1.5).validate()


@pytest.mark.parametrize("family", ["llava", "llava_onevision"])
def test_budget_end_to_end(make_model, family):  # identity at budget 1.0: test_conformance.py
    model, proc = make_model(family, "sdpa")
    inputs = one_image_inputs(proc)
    with vflowopt.pruned(model, vflowopt.config_for("trimtokenator", budget=0.25)) as h:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        n = h.stats.visual_tokens
        assert h.stats.visual_tokens_per_layer[0] == round(0.25 * n) or family == "llava_onevision"
        assert abs(h.stats.mean_retention - 0.25) < 1.5 / n + 1e-9
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4


def test_generate_qwen2_vl():
    model, proc = tiny_qwen2_vl()
    from vflowopt.tiny import build_inputs, example_image

    inputs = build_inputs(proc, [example_image(seed=0)], ["What is in the image?"])
    with vflowopt.pruned(model, vflowopt.config_for("trimtokenator", budget=0.25)) as h:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        assert h.stats.visual_tokens_per_layer[0] == round(0.25 * h.stats.visual_tokens)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
