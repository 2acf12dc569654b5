"""The pruning runtime end to end on tiny LLaVA and LLaVA-OneVision models."""

from __future__ import annotations

import pytest
import torch

import vflowopt
from checks import check_batch_equals_singles, check_cache_and_decode, check_identity, generate
from conftest import all_hooks, one_image_inputs
from vflowopt.models.base import adapter_for
from vflowopt.tiny import build_inputs, example_image

FAMILIES = ["llava", "llava_onevision"]
ATTN = ["sdpa", "eager"]
# Small thresholds so the calibrated set K is non-trivial on 16-patch tiles.
STRATEGY = dict(threshold=1.5, entropy_weight=0.5, grid_size=2)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_identity_at_full_budget(make_model, family, attn):
    model, proc = make_model(family, attn)
    check_identity(model, one_image_inputs(proc), vflowopt.VFlowOptConfig(budget=1.0, **STRATEGY))


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_cache_lengths_and_decode_match_no_cache_forward(make_model, family, attn, positions):
    model, proc = make_model(family, attn)
    cfg = vflowopt.VFlowOptConfig(budget=0.3, positions=positions, **STRATEGY)
    stats = check_cache_and_decode(model, one_image_inputs(proc), cfg, n_new=5)
    kv = stats.kv_tokens_per_layer
    k1, k2 = vflowopt.VFlowOptConfig(budget=0.3).resolve(adapter_for(model)).stage_layers
    assert len(set(kv[:k1])) == 1 and kv[0] >= kv[k1] > kv[k2]
    assert stats.tokens_into_llm < stats.prompt_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_their_original_positions(make_model, family):
    model, proc = make_model(family, "sdpa")
    inputs = one_image_inputs(proc)
    seen: dict[str, list] = {"keep": [], "compact": []}
    n_layers = model.config.text_config.num_hidden_layers
    for mode in seen:
        with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.3, positions=mode, **STRATEGY)) as h:
            hooks = [
                layer.register_forward_pre_hook(
                    lambda m, a, kw, mode=mode: seen[mode].append((kw["position_ids"].clone(), a[0].clone())),
                    with_kwargs=True,
                )
                for layer in model.model.language_model.layers
            ]
            with torch.no_grad():
                model(**inputs)
            for hk in hooks:
                hk.remove()
            k1, k2 = h.config.stage_layers
            recycled = h.stats.recycled_tokens
    l0 = inputs["input_ids"].shape[1]
    pos0, hidden0 = seen["keep"][0]
    pos0 = pos0[0]
    assert pos0.shape[0] < l0 and bool((pos0[1:] > pos0[:-1]).all())  # gapped, increasing
    text = (inputs["input_ids"][0] != model.config.image_token_id).nonzero().squeeze(-1)
    assert set(text.tolist()) <= set(pos0.tolist())  # every text token is kept, at its own position
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(inputs["input_ids"])
    # text rows entering the LLM are the prompt's own embeddings at those positions
    is_text = torch.isin(pos0, text)
    assert torch.equal(hidden0[0][is_text], embeds[0, pos0[is_text]])
    assert recycled > 0
    # later stages keep a subset of the positions of the previous stage
    pos_k2 = seen["keep"][k2][0][0]
    assert set(pos_k2.tolist()) < set(pos0.tolist())
    # compact renumbers before the LLM and keeps gaps inside it
    cpos0 = seen["compact"][0][0][0]
    assert torch.equal(cpos0, torch.arange(cpos0.shape[0]))
    assert seen["compact"][n_layers - 1][0][0].shape[0] < cpos0.shape[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_singles(make_model, family):
    model, proc = make_model(family, "sdpa")
    images = [example_image(seed=1), example_image(seed=2)]
    check_batch_equals_singles(model, proc, images, vflowopt.VFlowOptConfig(budget=0.25, **STRATEGY), n_new=6)


def test_batch_with_different_visual_counts_is_refused(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    batch = build_inputs(
        proc, [example_image(seed=1, size=(56, 56)), example_image(seed=2, size=(120, 80))], ["a", "b"]
    )
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.5)):
        with pytest.raises(vflowopt.PruningError, match="same number of visual tokens"):
            with torch.no_grad():
                model(**batch)


def test_two_images_in_one_prompt_each_keep_their_share(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = build_inputs(proc, [example_image(seed=1), example_image(seed=2, size=(64, 64))], ["Compare them."])
    kept_per_image = {}

    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.5, **STRATEGY)) as h:
        engine = h._engine
        original = engine.method.before_llm

        def spy(ctx):
            sel = original(ctx)
            t = ctx.layout.tokens
            for img in t.image[0].unique().tolist():
                on = (t.image[0] == img) & t.prunable[0]
                kept_per_image[img] = (int(on.sum()), int((sel.keep[0] & on).sum()))
            return sel

        engine.method.before_llm = spy
        generate(model, inputs, 3)
    r1 = h.config.retention[0]
    assert len(kept_per_image) == 2
    for n, kept in kept_per_image.values():
        assert kept == round(r1 * n)


