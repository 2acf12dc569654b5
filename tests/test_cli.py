"""The `vflowopt` command, run in-process on the tiny offline models."""

from __future__ import annotations

import json

import pytest
import torch

import vflowopt
import vflowopt.tiny
from vflowopt.cli import _layer_ranges, main

PROMPT = "What is in the image?"


@pytest.fixture
def tiny_cached(monkeypatch, make_model, tmp_path_factory):
    """The cached tiny OneVision stands in for the shipped default model (its 6 layers and 3 stages are what
    these tests check; the shipped model itself is exercised in test_vqa.py), with a model folder that
    holds no vflowopt_strategy.json."""
    import vflowopt.cli.common
    import vflowopt.cli.run

    model, processor = make_model("llava_onevision")
    monkeypatch.setattr(vflowopt.cli.common, "_shipped_model", lambda: (model, processor))
    folder = tmp_path_factory.mktemp("tiny_model_folder")
    monkeypatch.setattr(vflowopt.cli.run, "_model_dir", lambda args: folder)
    model._test_folder = folder
    return model


def _json_run(capsys, *extra: str) -> dict:
    code = main(["run", "--prompt", PROMPT, "--max-new-tokens", "2", "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_default_offline_run(capsys, tiny_cached):
    code = main(["run", "--prompt", PROMPT, "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "No --model given" in out
    assert "sample_00.png" in out
    for label in ("vflowopt / 0.25", "visual tokens produced", "before LLM", "KV tokens per layer",
                  "layers 0-", "mean retention", "prefill", "pruning overhead"):
        assert label in out
    assert not vflowopt.api.active_handle(tiny_cached), "the pruning handle must be removed"


def test_json_output_has_the_fields(capsys, tiny_cached):
    report = _json_run(capsys, "--budget", "0.5", "--positions", "compact")
    assert report["random_weights"] is False and report["expected_answer"] is None  # --prompt given
    assert report["method"] == "vflowopt" and report["budget"] == 0.5
    strategy = report["strategy"]
    for key in ("retention", "stage_layers", "threshold", "entropy_weight", "grid_size"):
        assert key in strategy
    assert strategy["positions"] == "compact"
    n_layers = len(report["kv_tokens_per_layer"])
    assert n_layers == len(report["visual_tokens_per_layer"]) == 6
    assert report["visual_tokens"] > 0
    assert [s["stage"] for s in report["stages"]] == ["before LLM", "layer 2", "layer 4"]
    assert report["tokens_into_llm"] < report["prompt_tokens"]
    assert report["mean_retention"] == pytest.approx(0.5, abs=0.05)
    assert report["prefill_ms"] > 0 and report["pruning_ms"] >= 0
    assert report["new_tokens"] <= 2 and isinstance(report["answer"], str)
    assert not vflowopt.api.active_handle(tiny_cached)


def test_strategy_file_round_trip(capsys, tmp_path, tiny_cached):
    path = tmp_path / "strategy.json"
    vflowopt.VFlowOptConfig(retention=(0.5, 1.0, 0.5), threshold=20.0).save(path)
    report = _json_run(capsys, "--strategy", str(path), "--method", "vflowopt")
    assert report["strategy"]["retention"] == [0.5, 1.0, 0.5]
    assert report["strategy"]["threshold"] == 20.0
    assert report["stages"][0]["visual_tokens_kept"] == round(0.5 * report["visual_tokens"])


def test_local_model_directory(capsys, tmp_path, make_model):
    """A saved LLaVA-OneVision directory: AutoProcessor needs torchvision, so the CLI builds it from parts."""
    model, processor = make_model("llava_onevision")
    model.save_pretrained(tmp_path)
    processor.image_processor.save_pretrained(tmp_path)
    processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": processor.num_image_tokens,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "vision_aspect_ratio": processor.vision_aspect_ratio,
        "chat_template": processor.chat_template,
    }))
    report = _json_run(capsys, "--model", str(tmp_path))
    assert report["random_weights"] is False
    assert report["model_class"] == "LlavaOnevisionForConditionalGeneration"
    assert report["mean_retention"] == pytest.approx(0.25, abs=0.05)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budget", "1.5"], "(0, 1]"),
        (["--budget", "0"], "(0, 1]"),
        (["--method", "nope"], "vflowopt"),
        (["--model", "/definitely/not/a/model/dir"], "no hub downloads"),
    ],
)
def test_errors_exit_2_with_one_line(capsys, args, message):
    code = main(["run", "--prompt", PROMPT, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_budget_or_other_method_with_strategy_is_refused(capsys, tmp_path):
    path = tmp_path / "s.json"
    vflowopt.VFlowOptConfig(budget=0.3).save(path)
    assert main(["run", "--prompt", PROMPT, "--strategy", str(path), "--budget", "0.3"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert main(["run", "--prompt", PROMPT, "--strategy", str(path), "--method", "other"]) == 2
    assert "contradicts" in capsys.readouterr().err


def test_usage_errors_and_help_return_codes(capsys):
    assert main(["run", "--image", "x.png"]) == 2  # --prompt is required with --image
    assert main([]) == 2  # a subcommand is required
    assert main(["run", "--help"]) == 0
    assert "--strategy" in capsys.readouterr().out


def test_layer_ranges():
    assert _layer_ranges([56, 56, 56, 42]) == "layers 0-2: 56, 3: 42"
    assert _layer_ranges([7]) == "layers 0: 7"


def test_the_model_folders_strategy_is_the_default_and_the_output_says_which(capsys, tiny_cached):
    folder = tiny_cached._test_folder
    report = _json_run(capsys)
    assert report["method"] == "vflowopt" and report["budget"] == 0.25
    assert "default strategy at budget 0.25" in report["strategy_source"] and "no vflowopt_strategy.json" in \
        report["strategy_source"]
    shipped = vflowopt.config_for("visionzip", budget=0.5, contextual_share=0.25)
    shipped.save(folder / "vflowopt_strategy.json")
    try:
        report = _json_run(capsys)
        assert report["method"] == "visionzip" and report["budget"] == 0.5
        assert report["strategy"]["contextual_share"] == 0.25
        assert report["strategy_source"].startswith("shipped with the model")
        assert report["mean_retention"] == pytest.approx(0.5, abs=0.05)
        # any of --method, --budget, --strategy replaces it
        assert _json_run(capsys, "--budget", "0.5")["method"] == "vflowopt"
        assert _json_run(capsys, "--method", "random")["budget"] == 0.25
        code = main(["run", "--prompt", PROMPT, "--max-new-tokens", "1", "--json"])
        assert code == 0 and "strategy" in capsys.readouterr().out
        (folder / "vflowopt_strategy.json").write_text('{"method": "visionzip", "budget": 7}')
        assert main(["run", "--prompt", PROMPT]) == 2
        err = capsys.readouterr().err
        assert "the strategy shipped with the model" in err and "Traceback" not in err
    finally:
        (folder / "vflowopt_strategy.json").unlink()


def test_compare_shows_the_unpruned_run_beside_the_pruned_one(capsys, tiny_cached, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables to the terminal width
    report = _json_run(capsys, "--compare", "--budget", "0.5")
    full = report["unpruned"]
    assert full["tokens_into_llm"] == report["prompt_tokens"] > report["tokens_into_llm"]
    # KV bytes are the cache's real tensors: fp32 keys and values of every layer's kept tokens
    text = tiny_cached.config.get_text_config()
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4
    assert report["kv_bytes"] == per_token * sum(report["kv_tokens_per_layer"])
    assert full["kv_bytes"] == per_token * report["prompt_tokens"] * text.num_hidden_layers
    assert full["prefill_ms"] > 0 and full["generate_ms"] > 0 and isinstance(full["answer"], str)
    with torch.inference_mode():  # the unpruned answer is the model's own, with nothing attached
        inputs = vflowopt.tiny.build_inputs(vflowopt.cli.common._shipped_model()[1],
                                            [vflowopt.cli.common._shipped_sample()["image"]], [PROMPT])
        out = tiny_cached.generate(**inputs, max_new_tokens=2, do_sample=False)
    tokenizer = vflowopt.cli.common._shipped_model()[1].tokenizer
    assert full["answer"] == tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert main(["run", "--prompt", PROMPT, "--max-new-tokens", "1", "--compare"]) == 0
    out = capsys.readouterr().out
    assert "Unpruned vs pruned" in out and "KV cache after prefill" in out and "pruned / unpruned" in out
    # a method that refuses the budget: one line, exit 2, nothing run
    assert main(["run", "--prompt", PROMPT, "--compare", "--method", "vtw", "--budget", "0.25"]) == 2
    err = capsys.readouterr().err
    assert "1/6" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not vflowopt.api.active_handle(tiny_cached)
