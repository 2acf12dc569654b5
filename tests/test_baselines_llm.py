"""The LLM-attention baselines FastV, PDrop and SparseVLM: selection on hand-made tensors, budget
arithmetic, and end to end under generate() on tiny LLaVA, LLaVA-OneVision and Qwen2-VL models.
What every method must pass on every family (identity at budget 1.0, KV caches, decode, remove, JSON,
batches) is in test_conformance.py."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

import vflowopt
from conftest import all_hooks, one_image_inputs
from vflowopt.config import ConfigError, config_for, load_config
from vflowopt.methods.base import PrefillContext
from vflowopt.methods.common import keep_top_per_image, last_token_scores
from vflowopt.methods.fastv import FastVConfig, fastv_keep_ratio
from vflowopt.methods.pdrop import PDropConfig, PDropMethod, solve_uniform_ratio, staged_mean
from vflowopt.methods.sparsevlm import (
    SparseVLMConfig,
    default_schedule,
    density_peak_clusters,
    rater_scores,
    recycle_counts,
    select_and_recycle,
    text_raters,
)
from vflowopt.models.base import TokenLayout, VisualTokens
from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import QWEN_FAMILIES, tiny_llava_next

METHODS = ["fastv", "pdrop", "sparsevlm"]


def _adapter(num_layers: int = 24, min_layer: int = 0, family: str = "llava"):
    return SimpleNamespace(num_llm_layers=num_layers, min_llm_prune_layer=min_layer, family=family)


def _tokens(images: list[int], prunable: list[bool] | None = None, offset: int = 1) -> VisualTokens:
    n = len(images)
    z = torch.zeros(1, n, dtype=torch.long)
    return VisualTokens(
        seq_index=torch.arange(offset, offset + n).view(1, n), image=torch.tensor([images]), grid=z, row=z, col=z,
        region=torch.zeros(1, n, 4), prunable=torch.tensor([prunable or [True] * n]),
    )


# -- selection on hand-made tensors ---------------------------------------------------------------------
def _qk_attending(seq: int, targets: dict[int, float], heads: int = 2, dim: int = 4):
    """query/key whose last query row puts logit `targets[j]` on key j (0 elsewhere), all heads alike."""
    q = torch.zeros(1, heads, seq, dim)
    k = torch.zeros(1, 1, seq, dim)  # one KV head: grouped-query expansion is exercised
    q[..., -1, 0] = 1.0
    for j, logit in targets.items():
        k[0, 0, j, 0] = logit
    return q, k


def test_last_token_scores_are_the_head_averaged_softmax_row():
    q, k = _qk_attending(6, {2: 3.0, 4: 1.0})
    visual_pos = torch.tensor([[1, 2, 3, 4]])
    scores = last_token_scores(q, k, visual_pos, seq_len=6, scaling=1.0)
    logits = torch.tensor([0.0, 0.0, 3.0, 0.0, 1.0, 0.0])
    assert torch.allclose(scores, torch.softmax(logits, 0)[visual_pos], atol=1e-6)
    # the mask is honoured: hiding key 2 moves its weight elsewhere
    mask = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    mask[..., 2] = False
    masked = last_token_scores(q, k, visual_pos, seq_len=6, scaling=1.0, mask=mask)
    assert masked[0, 1] == 0 and masked[0, 3] > scores[0, 3]


def test_fastv_keeps_each_images_share_of_the_most_attended_tokens():
    # image 0: tokens 0-3, image 1: tokens 4-7; token 4 is a newline (never a candidate, never counted)
    tokens = _tokens([0, 0, 0, 0, 1, 1, 1, 1], prunable=[True] * 4 + [False] + [True] * 3)
    current = torch.arange(8).view(1, 8)
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 5.0, 0.2, 0.7, 0.1]])
    keep = keep_top_per_image(scores, tokens, current, 0.5)
    # image 0 keeps round(0.5·4) = 2: tokens 1, 3; image 1 keeps round(0.5·3) = 2 (not 1, 2 is its share): 6, 5
    assert keep[0].nonzero().squeeze(-1).tolist() == [1, 3, 5, 6]


def test_fastv_budget_arithmetic_and_refusals():
    assert fastv_keep_ratio(0.1, 2, 24) == pytest.approx((2.4 - 2) / 22)
    assert fastv_keep_ratio(1.0, 2, 24) == 1.0
    cfg = FastVConfig(budget=0.25).resolve(_adapter(24))
    assert cfg.layer == 2 and cfg.keep_ratio == pytest.approx((6 - 2) / 22)
    assert staged_mean([cfg.keep_ratio], [cfg.layer], 24) == pytest.approx(0.25)
    # the paper's R (fraction dropped) as keep_ratio = 1 - R: the budget is derived
    cfg = FastVConfig(keep_ratio=0.25, layer=2).resolve(_adapter(32))
    assert cfg.budget == pytest.approx((2 + 0.25 * 30) / 32)
    with pytest.raises(ConfigError, match="below that"):
        FastVConfig(budget=0.05).resolve(_adapter(24))  # 2/24 of the retention is spent before K
    with pytest.raises(ConfigError, match="not the budget"):
        FastVConfig(budget=0.5, keep_ratio=0.9).resolve(_adapter(24))
    with pytest.raises(ConfigError, match=">= 1"):
        FastVConfig(budget=0.5, layer=0).validate()
    # deepstack (Qwen3-VL): pruning only from the adapter's first allowed layer on
    assert FastVConfig(budget=0.5).resolve(_adapter(36, min_layer=3, family="qwen3_vl")).layer == 3
    with pytest.raises(ConfigError, match="only from layer 3"):
        FastVConfig(budget=0.5, layer=2).resolve(_adapter(36, min_layer=3, family="qwen3_vl"))


def test_pdrop_lambda_is_solved_from_the_budget():
    # the official 32-layer default, λ = 0.5: (8 + 4 + 2 + 1)/32
    assert solve_uniform_ratio(15 / 32, (8, 16, 24), 32) == pytest.approx(0.5, abs=1e-9)
    with pytest.raises(ConfigError, match="cannot be met"):
        PDropConfig(budget=0.2).resolve(_adapter(32))  # below 8/32
    cfg = PDropConfig(budget=0.3).resolve(_adapter(24))
    assert cfg.stage_layers == (6, 12, 18)
    assert staged_mean([cfg.ratio, cfg.ratio**2, cfg.ratio**3], cfg.stage_layers, 24) == pytest.approx(0.3)
    # explicit λ: the budget is derived; per-stage ratios too
    assert PDropConfig(ratio=0.5).resolve(_adapter(32)).budget == pytest.approx(15 / 32)
    assert PDropConfig(ratio=(1.0, 1.0, 0.0)).resolve(_adapter(32)).budget == pytest.approx(24 / 32)
    with pytest.raises(ConfigError, match="not the budget"):
        PDropConfig(budget=0.9, ratio=0.5).resolve(_adapter(32))
    with pytest.raises(ConfigError, match="only from layer 3"):
        PDropConfig(budget=0.5, stage_layers=(2, 8, 12)).resolve(_adapter(36, min_layer=3))


def test_pdrop_recomputes_the_ranking_at_each_stage():
    cfg = PDropConfig(budget=0.5, stage_layers=(2, 4), ratio=0.5).resolve(_adapter(8))
    method = PDropMethod(cfg, _adapter(8))
    assert method.llm_layers == (2, 4) and method.llm_attention_layers == (1, 3)
    tokens = _tokens([0] * 8, offset=1)  # prompt: 1 text, 8 visual, 1 text (last)
    layout = TokenLayout(tokens=tokens, pack=lambda m: m)
    ctx = PrefillContext(layout=layout, features=torch.zeros(1, 8, 4), image_mask=torch.zeros(1, 10, dtype=torch.bool))
    ctx.visual_ids, ctx.visual_pos, ctx.seq_len = torch.arange(8).view(1, 8), torch.arange(1, 9).view(1, 8), 10
    # stage 1 (scores from layer 1): visual tokens 0, 2, 5, 7 are the most attended
    q, k = _qk_attending(10, {1: 4.0, 3: 3.0, 6: 2.0, 8: 1.0})
    method.on_llm_attention(ctx, 1, q, k, None, None, 1.0)
    keep = method.at_layer(ctx, 2, ctx.visual_ids, torch.zeros(1, 10, 4))
    assert keep[0].nonzero().squeeze(-1).tolist() == [0, 2, 5, 7]
    # stage 2: the sequence is shorter; layer 3 now ranks token 7 over 0, 2, 5; keep 0.25·8 = 2
    ctx.visual_ids, ctx.visual_pos, ctx.seq_len = torch.tensor([[0, 2, 5, 7]]), torch.tensor([[1, 2, 3, 4]]), 6
    q, k = _qk_attending(6, {4: 5.0, 2: 4.0})
    method.on_llm_attention(ctx, 3, q, k, None, None, 1.0)
    keep = method.at_layer(ctx, 4, ctx.visual_ids, torch.zeros(1, 6, 4))
    assert ctx.visual_ids[keep].tolist() == [2, 7]


def test_sparsevlm_raters_are_the_text_tokens_relevant_to_the_image():
    visual = torch.tensor([[4.0, 0.0], [3.0, 0.5], [4.0, 0.2]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [-1.0, 0.0]])  # 0 and 2 point along the image
    assert text_raters(visual, text).tolist() == [True, False, True, False]
    assert text_raters(visual, text[:1]).tolist() == [True]  # a single text token rates


def test_sparsevlm_scores_average_the_raters():
    probs = torch.tensor([[[0.1, 0.5, 0.2, 0.2], [0.3, 0.1, 0.4, 0.2], [math.nan] * 4]])
    valid = torch.tensor([[True, True, False]])  # the third row is padding (a fully masked row: NaN)
    scores = rater_scores(probs, valid, torch.tensor([[1, 2]]))
    assert torch.allclose(scores, torch.tensor([[0.3, 0.3]]))


def test_density_peak_clusters_find_the_groups():
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [0.0, 0.1], [5.0, 5.0], [5.1, 5.0], [9.0, -9.0]])
    centres, assign = density_peak_clusters(x, 2)
    assert len(set(assign[:3].tolist())) == 1 and len(set(assign[3:5].tolist())) == 1
    assert assign[0] != assign[3]
    for c, idx in enumerate(centres.tolist()):
        assert assign[idx] == c  # a centre is in its own cluster


def test_sparsevlm_recycles_the_best_pruned_tokens_into_merged_tokens():
    assert recycle_counts(576, 300, 0.3, 0.1) == (83, 9)  # official: int(0.3·276)+1, int(83/10)+1
    assert recycle_counts(10, 10, 0.3, 0.1) == (0, 0)  # nothing pruned: identity
    scores = torch.tensor([9.0, 8.0, 1.0, 7.0, 6.0, 5.0, 0.0, 0.5, 0.2, 0.1])
    feats = torch.arange(10, dtype=torch.float32).view(10, 1).repeat(1, 3)
    keep, replaced, merged = select_and_recycle(scores, feats, 4, 0.5, 0.1)
    # 4 kept = 3 best (0, 1, 3) + 1 merged token; the 6 pruned: 4, 5, 2 (top int(0.5·6)+1 = 4: 4, 5, 2, 7)
    n_rec, n_merge = recycle_counts(10, 4, 0.5, 0.1)
    assert (n_rec, n_merge) == (4, 1) and int(keep.sum()) == 4
    assert keep[[0, 1, 3]].all() and not keep[6]
    slot = replaced.nonzero().squeeze(-1)
    assert slot.numel() == 1 and slot.item() in (4, 5, 2, 7) and keep[slot]
    assert torch.allclose(merged[slot], feats[[4, 5, 2, 7]].mean(0))
    keep, replaced, _ = select_and_recycle(scores, feats, 4, 0.0, 0.1)  # no recycling
    assert keep.nonzero().squeeze(-1).tolist() == [0, 1, 3, 4] and not replaced.any()


def test_sparsevlm_default_schedule_meets_the_budget():
    for n_layers in (6, 24, 32):
        cfg = SparseVLMConfig(budget=0.5).resolve(_adapter(n_layers))
        assert staged_mean(cfg.retention, cfg.stage_layers, n_layers) == pytest.approx(0.5)
        assert all(b <= a for a, b in zip(cfg.retention, cfg.retention[1:]))
    # on 32 layers the official keep lists' shape is kept (300:200:110 at the nominal 192 tokens)
    f = default_schedule(192 / 576, (3, 7, 16), 32)
    assert f[0] / f[1] == pytest.approx(300 / 200) and f[1] / f[2] == pytest.approx(200 / 110)
    assert SparseVLMConfig(budget=0.5).resolve(_adapter(32)).stage_layers == (3, 7, 16)
    assert default_schedule(1.0, (3, 7, 16), 32) == (1.0, 1.0, 1.0)
    with pytest.raises(ConfigError, match="cannot be met"):
        SparseVLMConfig(budget=0.05).resolve(_adapter(32))
    with pytest.raises(ConfigError, match="non-increasing"):
        SparseVLMConfig(retention=(0.2, 0.5, 0.1)).validate()


@pytest.mark.parametrize("method", METHODS)
def test_search_space_points_resolve_to_the_budget(method):
    from vflowopt.search.space import space_for

    budget, n_layers = 0.4, 24
    space = space_for(method, budget, n_layers)
    feasible = 0
    for u in (0.1, 0.5, 0.9):
        cand = space.candidate({d.name: d.from_unit(u) for d in space.dims})
        if not cand.feasible:
            continue
        feasible += 1
        cfg = config_for(method, budget=budget, **cand.fields).resolve(_adapter(n_layers))
        assert cfg.budget == budget
    assert feasible


# -- end to end -----------------------------------------------------------------------------------------
FAMILIES = ["llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
_BUILDERS = {"llava_next": tiny_llava_next, **QWEN_FAMILIES}


@functools.cache
def _built(family: str, attn: str):
    return _BUILDERS[family](attn_implementation=attn)


@pytest.fixture
def family_model(make_model):
    """family_model(family, attn) -> (model, processor, image size); models are cached and unpruned after."""
    used = []

    def make(family: str, attn: str = "sdpa"):
        pair = make_model(family, attn) if family in ("llava", "llava_onevision") else _built(family, attn)
        used.append(pair[0])
        return (*pair, (112, 168) if family.startswith("qwen") else (80, 120))

    yield make
    for model in used:
        vflowopt.unprune(model)


def _generate(model, inputs, n=4, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family,attn", [("llava", "eager")])  # sdpa, every family: test_conformance.py
def test_identity_at_full_budget(family_model, family, attn, method):
    model, proc, size = family_model(family, attn)
    inputs = build_inputs(proc, [example_image(seed=0, size=size)], ["What is in the image?"])
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens = _generate(model, inputs)
    with vflowopt.pruned(model, config_for(method, budget=1.0)) as h:
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = _generate(model, inputs)
        assert h.stats.mean_retention == 1.0
    assert torch.equal(logits, ref) and torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("method", METHODS)
def test_kept_counts_meet_the_budget_per_image(make_model, method):
    """Two images of different sizes (LLaVA-OneVision: with newline tokens, never pruned)."""
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = build_inputs(proc, [example_image(seed=1), example_image(seed=2, size=(64, 64))], ["Compare them."])
    budget = 0.5
    per_image: dict[tuple[int, int], list[int]] = {}
    with vflowopt.pruned(model, config_for(method, budget=budget)) as h:
        engine = h._engine
        original = engine.method.at_layer

        def spy(ctx, layer, current, hidden):
            out = original(ctx, layer, current, hidden)
            keep = out if torch.is_tensor(out) else out.keep
            t = ctx.layout.tokens
            image, prunable = t.image[0, current[0]], t.prunable[0, current[0]]
            assert bool(t.prunable[0].logical_not().sum() == t.prunable[0, current[0]].logical_not().sum())
            for g in t.image[0].unique().tolist():
                n = int((t.prunable[0] & (t.image[0] == g)).sum())
                per_image[(layer, g)] = [n, int((keep[0] & prunable & (image == g)).sum())]
            return out

        engine.method.at_layer = spy
        with torch.no_grad():
            model(**inputs)
        stats, cfg = h.stats, h.config
    stages = cfg.stage_layers if method != "fastv" else (cfg.layer,)
    fractions = {"fastv": lambda: (cfg.keep_ratio,), "pdrop": lambda: tuple(
        cfg.ratio ** (i + 1) for i in range(len(stages))), "sparsevlm": lambda: cfg.retention}[method]()
    assert {g for _, g in per_image} == {0, 1}
    for (layer, _), (n, kept) in per_image.items():
        assert kept == round(fractions[stages.index(layer)] * n)  # each image keeps its share
    # the realised mean is within one token per stage of the budget (half a token per image)
    assert abs(stats.mean_retention - budget) * stats.visual_tokens <= 0.5 * 2 + 1e-9


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_decodes_on_consistent_pruned_caches(family_model, family, method):
    model, proc, size = family_model(family)
    images = [example_image(seed=0, size=size), example_image(seed=3, size=size)]
    inputs = build_inputs(proc, images, ["Compare them."])
    n_new = 4
    with vflowopt.pruned(model, config_for(method, budget=0.6)) as h:
        out = _generate(model, inputs, n_new, return_dict_in_generate=True)
        stats = h.stats
        kv = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        # each layer's cache holds what it saw at prefill plus the fed-back tokens
        assert kv == [n + n_new - 1 for n in stats.kv_tokens_per_layer]
        first = h.config.layer if method == "fastv" else h.config.stage_layers[0]
        assert first >= h._engine.adapter.min_llm_prune_layer
        assert len(set(kv[:first])) == 1 and kv[first] < kv[first - 1] and kv[-1] < kv[0]
        assert stats.tokens_into_llm == stats.prompt_tokens  # these methods prune inside the LLM only
        assert abs(stats.mean_retention - 0.6) * stats.visual_tokens <= 1.0 + 1e-9  # 2 images, ½ token each
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + n_new


def test_eager_attention_selects_like_sdpa(make_model):
    selections = {}
    for attn in ("sdpa", "eager"):
        model, proc = make_model("llava", attn)
        inputs = one_image_inputs(proc)
        with vflowopt.pruned(model, SparseVLMConfig(budget=0.5)) as h:
            tokens = _generate(model, inputs)
            selections[attn] = (h.stats.kv_tokens_per_layer, h.stats.recycled_tokens, tokens)
    assert selections["sdpa"][:2] == selections["eager"][:2]
    assert selections["sdpa"][2].shape == selections["eager"][2].shape


@pytest.mark.parametrize(
    "cfg,match",
    [
        (FastVConfig(budget=0.2), "below that"),  # K=2 of 6 layers spends 1/3 already
        (PDropConfig(budget=0.1), "cannot be met"),
        (SparseVLMConfig(budget=0.1), "cannot be met"),
        (FastVConfig(budget=0.5, layer=6), r"\[1, 5\]"),
        (PDropConfig(budget=0.5, stage_layers=(3, 2)), "increasing"),
    ],
)
def test_bad_budgets_are_refused_with_the_model_intact(make_model, cfg, match):
    model, proc = make_model("llava", "sdpa")
    inputs = one_image_inputs(proc)
    before = all_hooks(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    with pytest.raises(ConfigError, match=match):
        vflowopt.prune(model, cfg)
    assert all_hooks(model) == before
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    vflowopt.prune(model, FastVConfig(budget=0.5)).remove()  # not left marked as pruned


def test_pdrop_per_stage_ratios_survive_json(tmp_path):
    tuple_ratio = PDropConfig(ratio=(0.5, 0.25, 1.0), stage_layers=(1, 3, 4))
    tuple_ratio.save(tmp_path / "t.json")
    assert load_config(tmp_path / "t.json") == tuple_ratio
