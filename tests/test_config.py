"""Budget arithmetic, configs that round-trip, and every bad input refused with the model intact."""

from __future__ import annotations

import json
import random

import pytest
import torch

import vflowopt
from conftest import all_hooks, one_image_inputs
from vflowopt.budget import default_stage_layers, solve_r3, three_stage_mean
from vflowopt.tiny import tiny_llava_onevision


def test_three_stage_mean_matches_algorithm_1():
    # LLaVA-OV-7B: 28 layers, stages at 9 and 18 -> L1 = 9, L2 = 9, L3 = 10
    assert default_stage_layers(28) == (9, 18)
    r = three_stage_mean((0.11662, 1.0, 0.6011), (9, 18), 28)
    assert abs(r - (0.11662 * 9 + 0.11662 * 9 + 0.11662 * 0.6011 * 10) / 28) < 1e-12
    r3 = solve_r3(0.1, 0.11662, 1.0, (9, 18), 28)
    assert abs(three_stage_mean((0.11662, 1.0, r3), (9, 18), 28) - 0.1) < 1e-12


@pytest.mark.parametrize("budget", [0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_default_strategy_meets_its_budget(make_model, budget):
    model, _ = make_model("llava_onevision", "sdpa")
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=budget)) as h:
        r = h.config.retention
        assert all(0 <= x <= 1 for x in r)
        assert abs(three_stage_mean(r, h.config.stage_layers, 6) - budget) < 1e-9


def test_realised_retention_equals_budget_within_one_token_per_stage(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    rng = random.Random(0)
    checked = 0
    while checked < 12:
        budget = rng.uniform(0.05, 1.0)
        r1, r2 = rng.uniform(budget, 1.0), rng.uniform(0.0, 1.0)
        r3 = solve_r3(budget, r1, r2, (2, 4), 6)
        if not 0 <= r3 <= 1:
            continue
        cfg = vflowopt.VFlowOptConfig(budget=budget, retention=(r1, r2), threshold=rng.uniform(0, 3),
                                      entropy_weight=rng.uniform(-1, 1), grid_size=rng.uniform(1, 4))
        with vflowopt.pruned(model, cfg) as h:
            with torch.no_grad():
                model(**inputs)
            n = h.stats.visual_tokens
            assert abs(h.stats.mean_retention - budget) * n <= 1.0
            k1, k2 = h.config.stage_layers
            counts = h.stats.visual_tokens_per_layer
            assert counts[0] == round(r1 * n)
            assert counts[k1] == round(r2 * counts[0])
            assert counts[k2] == round(h.config.retention[2] * counts[k1])
        checked += 1


def test_registry_and_json_round_trip(tmp_path, make_model):
    assert "vflowopt" in vflowopt.available_methods()
    cfg = vflowopt.config_for("vflowopt", budget=0.1, grid_size=3.5, stage_layers=(2, 5))
    path = tmp_path / "s.json"
    cfg.save(path)
    assert vflowopt.load_config(path) == cfg
    model, _ = make_model("llava_onevision", "sdpa")
    with vflowopt.pruned(model, cfg) as h:
        h.config.save(path)
    loaded = vflowopt.load_config(path)
    assert loaded == h.config and loaded.model_family == "llava_onevision" and loaded.num_layers == 6
    data = json.loads(path.read_text())
    assert data["method"] == "vflowopt" and data["retention"] == list(h.config.retention)
    vflowopt.prune(model, loaded).remove()  # a resolved strategy re-applies to its own model


def test_registry_errors(tmp_path):
    with pytest.raises(vflowopt.ConfigError, match="available methods: .*vflowopt"):
        vflowopt.config_for("nope", budget=0.5)
    with pytest.raises(vflowopt.ConfigError, match="not found"):
        vflowopt.load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method": "vflowopt", "budget": 0.5, "colour": "red"}))
    with pytest.raises(vflowopt.ConfigError, match="unknown field"):
        vflowopt.load_config(bad)


BAD_CONFIGS = [
    (dict(budget=0.0), "budget must be a number in \\(0, 1\\]"),
    (dict(budget=1.5), "budget"),
    (dict(budget=float("nan")), "budget"),
    (dict(budget=-0.2), "budget"),
    (dict(budget="0.5"), "budget"),
    (dict(), "needs a budget"),
    (dict(budget=0.5, retention=(1.5, 1.0)), "retention R1"),
    (dict(budget=0.5, retention=(0.5, -0.1)), "retention R2"),
    (dict(budget=0.5, retention=(0.5,)), "retention must be"),
    (dict(budget=0.5, retention=(0.1, 0.1)), "R3 would be .* outside \\[0, 1\\]"),
    (dict(budget=0.5, retention=(0.5, 0.5, 0.5)), "not the budget"),
    (dict(budget=0.5, stage_layers=(2, 99)), "must lie in \\[1, 5\\]"),
    (dict(budget=0.5, stage_layers=(4, 2)), "strictly increasing"),
    (dict(budget=0.5, stage_layers=(0, 3)), "must lie in"),
    (dict(budget=0.5, grid_size=0.5), "grid_size"),
    (dict(budget=0.5, threshold=-1.0), "threshold"),
    (dict(budget=0.5, threshold=float("inf")), "threshold"),
    (dict(budget=0.5, vision_layer=7), "vision_layer"),
    (dict(budget=0.5, positions="shuffle"), "positions"),
]


@pytest.mark.parametrize("kwargs,match", BAD_CONFIGS)
def test_bad_config_is_refused_and_model_left_intact(make_model, kwargs, match):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    hooks = all_hooks(model)
    with torch.no_grad():
        ref = model(**inputs).logits
    with pytest.raises(vflowopt.ConfigError, match=match):
        vflowopt.prune(model, vflowopt.VFlowOptConfig(**kwargs))
    assert all_hooks(model) == hooks and "get_image_features" not in vars(model.model)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=0.5)).remove()  # not left "already pruned"


