"""The method contract: the registry refuses duplicates, a scorer writes only its score, and the pre-LLM
selection of every method can be computed from tensors alone, exactly as the runtime computes it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import vflowopt
from conftest import one_image_inputs
from vflowopt import registry
from vflowopt.methods.base import PrefillContext, PreLLMConfig, ScorerMethod, select_before_llm
from vflowopt.models.base import adapter_for


@pytest.fixture
def scratch_registry(monkeypatch):
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_duplicate_names_and_reused_configs_are_refused(scratch_registry):
    config_cls, method_cls = registry.method_entry("random")
    with pytest.raises(vflowopt.ConfigError, match="'random' is already registered"):
        registry.register_method("random", config_cls, method_cls)

    @dataclasses.dataclass
    class OtherConfig(PreLLMConfig):
        pass

    with pytest.raises(vflowopt.ConfigError, match="already registered"):
        registry.register_method("divprune", OtherConfig, method_cls)
    with pytest.raises(vflowopt.ConfigError, match="already the config of method 'random'"):
        registry.register_method("random_again", config_cls, method_cls)
    with pytest.raises(vflowopt.ConfigError, match="identifier"):
        registry.register_method("not a name", OtherConfig, method_cls)
    assert registry.available_methods() == vflowopt.available_methods()


def test_a_scorer_writes_only_its_score(scratch_registry, make_model):
    @dataclasses.dataclass
    class FirstConfig(PreLLMConfig):
        pass

    class FirstTokens(ScorerMethod):  # keeps the earliest tokens of every image
        def score(self, ctx: PrefillContext) -> torch.Tensor:
            return -torch.arange(ctx.features.shape[1], dtype=torch.float32).expand(ctx.features.shape[:2])

    registry.register_method("first_tokens", FirstConfig, FirstTokens)
    assert "first_tokens" in vflowopt.available_methods() and FirstTokens.config_cls is FirstConfig
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    layout_of = {}
    original = FirstTokens.before_llm

    def spy(self, ctx):
        selection = original(self, ctx)
        layout_of["tokens"], layout_of["keep"] = ctx.layout.tokens, selection.keep
        return selection

    FirstTokens.before_llm = spy
    with vflowopt.pruned(model, vflowopt.config_for("first_tokens", budget=0.25)) as handle, torch.no_grad():
        model(**inputs)
        stats = handle.stats
    tokens, keep = layout_of["tokens"], layout_of["keep"]
    n = int(tokens.prunable[0].sum())
    assert stats.stages == [("before LLM", round(0.25 * n))]
    kept = keep[0] & tokens.prunable[0]
    prunable_idx = tokens.prunable[0].nonzero().squeeze(-1)
    assert kept.nonzero().squeeze(-1).tolist() == prunable_idx[: round(0.25 * n)].tolist()
    assert bool(keep[0][~tokens.prunable[0]].all())  # newline tokens are never candidates


def _capture(method_cls, monkeypatch):
    seen: dict = {}
    for name in ("on_pixels", "on_vision_keys", "on_vision_attention"):
        original = getattr(method_cls, name)

        def wrapped(self, value, _name=name, _original=original):
            seen[_name] = value
            return _original(self, value)

        monkeypatch.setattr(method_cls, name, wrapped)
    original_before = method_cls.before_llm

    def before(self, ctx):
        selection = original_before(self, ctx)
        seen.update(layout=ctx.layout, features=ctx.features, image_mask=ctx.image_mask, embeds=ctx.embeds,
                    attention_mask=ctx.attention_mask, selection=selection)
        return selection

    monkeypatch.setattr(method_cls, "before_llm", before)
    return seen


@pytest.mark.parametrize("method", vflowopt.available_methods())
def test_pre_llm_selection_without_the_runtime_equals_the_runtime(make_model, monkeypatch, method):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    config_cls, method_cls = registry.method_entry(method)
    config = vflowopt.config_for(method, budget=0.5)
    seen = _capture(method_cls, monkeypatch)
    try:
        handle = vflowopt.prune(model, config)
    except vflowopt.ConfigError as exc:
        pytest.skip(f"{method} cannot prune this model: {exc}")
    with handle, torch.no_grad():
        model(**inputs)
    adapter = adapter_for(model)
    signals = {"pixel_values": seen.get("on_pixels"), "vision_attention": seen.get("on_vision_attention"),
               "vision_keys": seen.get("on_vision_keys")}
    monkeypatch.undo()  # the real methods again, nothing recorded
    method_obj = method_cls(config.resolve(adapter), adapter)
    if method_obj.vision_prune_layers or method_obj.vision_tap_layers:
        with pytest.raises(vflowopt.ConfigError, match="inside the vision encoder"):
            select_before_llm(config, adapter, seen["layout"], seen["features"], signals=signals)
        return
    got = select_before_llm(config, adapter, seen["layout"], seen["features"], signals=signals,
                            image_mask=seen["image_mask"], embeds=seen["embeds"],
                            attention_mask=seen["attention_mask"])
    want = seen["selection"]
    assert torch.equal(got.keep, want.keep)
    if want.replaced is not None and bool(want.replaced.any()):
        assert torch.equal(got.replaced, want.replaced)
        assert torch.equal(got.features[got.replaced], want.features[want.replaced])


def test_select_before_llm_names_a_missing_signal(make_model):
    model, _ = make_model("llava_onevision", "sdpa")
    adapter = adapter_for(model)
    empty = torch.zeros(1, 4, 8)
    with pytest.raises(vflowopt.ConfigError, match="needs the signal"):
        select_before_llm(vflowopt.VFlowOptConfig(budget=0.5), adapter, None, empty)
