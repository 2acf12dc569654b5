"""The vLLM plugin's pure logic (no vLLM needed): which strategies are served, the refusals, the family check
and the placeholder-count arithmetic. The end-to-end checks inside vLLM are tests/vllm_plugin/test_vllm_engine.py."""

from __future__ import annotations

import json

import pytest

import vflowopt
from vflowopt import ConfigError, config_for
from vflowopt.budget import keep_count
from vflowopt.serving.plan import (
    ENV_VAR,
    REFUSED_METHODS,
    SERVED_METHODS,
    ServingPlan,
    load_plan,
    qwen_tokens_per_image,
    serving_config,
)


def _save(tmp_path, config, name="s.json"):
    path = tmp_path / name
    config.save(path)
    return str(path)


def test_without_the_variable_there_is_no_plan():
    assert load_plan({}) is None
    assert load_plan({ENV_VAR: ""}) is None
    assert load_plan({ENV_VAR: "   "}) is None


@pytest.mark.parametrize("method", SERVED_METHODS)
def test_every_served_method_loads(tmp_path, method):
    plan = load_plan({ENV_VAR: _save(tmp_path, config_for(method, budget=0.25))})
    assert plan.method == method and plan.budget == 0.25 and not plan.is_identity
    assert plan.kept_tokens(16) == 4


def test_vflowopt_keeps_only_its_pre_llm_stage_with_r1_equal_to_the_budget():
    cfg = vflowopt.VFlowOptConfig(budget=0.3, retention=(0.5, 0.8), entropy_weight=0.5)
    served = serving_config(cfg)
    assert served.retention == (0.3, 1.0, 1.0)
    assert served.entropy_weight == 0.5 and served.budget == 0.3


@pytest.mark.parametrize("method", sorted(set(vflowopt.available_methods()) - set(SERVED_METHODS)))
def test_other_methods_are_refused_with_the_reason(tmp_path, method):
    try:
        config = config_for(method, budget=0.5)
    except ConfigError:
        pytest.skip(f"{method} cannot be built from a budget alone")
    with pytest.raises(ConfigError) as info:
        load_plan({ENV_VAR: _save(tmp_path, config)})
    message = str(info.value)
    assert f"method '{method}' cannot be served" in message and "served methods: random" in message
    if method in REFUSED_METHODS:
        assert REFUSED_METHODS[method] in message
    assert "\n" not in message


def test_in_llm_methods_say_why():
    for method in ("fastv", "pdrop", "sparsevlm"):
        assert "KV cache" in REFUSED_METHODS[method]
    assert "inside the LLM" in REFUSED_METHODS["flowcut"]


def test_unknown_method_and_bad_budget_are_refused_with_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "nosuch", "budget": 0.5}))
    with pytest.raises(ConfigError, match=r"VFLOWOPT_VLLM_CONFIG=.*unknown method 'nosuch'; available methods"):
        load_plan({ENV_VAR: str(bad)})
    for budget in (0, 1.5, -0.1):
        bad.write_text(json.dumps({"method": "random", "budget": budget}))
        with pytest.raises(ConfigError, match="budget"):
            load_plan({ENV_VAR: str(bad)})
    bad.write_text(json.dumps({"method": "random"}))
    with pytest.raises(ConfigError, match=r"budget in \(0, 1\]"):
        load_plan({ENV_VAR: str(bad)})
    with pytest.raises(ConfigError, match="not found"):
        load_plan({ENV_VAR: str(tmp_path / "missing.json")})


def test_a_file_cannot_execute_code(tmp_path):
    bad = tmp_path / "evil.json"
    bad.write_text(json.dumps({"method": "random", "budget": 0.5, "seed": "__import__('os').system('false')"}))
    with pytest.raises(ConfigError, match="seed"):
        load_plan({ENV_VAR: str(bad)})


