"""The pre-LLM baselines and controls: visionzip, divprune, random, pool.

Selections on hand-made tensors (which tokens each keeps and why), exact per-image counts end to end under
generate() on tiny LLaVA / Qwen2-VL / LLaVA-OneVision, seeds, configs. What every method must pass on every
family (identity at budget 1.0, KV caches, decode, remove, JSON, batches) is in test_conformance.py.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch

import vflowopt
from conftest import all_hooks, one_image_inputs
from vflowopt.config import ConfigError, config_for, load_config
from vflowopt.methods.common import apportion
from vflowopt.methods.divprune import divprune_order
from vflowopt.methods.pool import pool_grid, pool_windows
from vflowopt.methods.random_prune import random_keep
from vflowopt.methods.visionzip import visionzip_select
from vflowopt.search.space import space_for
from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import tiny_qwen2_vl

METHODS = ["visionzip", "divprune", "random", "pool"]
QWEN_SIZE = (112, 168)  # 4×6 merged tokens


@functools.cache
def _qwen():
    return tiny_qwen2_vl()


@pytest.fixture(autouse=True)
def _unprune_qwen():
    yield
    if _qwen.cache_info().currsize:
        vflowopt.unprune(_qwen()[0])


def _model(make_model, family):
    return _qwen() if family == "qwen2_vl" else make_model(family, "sdpa")


def _inputs(family, proc, seeds=(0,)):
    size = QWEN_SIZE if family == "qwen2_vl" else (80, 120)
    return build_inputs(proc, [example_image(seed=s, size=size) for s in seeds], ["What is in the image?"])


def _spy(handle) -> dict:
    """Records the PrefillContext and Selection of the next prefill."""
    method = handle._engine.method
    rec: dict = {}
    inner = method.before_llm

    def before_llm(ctx):
        rec["ctx"], rec["sel"] = ctx, inner(ctx)
        return rec["sel"]

    method.before_llm = before_llm
    return rec


def _generate(model, inputs, n=4, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


# -- selections on hand-made tensors -----------------------------------------------------------------
def test_divprune_picks_the_most_isolated_then_the_farthest():
    s, c = math.sin(0.1), math.cos(0.1)
    # a and a2 are near twins, b and b2 too; z is opposite a, so z is the most isolated token
    # (nearest: b, at cosine distance 1), a is then farthest from z (distance 2), and b is the farthest
    # from {z, a} (min distance 1, vs 0.90 for b2 and 0.005 for a2).
    pts = torch.tensor([[1.0, 0.0], [c, s], [0.0, 1.0], [s, c], [-1.0, 0.0]])  # a, a2, b, b2, z
    assert divprune_order(pts, 3).tolist() == [4, 0, 2]
    assert divprune_order(pts, 5).sort().values.tolist() == [0, 1, 2, 3, 4]
    assert divprune_order(pts * 7.0, 3).tolist() == [4, 0, 2]  # cosine: scale does not matter
    assert divprune_order(pts, 0).numel() == 0


def test_pool_windows_on_a_4x4_grid():
    row = torch.arange(4).repeat_interleave(4)
    col = torch.arange(4).repeat(4)
    feats = torch.arange(16, dtype=torch.float32)[:, None].repeat(1, 3)
    # k = 4: the four 2×2 quadrants; each is placed at its member nearest the centroid, all four are
    # equidistant, so the first one in token order: (0,0), (0,2), (2,0), (2,2).
    keep, replaced, out = pool_grid(row, col, feats, 4)
    assert keep.nonzero().squeeze(-1).tolist() == [0, 2, 8, 10]
    assert torch.equal(replaced, keep)
    assert out[0].tolist() == [(0 + 1 + 4 + 5) / 4] * 3
    assert out[10].tolist() == [(10 + 11 + 14 + 15) / 4] * 3
    # k = 2: one band (oh = round(sqrt(2)) = 1) cut into two 4×2 halves; centroid (1.5, 0.5) -> (1,0)
    keep, _, out = pool_grid(row, col, feats, 2)
    assert keep.nonzero().squeeze(-1).tolist() == [4, 6]
    assert out[4, 0].item() == sum([0, 1, 4, 5, 8, 9, 12, 13]) / 8
    # exact counts for every k, and k = n is the identity
    for k in range(1, 17):
        assert int(pool_windows(row, col, k).unique().numel()) == k
        assert int(pool_grid(row, col, feats, k)[0].sum()) == k
    keep, replaced, out = pool_grid(row, col, feats, 16)
    assert bool(keep.all()) and not bool(replaced.any()) and torch.equal(out, feats)


def test_pool_windows_fill_holes_to_the_exact_count():
    # an L-shaped grid (a 4×4 square without its bottom-right 2×2 block): 12 tokens
    row = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
    col = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 0, 1])
    for k in range(1, 13):
        assert int(pool_windows(row, col, k).unique().numel()) == k


def test_visionzip_dominant_and_contextual_by_hand():
    # 8 tokens, keep 4 with half of them contextual: d = 2 dominant, c = 2 contextual.
    scores = torch.tensor([0.1, 0.9, 0.2, 0.05, 0.8, 0.3, 0.0, 0.4])
    # dominant: tokens 1 and 4 (highest scores). Rest R = [0, 2, 3, 5, 6, 7], step = 6 // 2 = 3,
    # targets R[0::3] = tokens 0 and 5. Keys: 2 and 3 point like token 0, 6 and 7 like token 5.
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    metric = torch.tensor([e0, e1, e0, e0, e1, e1, e1, e1])
    feats = torch.arange(8, dtype=torch.float32)[:, None] * torch.tensor([[1.0, 10.0]])
    keep, replaced, out = visionzip_select(scores, metric, feats, 4, 0.5)
    assert keep.nonzero().squeeze(-1).tolist() == [0, 1, 4, 5]
    assert replaced.nonzero().squeeze(-1).tolist() == [0, 5]
    # official merge: target + mean of its assigned tokens
    assert out[0].tolist() == (feats[0] + (feats[2] + feats[3]) / 2).tolist()
    assert out[5].tolist() == (feats[5] + (feats[6] + feats[7]) / 2).tolist()
    assert torch.equal(out[[1, 4]], feats[[1, 4]])  # dominant tokens unchanged
    _, _, mean = visionzip_select(scores, metric, feats, 4, 0.5, merge="mean")
    assert mean[0].tolist() == ((feats[0] + feats[2] + feats[3]) / 3).tolist()
    # contextual_share 0: plain top-k; the official 10/64 share of k = 4 rounds to 1 contextual token
    keep, replaced, _ = visionzip_select(scores, metric, feats, 4, 0.0)
    assert keep.nonzero().squeeze(-1).tolist() == [1, 4, 5, 7] and not bool(replaced.any())
    keep, replaced, _ = visionzip_select(scores, metric, feats, 4, 10 / 64)
    assert keep.nonzero().squeeze(-1).tolist() == [0, 1, 4, 7]  # dominant 1, 4, 7; target R[0] = 0
    assert replaced.nonzero().squeeze(-1).tolist() == [0]


def test_apportion_and_random_keep():
    assert apportion([16, 12, 12, 12, 12], 19) == [5, 4, 4, 3, 3]
    assert apportion([3, 1], 4) == [3, 1] and apportion([5, 5], 0) == [0, 0]
    a = random_keep(50, 7, seed=3, image=0)
    assert int(a.sum()) == 7 and torch.equal(a, random_keep(50, 7, seed=3, image=0))
    assert not torch.equal(a, random_keep(50, 7, seed=4, image=0))
    assert not torch.equal(a, random_keep(50, 7, seed=3, image=1))


# -- on models -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "llava_onevision"])
def test_generate_keeps_round_budget_per_image(make_model, family, method):
    model, proc = _model(make_model, family)
    budget = 0.3
    inputs = _inputs(family, proc, seeds=(0, 1))  # two images in one prompt
    with vflowopt.pruned(model, config_for(method, budget=budget)) as h:
        rec = _spy(h)
        out = _generate(model, inputs, return_dict_in_generate=True)
        st = h.stats
    tokens, sel = rec["ctx"].layout.tokens, rec["sel"]
    assert bool(sel.keep[~tokens.prunable].all())  # newline / CLS tokens always stay
    expected = 0
    for img in tokens.image[0].unique().tolist():
        mine = (tokens.image[0] == img) & tokens.prunable[0]
        n = int(mine.sum())
        assert int((sel.keep[0] & mine).sum()) == round(budget * n)
        expected += round(budget * n)
    assert st.stages == [("before LLM", expected)]
    assert abs(st.mean_retention - expected / st.visual_tokens) < 1e-9
    kv = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert len(set(kv)) == 1 and kv[0] == st.tokens_into_llm + 3  # pruned once, before the LLM
    if method in ("visionzip", "pool"):
        assert st.recycled_tokens > 0 and sel.replaced is not None
        assert bool((sel.replaced <= sel.keep).all())
    else:
        assert st.recycled_tokens == 0


def test_visionzip_ranks_and_merges_every_onevision_crop_on_its_own(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)  # base image + a 2×2 tiling: 5 crops
    cfg = vflowopt.config_for("visionzip", budget=0.3)
    with vflowopt.pruned(model, cfg) as h:
        method = h._engine.method
        rec = _spy(h)
        spied = method.before_llm

        def with_crops(ctx):  # crop ids need this prefill's attention maps, dropped after it
            rec["crops"] = method._crop_ids(ctx)[0]
            return spied(ctx)

        method.before_llm = with_crops
        with torch.no_grad():
            model(**inputs)
        ctx, sel, crops = rec["ctx"], rec["sel"], rec["crops"]
    tokens = ctx.layout.tokens
    ids = [g for g in crops.unique().tolist() if g >= 0]
    assert len(ids) == 5
    assert bool((crops[tokens.grid[0] == 0] == 0).all())  # the base grid is crop 0
    sizes = [int((crops == g).sum()) for g in ids]
    n_keep = round(0.3 * sum(sizes))
    for g, k in zip(ids, apportion(sizes, n_keep)):
        mine = crops == g
        assert int((sel.keep[0] & mine).sum()) == k
        c = round(k * 10 / 64)
        assert int((sel.replaced[0] & mine).sum()) <= c
        assert int((sel.keep[0] & ~sel.replaced[0] & mine).sum()) >= k - c


def test_visionzip_keys_align_with_the_tokens(make_model):
    model, proc = make_model("llava", "sdpa")
    inputs = one_image_inputs(proc)
    with vflowopt.pruned(model, config_for("visionzip", budget=0.5)) as h:
        method = h._engine.method
        attn = h._engine.adapter.vision_attention(method.vision_attention_layer)
        seen = {}
        hook = attn.register_forward_pre_hook(lambda m, a, kw: seen.update(h=kw["hidden_states"]), with_kwargs=True)
        rec = _spy(h)
        keys = {}
        inner = method.before_llm

        def grab(ctx):
            from vflowopt.signals.vision_keys import pack_vectors

            keys["packed"] = pack_vectors(ctx.layout, method._keys)
            return inner(ctx)

        method.before_llm = grab
        with torch.no_grad():
            model(**inputs)
        hook.remove()
    hs = seen["h"]
    manual = attn.k_proj(hs).view(hs.shape[0], hs.shape[1], attn.num_heads, -1).float().mean(2)[:, 1:]
    tokens = rec["ctx"].layout.tokens
    assert torch.allclose(keys["packed"][0][tokens.prunable[0]], manual.reshape(-1, manual.shape[-1]), atol=1e-6)


def test_random_is_reproducible_with_a_seed(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    kept = []
    for seed in (5, 5, 6):
        with vflowopt.pruned(model, config_for("random", budget=0.3, seed=seed)) as h:
            rec = _spy(h)
            with torch.no_grad():
                model(**inputs)
            kept.append(rec["sel"].keep.clone())
    assert torch.equal(kept[0], kept[1])
    assert not torch.equal(kept[0], kept[2])


# -- configs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_config_json_round_trip(tmp_path, method):
    extra = {"visionzip": dict(contextual_share=0.25, merge="mean", similarity="features", per_crop=False,
                               vision_layer=1),
             "random": dict(seed=17), "divprune": dict(positions="compact"), "pool": {}}[method]
    cfg = config_for(method, budget=0.2, **extra)
    cfg.save(tmp_path / "s.json")
    back = load_config(tmp_path / "s.json")
    assert type(back) is type(cfg) and back == cfg and back.method == method


@pytest.mark.parametrize("method, fields", [
    ("visionzip", dict()), ("divprune", dict(budget=1.5)), ("random", dict(budget=0.0)),
    ("pool", dict(budget=0.2, positions="shuffle")), ("random", dict(budget=0.2, seed=-1)),
    ("random", dict(budget=0.2, seed=1.5)), ("visionzip", dict(budget=0.2, contextual_share=1.0)),
    ("visionzip", dict(budget=0.2, similarity="values")), ("visionzip", dict(budget=0.2, merge="max")),
])
def test_bad_configs_are_refused(make_model, method, fields):
    model, _ = make_model("llava", "sdpa")
    hooks = all_hooks(model)
    with pytest.raises(ConfigError):
        vflowopt.prune(model, config_for(method, **fields))
    assert all_hooks(model) == hooks


def test_bad_vision_layer_and_unknown_field_are_refused(make_model, tmp_path):
    model, _ = make_model("llava", "sdpa")
    with pytest.raises(ConfigError, match="vision_layer"):
        vflowopt.prune(model, config_for("visionzip", budget=0.2, vision_layer=99))
    (tmp_path / "bad.json").write_text('{"method": "pool", "budget": 0.2, "window": 3}')
    with pytest.raises(ConfigError, match="unknown field"):
        load_config(tmp_path / "bad.json")


def test_search_spaces():
    space = space_for("visionzip", 0.1, 24)
    assert space.names == ("contextual_share",)
    assert space.candidate({"contextual_share": 0.3}).fields == {"contextual_share": 0.3}
    for method in ("divprune", "random", "pool"):
        with pytest.raises(ConfigError, match="no numeric hyper-parameter"):
            space_for(method, 0.1, 24)
