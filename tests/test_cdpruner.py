"""CDPruner: the greedy DPP against brute-force log-det, the relevance weighting by hand, configs, and the
conditioning on the prompt in a real forward.

What every method must pass on every family (identity, retention, KV caches, decode, remove, JSON,
batches) is in test_conformance.py."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import vflowopt
from conftest import one_image_inputs
from vflowopt import registry
from vflowopt.methods.base import PrefillContext, select_before_llm
from vflowopt.methods.cdpruner import (
    CDPrunerConfig,
    CDPrunerMethod,
    conditional_dpp_greedy,
    instruction_relevance,
    kernel_weights,
    relevance_alpha,
)
from vflowopt.models.base import adapter_for
from vflowopt.tiny import build_inputs, example_image


def _kernel(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """L = diag(w) · cos(x) · diag(w), built directly."""
    u = x / x.norm(dim=-1, keepdim=True)
    return w[:, None] * (u @ u.T) * w[None, :]


def _log_det(L: torch.Tensor, subset) -> float:
    idx = torch.tensor(list(subset), dtype=torch.long)
    sign, value = torch.linalg.slogdet(L[idx][:, idx])
    return float(value) if float(sign) > 0 else -math.inf


def _random_case(seed: int, n: int, d: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    return x, w


# -- the greedy MAP inference ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(8))
def test_each_pick_is_the_greedy_argmax_of_log_det(seed):
    """n = 8: every pick of the incremental Cholesky update is the argmax of log det L_{Y∪{i}} computed
    from scratch over the remaining tokens (k = 1..6; D = 6 so the kernel has rank 6)."""
    x, w = _random_case(seed, 8, 6)
    L = _kernel(x, w)
    for k in range(1, 7):
        picked = conditional_dpp_greedy(x, w, k).tolist()
        assert len(set(picked)) == k
        for t in range(k):
            rest = [i for i in range(8) if i not in picked[:t]]
            gains = {i: _log_det(L, picked[:t] + [i]) for i in rest}
            assert picked[t] == max(rest, key=lambda i: (gains[i], -i)), (k, t, gains)


def test_greedy_against_the_exhaustive_optimum():
    """How close greedy gets to the best subset (exhaustive search), 30 random kernels each. Measured
    (float64): n = 8, k = 3: the optimum in 30 of 30; k = 4: in 26 of 30, worst det ratio 0.66, mean
    0.976; n = 10, k = 5: in 23 of 30, worst 0.47, mean 0.94. Asserted with some slack below."""
    for n, k, d, min_hits, min_ratio in ((8, 3, 5, 30, 0.999), (8, 4, 5, 24, 0.5), (10, 5, 6, 20, 0.4)):
        hits, ratios = 0, []
        for seed in range(30):
            x, w = _random_case(seed, n, d)
            L = _kernel(x, w)
            greedy = _log_det(L, sorted(conditional_dpp_greedy(x, w, k).tolist()))
            best = max(_log_det(L, s) for s in itertools.combinations(range(n), k))
            assert greedy <= best + 1e-9
            hits += greedy >= best - 1e-9
            ratios.append(math.exp(greedy - best))
        assert hits >= min_hits and min(ratios) >= min_ratio, (n, k, hits, min(ratios))


def test_orthogonal_tokens_are_taken_by_weight():
    # S = I: det L_Y = Π w_i², so greedy takes the tokens by decreasing weight
    x = torch.eye(4)
    w = torch.tensor([0.2, 0.9, 0.5, 0.7])
    assert conditional_dpp_greedy(x, w, 4).tolist() == [1, 3, 2, 0]
    assert conditional_dpp_greedy(x, torch.ones(4), 4).tolist() == [0, 1, 2, 3]  # ties: the lower index


def test_relevance_trades_diversity_by_hand():
    # x0 = (1, 0), x1 = (.6, .8), x2 = (0, 1): cos(x0, x1) = .6, cos(x0, x2) = 0, cos(x1, x2) = .8
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # uniform weights: x0 (tie, lower index); then d² = 1 − .36 = .64 for x1, 1 for x2 -> x2
    assert conditional_dpp_greedy(x, torch.ones(3), 2).tolist() == [0, 2]
    # w = (1, .9, .2): x0 (w² = 1); then d² = .81·.64 = .5184 for x1, .04·1 = .04 for x2 -> x1
    assert conditional_dpp_greedy(x, torch.tensor([1.0, 0.9, 0.2]), 2).tolist() == [0, 1]


def test_rank_exhaustion_starts_a_new_round():
    # D = 2: after two picks every token lies in their span (d² = 0); a new round starts on the rest.
    # x = (1,1), (1,0), (0,1), (1,-1), (2,2), uniform weights:
    #   round 1: x0 (tie); d² = .5, .5, 1, 0 -> x3; all remaining in span
    #   round 2 over {1, 2, 4}: x1 (tie); d² = 1 for x2 (orthogonal), .5 for x4 -> x2; x4 in span
    #   round 3: x4
    x = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, -1.0], [2.0, 2.0]])
    assert conditional_dpp_greedy(x, torch.ones(5), 5).tolist() == [0, 3, 1, 2, 4]
    # zero feature vectors (L_ii = 0) never produce NaN and still come back distinct
    z = torch.zeros(4, 3)
    assert conditional_dpp_greedy(z, torch.ones(4), 3).tolist() == [0, 1, 2]
    g = torch.Generator().manual_seed(0)
    big = torch.randn(60, 4, generator=g)
    picked = conditional_dpp_greedy(big, torch.rand(60, generator=g) + 0.01, 40)
    assert len(set(picked.tolist())) == 40
    assert conditional_dpp_greedy(big, torch.ones(60), 0).numel() == 0


def test_float32_and_float64_agree_through_restarts():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 16, generator=g)
    w = torch.rand(300, generator=g) + 0.05
    assert torch.equal(conditional_dpp_greedy(x, w, 100), conditional_dpp_greedy(x.double(), w.double(), 100))


# -- relevance and weights ------------------------------------------------------------------------------
def test_relevance_by_hand():
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # one text token (1, 0): cos = 1, 0, 1/√2; min 0, range 1 -> r̃ = r + 1e-6
    r = instruction_relevance(v, torch.tensor([[5.0, 0.0]]))
    assert torch.allclose(r, torch.tensor([1.0, 0.0, 1 / math.sqrt(2)]) + 1e-6, atol=1e-7)
    # two text tokens (1, 0), (0, 1): mean cos = .5, .5, 1/√2; min .5, range 1/√2 − .5
    r = instruction_relevance(v, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    span = 1 / math.sqrt(2) - 0.5
    assert torch.allclose(r, torch.tensor([1e-6 / span, 1e-6 / span, 1 + 1e-6 / span]), atol=1e-5)
    # no text, or every token equally relevant: all ones (the kernel is then the plain similarity)
    assert torch.equal(instruction_relevance(v, torch.zeros(0, 2)), torch.ones(3))
    assert torch.allclose(instruction_relevance(torch.ones(3, 2), torch.tensor([[1.0, 0.0]])), torch.ones(3))
    # weights: r̃ itself (official default), or exp(α r̃) with α = θ / (2(1 − θ))
    r = torch.tensor([0.0, 0.5, 1.0])
    assert torch.equal(kernel_weights(r, None), r)
    assert torch.equal(kernel_weights(r, 0.0), torch.ones(3))
    assert relevance_alpha(0.5) == 0.5 and relevance_alpha(0.8) == pytest.approx(2.0)
    assert torch.allclose(kernel_weights(r, 0.8), torch.exp(2.0 * r))


def test_relevance_steers_the_selection_by_hand():
    # x0 = (1, 0), x1 = (.6, .8), x2 = (0, 1); text (.8, .6): cos = .8, .96, .6 -> r̃ ≈ .556, 1, 0
    x = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    r = instruction_relevance(x, torch.tensor([[0.8, 0.6]]))
    assert torch.allclose(r, torch.tensor([0.2 / 0.36, 1.0, 0.0]), atol=1e-4)
    # linear weights: x1 (w = 1) first; then d² = .309·.64 for x0, ≈ 0 for x2 -> x0
    assert conditional_dpp_greedy(x, kernel_weights(r, None), 2).tolist() == [1, 0]
    # theta = 0 ignores the text: the plain DPP takes x0 and the orthogonal x2
    assert conditional_dpp_greedy(x, kernel_weights(r, 0.0), 2).tolist() == [0, 2]


def test_text_positions():
    cfg = CDPrunerConfig(budget=0.5)
    image = torch.tensor([[False, False, True, True, False, False], [False, True, True, False, True, False]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    ctx = PrefillContext(layout=None, features=torch.zeros(2, 2, 4), image_mask=image,
                         embeds=torch.zeros(2, 6, 4), attention_mask=mask)
    prompt = CDPrunerMethod(cfg, None)._text_masks(ctx)
    assert prompt.int().tolist() == [[0, 1, 0, 0, 1, 1], [1, 0, 0, 1, 0, 1]]
    after = CDPrunerMethod(CDPrunerConfig(budget=0.5, text="after_image"), None)._text_masks(ctx)
    assert after.int().tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 0, 1]]


# -- configs --------------------------------------------------------------------------------------------
def test_configs_and_search_space():  # the JSON round trip: test_conformance.py
    assert vflowopt.config_for("cdpruner", budget=0.2).theta is None
    assert vflowopt.config_for("cdpruner", budget=0.2, theta=0).theta == 0
    assert registry.method_entry("cdpruner") == (CDPrunerConfig, CDPrunerMethod)
    for bad in ({"theta": 1.0}, {"theta": 1.5}, {"theta": -0.1}, {"theta": True}, {"theta": "0.5"},
                {"theta": float("nan")}, {"text": "question"}, {"text": None}, {"positions": "shift"},
                {"budget": 0.0}, {"budget": 1.5}):
        with pytest.raises(vflowopt.ConfigError):
            vflowopt.config_for("cdpruner", **{"budget": 0.2, **bad})
    with pytest.raises(vflowopt.ConfigError, match="needs a budget"):
        CDPrunerConfig()
    space = CDPrunerConfig.search_space(0.2, 6)
    assert space.names == ("theta",) and space.summary() == {"theta": [0.0, 0.9]}
    cand = space.candidate({"theta": 0.5})
    assert cand.fields == {"theta": 0.5} and cand.feasible and cand.info["alpha"] == 0.5
    vflowopt.config_for("cdpruner", budget=0.2, **cand.fields)  # every point is a valid config
    with pytest.raises(vflowopt.ConfigError):
        CDPrunerConfig.search_space(0.0, 6)


# -- on a model -----------------------------------------------------------------------------------------
def _spy(monkeypatch):
    seen: list = []
    original = CDPrunerMethod.before_llm

    def before(self, ctx):
        selection = original(self, ctx)
        seen.append((ctx.layout.tokens, selection.keep.clone()))
        return selection

    monkeypatch.setattr(CDPrunerMethod, "before_llm", before)
    return seen


def test_selection_follows_the_prompt(make_model, monkeypatch):
    """The same image with two questions: the relevance changes what is kept; theta = 0 (a plain DPP)
    keeps the same tokens whatever the question."""
    model, proc = make_model("llava", "sdpa")
    seen = _spy(monkeypatch)
    prompts = ("What is in the image?", "Count the red squares in the top left corner, please.")
    for theta in (None, 0.0):
        for prompt in prompts:
            with vflowopt.pruned(model, vflowopt.config_for("cdpruner", budget=0.25, theta=theta)), torch.no_grad():
                model(**one_image_inputs(proc, prompt=prompt))
    (tokens, a), (_, b), (_, c), (_, d) = seen
    n = int(tokens.prunable[0].sum())
    assert int((a & tokens.prunable).sum()) == int((b & tokens.prunable).sum()) == round(0.25 * n)
    assert not torch.equal(a, b)
    assert torch.equal(c, d)


def test_every_image_keeps_its_share(make_model, monkeypatch):
    model, proc = make_model("llava_onevision", "sdpa")
    seen = _spy(monkeypatch)
    inputs = build_inputs(proc, [example_image(seed=1), example_image(seed=2)], "Which one is brighter?")
    cfg = vflowopt.config_for("cdpruner", budget=0.3, text="after_image")
    with vflowopt.pruned(model, cfg) as h, torch.no_grad():
        model(**inputs)
        stats = h.stats
    tokens, keep = seen[0]
    images = tokens.image[0].unique().tolist()
    assert len(images) == 2
    for img in images:
        own = tokens.prunable[0] & (tokens.image[0] == img)
        assert int((keep[0] & own).sum()) == round(0.3 * int(own.sum()))
    assert bool(keep[0][~tokens.prunable[0]].all())  # newline tokens stay
    assert stats.stages[0][1] == int((keep[0] & tokens.prunable[0]).sum())


def test_select_before_llm_needs_the_prompt_embeddings(make_model, monkeypatch):
    model, proc = make_model("llava", "sdpa")
    seen: dict = {}
    original = CDPrunerMethod.before_llm

    def before(self, ctx):
        seen.update(layout=ctx.layout, features=ctx.features, image_mask=ctx.image_mask)
        return original(self, ctx)

    monkeypatch.setattr(CDPrunerMethod, "before_llm", before)
    with vflowopt.pruned(model, vflowopt.config_for("cdpruner", budget=0.5)), torch.no_grad():
        model(**one_image_inputs(proc))
    monkeypatch.undo()
    adapter = adapter_for(model)
    with pytest.raises(vflowopt.PruningError, match="embeds"):
        select_before_llm(CDPrunerConfig(budget=0.5), adapter, seen["layout"], seen["features"],
                          image_mask=seen["image_mask"])
    plain = select_before_llm(CDPrunerConfig(budget=0.5, theta=0.0), adapter, seen["layout"], seen["features"])
    tokens = seen["layout"].tokens
    assert int((plain.keep & tokens.prunable).sum()) == round(0.5 * int(tokens.prunable.sum()))
