"""The `vflowopt` command, run in-process on the tiny offline models."""

from __future__ import annotations

import json

import pytest

import vflowopt
import vflowopt.tiny
from vflowopt.cli import _layer_ranges, main

PROMPT = "What is in the image?"


@pytest.fixture
def tiny_cached(monkeypatch, make_model):
    """The cached tiny OneVision stands in for the shipped default model (its 6 layers and 3 stages are what
    these tests check; the shipped model itself is exercised in test_vqa.py)."""
    import vflowopt.cli.common

    model, processor = make_model("llava_onevision")
    monkeypatch.setattr(vflowopt.cli.common, "_shipped_model", lambda: (model, processor))
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
