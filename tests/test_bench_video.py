"""`vflowopt bench --video-frames`: video tokens counted as visual tokens, analytic FLOPs of video prefills
against torch's flop counter, the shipped architectures' offline processors for videos, refused flags."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vflowopt
from vflowopt.bench import prefill_flops
from vflowopt.bench.realmodels import REAL_MODELS, load_real_config, offline_processor
from vflowopt.bench.run import _VisionCensus, visual_placeholders
from vflowopt.bench.video import frame_processor_for
from vflowopt.cli import main
from vflowopt.tiny import example_image
from vflowopt.tiny_families import VIDEO_FAMILY_BUILDERS
from vflowopt.video_inputs import build_video_inputs, example_video, get_video_processor


def _counted(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@functools.cache
def _eager(family: str):
    return VIDEO_FAMILY_BUILDERS[family](attn_implementation="eager")


def _video_prompt(processor, frames: int = 4, image: bool = False):
    images = [example_image(seed=3, size=(64, 48))] if image else None
    return build_video_inputs(processor, [example_video(seed=1, frames=frames, size=(72, 60))],
                              "What happens in the video?", images=images)


# ---------------------------------------------------------------------------------------------------
# Analytic FLOPs of video prefills against torch's flop counter (eager attention)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family, image", [("llava_onevision", False), ("llava_onevision", True),
                                           ("qwen2_vl", False), ("qwen2_5_vl", False), ("qwen2_5_vl", True),
                                           ("llava_next_video", False), ("video_llava", False)])
@pytest.mark.parametrize("budget", [None, 0.25])
def test_video_prefill_flops_match_flop_counter(family, image, budget):
    """Frames as crops (OneVision pooling after the projector, NeXT-Video before it, Video-LLaVA's own
    video tower), Qwen video grids with temporal patches; pruned: the LLM at the kept counts + ViT scoring."""
    model, processor = _eager(family)
    inputs = _video_prompt(processor, image=image)
    prompt = int(inputs["input_ids"].shape[1])
    census = _VisionCensus(model)
    try:
        if budget is None:
            counted = _counted(lambda: model(**inputs, logits_to_keep=1))
            kv = [prompt] * model.config.text_config.num_hidden_layers
            layer = None
        else:
            with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=budget)) as handle:
                counted = _counted(lambda: model(**inputs, logits_to_keep=1))
                kv = list(handle.stats.kv_tokens_per_layer)
                layer = handle._engine.method.vision_attention_layer
            assert max(kv) < prompt
    finally:
        census.remove()
    work = census.work
    assert work.grid_thw if family.startswith("qwen") else work.crops >= 4  # the frames went through the tower
    assert counted == prefill_flops(model.config, work, kv, scoring_vision_layer=layer)["total"]


# ---------------------------------------------------------------------------------------------------
# Shipped architectures: offline processors carry the real video settings (nothing is built)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, side, video_tokens", [
    ("llava-onevision-0.5b", 384, 16 * 196 + 1),  # 27x27 SigLIP grid pooled to 14x14 per frame, one newline
    ("llava-onevision-7b", 384, 16 * 196 + 1),
    ("qwen2.5-vl-7b", 448, 8 * 256),  # 2 frames per temporal patch, 32x32 patches merged 2x2
    ("qwen2-vl-7b", 448, 8 * 256),
    ("qwen2.5-vl-3b", 448, 8 * 256),
    ("llava-next-video-7b", 336, 16 * 144),  # 24x24 CLIP grid, stride-2 average pooling
])
def test_shipped_architectures_take_videos(name, side, video_tokens):
    config = load_real_config(name)
    processor = offline_processor(config, name)
    inputs = build_video_inputs(processor, [example_video(frames=16, size=(side, side))], "What happens?")
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == video_tokens
    if not name.startswith("qwen"):
        assert tuple(inputs["pixel_values_videos"].shape[-2:]) == (side, side)


def test_llava_next_video_7b_config_and_images():
    assert "llava-next-video-7b" in REAL_MODELS
    config = load_real_config("llava-next-video-7b")
    assert type(config).__name__ == "LlavaNextVideoConfig"
    assert config.spatial_pool_stride == 2 and config.text_config.num_hidden_layers == 32
    processor = offline_processor(config, "llava-next-video-7b")
    frames = get_video_processor(processor)
    assert frames.size == {"shortest_edge": 336} and frames.crop_size == {"height": 336, "width": 336}
    inputs = build_video_inputs(processor, [example_video(frames=2, size=(400, 300))], "Hi",
                                images=[example_image(size=(336, 336))])
    assert int((inputs["input_ids"] == config.video_token_id).sum()) == 2 * 144
    assert int((inputs["input_ids"] == config.image_token_id).sum()) > 576


def test_qwen2_5_vl_3b_is_the_3b_shape():
    from vflowopt.bench.realmodels import _model_class
    from vflowopt.checkpoint import config_parameters

    config = load_real_config("qwen2.5-vl-3b")
    assert config.text_config.num_hidden_layers == 36 and config.vision_config.out_hidden_size == 2048
    assert 3.6e9 < config_parameters(_model_class(config), config) < 3.9e9  # 3.75 B (tied embeddings)


def test_video_settings_come_from_a_model_directory(tmp_path):
    """A real checkpoint's video_preprocessor_config.json wins over the family defaults."""
    model, processor = _eager("llava_onevision")
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 56, "width": 56}, "image_mean": [0.1, 0.2, 0.3], "image_std": [0.4, 0.5, 0.6]}))
    frames = frame_processor_for(processor, model.config, tmp_path)
    assert frames.image_mean == (0.1, 0.2, 0.3) and frames.size == {"height": 56, "width": 56}
    assert frame_processor_for(processor, model.config, None) is get_video_processor(processor)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------