def test_strategy_for_another_family_is_refused():
    plan = ServingPlan(config_for("pool", budget=0.5, model_family="llava_onevision", positions="compact"),
                       source="s.json")
    with pytest.raises(ConfigError, match="saved for a llava_onevision model, but vLLM serves a qwen2_5_vl model"):
        plan.check_family("qwen2_5_vl")
    plan.check_family("llava_onevision")
    ServingPlan(config_for("pool", budget=0.5)).check_family("qwen3_vl")  # unresolved: any family


def test_placeholder_counts():
    assert qwen_tokens_per_image((1, 4, 6), 2) == 6
    assert qwen_tokens_per_image((2, 8, 8), 2) == 32
    with pytest.raises(ConfigError, match="merge size"):
        qwen_tokens_per_image((1, 5, 6), 2)
    plan = ServingPlan(config_for("random", budget=0.1))
    for n in range(0, 200):
        assert plan.kept_tokens(n) == keep_count(n, 0.1)
        assert plan.kept_tokens(n) >= (1 if n else 0)  # a tiny image keeps at least one token
    assert ServingPlan(config_for("random", budget=1.0)).is_identity


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "qwen2_vl"])
def test_qwen_families_serve_original_positions_only(family):
    ServingPlan(config_for("divprune", budget=0.5)).check_family(family)
    plan = ServingPlan(config_for("divprune", budget=0.5, positions="compact"))
    with pytest.raises(ConfigError, match=f"positions='compact', but on {family} .*original M-RoPE positions.*"
                                          "save the strategy with positions='keep'"):
        plan.check_family(family)


@pytest.mark.parametrize("method", SERVED_METHODS)
def test_llava_onevision_serves_compact_positions_only(method):
    """vLLM numbers a 1-D RoPE model's prompt 1..L: a pruned OneVision prompt is positions='compact'."""
    ServingPlan(config_for(method, budget=0.5, positions="compact")).check_family("llava_onevision")
    with pytest.raises(ConfigError, match="positions='keep', but on llava_onevision .*consecutively.*"
                                          "save the strategy with positions='compact'"):
        ServingPlan(config_for(method, budget=0.5)).check_family("llava_onevision")
    ServingPlan(config_for(method, budget=1.0)).check_family("llava_onevision")  # keeps all: either mode


def test_attention_methods_are_refused_only_when_images_are_split_over_ranks():
    from vflowopt.serving.vllm import check_tensor_parallel

    plan = ServingPlan(config_for("visionzip", budget=0.5))
    check_tensor_parallel(plan, needs_attention=True, tp_size=1)
    check_tensor_parallel(plan, needs_attention=True, tp_size=4)  # sharded heads: averaged across the ranks
    check_tensor_parallel(plan, needs_attention=False, tp_size=4, images_split=True)
    check_tensor_parallel(plan, needs_attention=True, tp_size=1, images_split=True)
    with pytest.raises(ConfigError, match="--mm-encoder-tp-mode data vLLM runs each image's vision pass on one of "
                                          "the 2 ranks.*--mm-encoder-tp-mode weights"):
        check_tensor_parallel(plan, needs_attention=True, tp_size=2, images_split=True)


def test_an_uncovered_model_class_is_warned_about_once(caplog):
    from vflowopt.serving import vllm as plugin

    with caplog.at_level("WARNING", logger="vflowopt.serving"):
        plugin.warn_uncovered("SomeOtherForConditionalGeneration")
        plugin.warn_uncovered("SomeOtherForConditionalGeneration")
    warnings = [r for r in caplog.records if "SomeOtherForConditionalGeneration" in r.getMessage()]
    assert len(warnings) == 1 and "serving it unpruned" in warnings[0].getMessage()


def test_the_plugin_module_imports_without_vllm_and_does_nothing_without_the_variable(monkeypatch):
    from vflowopt.serving import vllm as plugin

    monkeypatch.delenv(ENV_VAR, raising=False)
    plugin.set_plan(None)
    assert plugin.active_plan() is None
    with pytest.raises(AttributeError):
        plugin.NoSuchClass  # noqa: B018