def test_unsupported_family_names_the_supported_ones():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=50))
    supported = "llava, llava_next, llava_next_video, llava_onevision, qwen2_vl, qwen2_5_vl, qwen3_vl, video_llava"
    with pytest.raises(vflowopt.ConfigError, match=f"supported families: {supported}"):
        vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=0.5))
    assert all_hooks(model) == 0


def test_pruning_twice_is_refused(make_model):
    model, _ = make_model("llava", "sdpa")
    h = vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=0.5))
    hooks = all_hooks(model)
    with pytest.raises(vflowopt.ConfigError, match="already pruned"):
        vflowopt.prune(model, vflowopt.VFlowOptConfig(budget=0.2))
    assert all_hooks(model) == hooks and h.active
    h.remove()


def test_strategy_for_another_model_is_refused(tmp_path, make_model):
    ov, _ = make_model("llava_onevision", "sdpa")
    with vflowopt.pruned(ov, vflowopt.VFlowOptConfig(budget=0.25)) as h:
        h.config.save(tmp_path / "ov.json")
    strategy = vflowopt.load_config(tmp_path / "ov.json")
    llava, _ = make_model("llava", "sdpa")
    llava_hooks = all_hooks(llava)
    with pytest.raises(vflowopt.ConfigError, match="made for a 'llava_onevision' model"):
        vflowopt.prune(llava, strategy)
    deeper, _ = tiny_llava_onevision(num_layers=9)
    with pytest.raises(vflowopt.ConfigError, match="made for an LLM with 6 layers; this model has 9"):
        vflowopt.prune(deeper, strategy)
    assert all_hooks(llava) == llava_hooks and all_hooks(deeper) == 0


def test_error_during_a_forward_leaves_the_model_usable(make_model):
    model, proc = make_model("llava_onevision", "sdpa")
    inputs = one_image_inputs(proc)
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.3)) as h:
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                                   image_sizes=inputs["image_sizes"]).pooler_output
            h._engine._passes = []  # features computed, then fed as precomputed outputs (no vision pass seen)
            kwargs = {k: v for k, v in inputs.items() if k != "pixel_values"}
            from transformers.modeling_outputs import BaseModelOutputWithPooling

            with pytest.raises(vflowopt.PruningError, match="not computed by the model's vision tower"):
                model(**kwargs, mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=feats)})
            model(**inputs)
        assert h.stats.mean_retention < 0.5