def test_cli_video_records_count_video_tokens(capsys, tmp_path):
    out = tmp_path / "v.json"
    code = main(["bench", "--video-frames", "4", "--methods", "random", "--budgets", "1.0,0.25", "--repeats", "1",
                 "--warmup", "0", "--new-tokens", "1", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "video tokens" in captured.out
    doc = json.loads(out.read_text())
    info = doc["meta"]["inputs"]
    assert info["image_tokens"] == 0 and info["video_tokens"] == 4 * 4 + 1  # 4x4 SigLIP grid pooled to 2x2
    assert "4 frame(s)" in info["video"] and info["prompt"] == "Describe the video in detail."
    ref, full, quarter = doc["records"]
    for r in doc["records"]:
        assert r["error"] is None and r["visual_tokens"] == 16  # the prunable video tokens (newline kept)
    assert quarter["flops_ratio"] < 1 and quarter["mean_retention"] == pytest.approx(0.25)
    assert quarter["kv_cache_bytes"] < full["kv_cache_bytes"] == ref["kv_cache_bytes"]
    assert quarter["tokens_into_llm"] == ref["tokens_into_llm"] - 12


def test_cli_video_beside_pictures(capsys, tmp_path):
    out = tmp_path / "v.json"
    code = main(["bench", "--video-frames", "2", "--num-images", "2", "--methods", "random", "--budgets", "0.5",
                 "--repeats", "1", "--warmup", "1", "--new-tokens", "0", "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    for r in doc["records"]:  # --new-tokens 0: prefills only
        assert r["prefill_ms"] > 0 and r["e2e_ms"] is None and r["token_agreement"] is None and r["new_tokens"] == 0
    info = doc["meta"]["inputs"]
    assert info["image_tokens"] > 0 and info["video_tokens"] == 2 * 4 + 1
    assert doc["records"][1]["visual_tokens"] > 8 and doc["records"][1]["flops_ratio"] < 1


def test_visual_placeholders_count_images_and_videos():
    model, processor = _eager("qwen2_5_vl")
    inputs = _video_prompt(processor, frames=2, image=True)
    ids = inputs["input_ids"][0]
    expected = int((ids == model.config.image_token_id).sum() + (ids == model.config.video_token_id).sum())
    assert visual_placeholders(model, ids) == expected > int((ids == model.config.video_token_id).sum())


@pytest.mark.parametrize("args, message", [
    (["--video-size", "64"], "add --video-frames"),
    (["--video-frames", "4", "--image-size", "64"], "add --num-images"),
    (["--video-frames", "0"], ">= 1"),
    (["--video-frames", "4", "--model", "llava-1.5-7b"], "'llava' model, which takes no videos"),
    (["--video-frames", "4", "--model", "llava-next-7b"], "'llava_next' model, which takes no videos"),
])
def test_cli_bad_video_flags_exit_2_with_one_line(capsys, monkeypatch, args, message):
    import vflowopt.bench.realmodels

    def refuse(*a, **k):
        raise AssertionError("a model was built before the flags were checked")

    monkeypatch.setattr(vflowopt.bench.realmodels, "build_random_model", refuse)
    code = main(["bench", "--methods", "random", "--budgets", "0.5", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_video_on_a_config_only_directory_of_an_image_family(capsys, tmp_path):
    """A model directory is refused from its config.json alone, before any weights are read."""
    from vflowopt.tiny import tiny_llava

    model, _ = tiny_llava()
    model.config.save_pretrained(tmp_path)
    code = main(["bench", "--model", str(tmp_path), "--allow-random", "--video-frames", "2", "--methods", "random"])
    err = capsys.readouterr().err
    assert code == 2 and "takes no videos" in err and len(err.strip().splitlines()) == 1