@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt_is_untouched(make_model, family):
    model, proc = make_model(family, "eager")
    inputs = build_inputs(proc, None, ["Describe a red circle."])
    with torch.no_grad():
        ref = model(**inputs).logits
    ref_tokens = generate(model, inputs)
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.1)) as h:
        with torch.no_grad():
            out = model(**inputs).logits
        tokens = generate(model, inputs)
        assert h.stats.visual_tokens == 0
    assert torch.equal(ref, out) and torch.equal(ref_tokens, tokens)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_restores_the_model_exactly(make_model, family):
    model, proc = make_model(family, "sdpa")
    inputs = one_image_inputs(proc)
    before_hooks = all_hooks(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    h = vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=0.2))
    assert "get_image_features" in vars(model.model)  # the wrapper that marks image passes
    generate(model, inputs, 2)
    h.remove()
    h.remove()  # idempotent
    assert all_hooks(model) == before_hooks
    assert "get_image_features" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    # and it can be pruned again
    vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=0.5)).remove()


def test_two_models_in_one_process_do_not_interfere(make_model):
    a, proc_a = make_model("llava_onevision", "sdpa")
    b, proc_b = make_model("llava", "sdpa")
    ha = vflowopt.prune(a, vflowopt.VFlowOptConfig(budget=0.2))
    hb = vflowopt.prune(b, vflowopt.VFlowOptConfig(budget=0.6))
    generate(a, one_image_inputs(proc_a), 2)
    generate(b, one_image_inputs(proc_b), 2)
    assert ha.stats.mean_retention < 0.3 < 0.5 < hb.stats.mean_retention
    ha.remove()
    hb.remove()


@pytest.mark.parametrize("family", FAMILIES)
def test_beam_search_expands_the_batch_after_encoding(make_model, family):
    model, proc = make_model(family, "sdpa")
    inputs = one_image_inputs(proc)
    ref = generate(model, inputs, 4, num_beams=2)
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=1.0)):
        assert torch.equal(generate(model, inputs, 4, num_beams=2), ref)
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.3)) as h:
        out = generate(model, inputs, 4, num_beams=2, num_return_sequences=2)
        assert out.shape[0] == 2 and h.stats.batch_size == 2
        assert h.stats.tokens_into_llm < h.stats.prompt_tokens


def test_static_cache_with_in_llm_stages_is_refused(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.5, retention=(1.0, 0.5))):
        with pytest.raises(vflowopt.PruningError, match="dynamic KV cache"):
            generate(model, inputs, 2, cache_implementation="static")
        generate(model, inputs, 2)  # still usable


def _tapped_configs(model) -> int:
    return sum(1 for m in model.modules() if hasattr(getattr(m, "config", None), "_vflowopt_tap"))


def _our_hooks(model) -> int:
    """Hooks installed by vflowopt (transformers installs output-capturing hooks of its own, lazily)."""

    def ours(fn) -> bool:
        fn = getattr(fn, "func", fn)
        return getattr(getattr(fn, "__func__", fn), "__module__", "").startswith("vflowopt")

    return sum(ours(fn) for m in model.modules()
               for d in (m._forward_pre_hooks, m._forward_hooks) for fn in d.values())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["vflowopt", "flowcut", "fastv"])
def test_deep_copy_carries_an_independent_working_pruning(make_model, family, method):
    import copy

    model, proc = make_model(family, "eager")
    inputs = one_image_inputs(proc)
    with torch.no_grad():
        ref = model(**inputs).logits
    cfg = vflowopt.config_for(method, budget=0.5)
    h = vflowopt.prune(model, cfg)
    try:
        tokens = generate(model, inputs, 4)
        stats = h.stats
        twin = copy.deepcopy(model)
        twin_handle = vflowopt.api.active_handle(twin)
        assert twin_handle is not None and twin_handle is not h and twin_handle.model is twin
        assert torch.equal(generate(twin, inputs, 4), tokens)  # the copy prunes, on its own engine
        assert twin_handle.stats.stages == stats.stages
        vflowopt.unprune(twin)  # the copy's pruning is cleaned like any other
        assert _our_hooks(twin) == 0 and _tapped_configs(twin) == 0
        assert "get_image_features" not in vars(twin.model)
        with torch.no_grad():
            assert torch.equal(twin(**inputs).logits, ref)
        with vflowopt.pruned(twin, cfg):  # and pruned again: no second set of hooks stacked on the first
            assert _our_hooks(twin) == _our_hooks(model) > 0
            assert torch.equal(generate(twin, inputs, 4), tokens)
        assert vflowopt.api.active_handle(model) is h  # the original is still pruned, and still works
        assert torch.equal(generate(model, inputs, 4), tokens)
    finally:
        h.remove()
    assert _our_hooks(model) == 0 and _tapped_configs(model) == 0