# -- an invalid config cannot be built (types first, then ranges), for every registered method ----------
@pytest.mark.parametrize("method", vflowopt.available_methods())
@pytest.mark.parametrize("budget", [0, 0.0, 1.5, -0.1, float("nan"), float("inf"), "0.5", True, [0.5]])
def test_every_method_refuses_a_bad_budget_at_construction(method, budget):
    with pytest.raises(vflowopt.ConfigError, match="budget"):
        vflowopt.config_for(method, budget=budget)


BAD_FIELDS = [
    (dict(recycle="no"), "recycle must be true or false"),
    (dict(recycle=0), "recycle must be true or false"),
    (dict(image_mean=(0.5,)), "image_mean must be a list of 3 values"),
    (dict(image_std=(0, 0, 0)), "image_std must be three numbers > 0"),
    (dict(image_std=(0.5, 0.5, "x")), "image_std must be a list of 3 values"),
    (dict(entropy_weight=1e6), "entropy_weight"),
    (dict(entropy_weight=float("nan")), "entropy_weight"),
    (dict(grid_size=1e9), "grid_size"),
    (dict(stage_layers=(1.5, 3)), "stage_layers must be a list of 2 values"),
    (dict(vision_layer=1.0), "vision_layer must be an integer"),
    (dict(calibration=1), "calibration must be a string"),
]


@pytest.mark.parametrize("kwargs,match", BAD_FIELDS)
def test_field_types_and_ranges_are_checked_at_construction(kwargs, match):
    with pytest.raises(vflowopt.ConfigError, match=match):
        vflowopt.VFlowOptConfig(budget=0.5, **kwargs)


def test_lists_become_tuples_and_ints_are_numbers():
    cfg = vflowopt.VFlowOptConfig(budget=1, retention=[0.5, 1.0], image_mean=[0, 0, 0], threshold=35)
    assert cfg.retention == (0.5, 1.0) and cfg.image_mean == (0, 0, 0)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"recycle": "no"}, "recycle must be true or false"),
        ({"method": ["vflowopt"]}, "'method' must be a method name"),
        ({"schema_version": "1"}, "'schema_version' must be a whole number"),
        ({"schema_version": 99}, "reads up to"),
        ({"budget": 0}, "budget"),
        ({"image_mean": [0.5]}, "image_mean"),
    ],
)
def test_strategy_file_with_bad_fields_is_refused_with_one_clear_error(tmp_path, fields, match):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"method": "vflowopt", "schema_version": 1, "budget": 0.3, **fields}))
    with pytest.raises(vflowopt.ConfigError, match=match):
        vflowopt.load_config(path)


def test_keep_count_never_empties_an_image():
    from vflowopt.budget import keep_count

    assert keep_count(1, 0.5) == 1  # round(0.5) would be 0
    assert keep_count(576, 1e-9) == 1
    assert keep_count(0, 0.5) == 0
    assert keep_count(10, 0.25) == 2 and keep_count(10, 1.0) == 10


@pytest.mark.parametrize("method", vflowopt.available_methods())
def test_a_tiny_budget_keeps_one_token_per_image_and_stage(make_model, method):
    model, proc = make_model("llava_onevision", "sdpa")
    try:
        cfg = vflowopt.config_for(method, budget=1e-9)
        handle = vflowopt.prune(model, cfg)
    except vflowopt.ConfigError as exc:  # in-LLM methods whose first stage sets a minimum budget say so
        assert "budget" in str(exc)
        return
    try:
        with torch.no_grad():
            model(**one_image_inputs(proc))
        stats = handle.stats
        assert stats.stages and all(n >= 1 for _, n in stats.stages), stats.stages
        assert min(stats.visual_tokens_per_layer) >= 1
    finally:
        handle.remove()


def test_saved_files_get_the_users_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp (0o600); the file must end up as open() would make it."""
    import os

    mask = os.umask(0o022)
    try:
        path = tmp_path / "s.json"
        vflowopt.config_for("random", budget=0.5).save(path)
        assert (path.stat().st_mode & 0o777) == 0o644
        assert vflowopt.load_config(path).budget == 0.5
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    finally:
        os.umask(mask)
