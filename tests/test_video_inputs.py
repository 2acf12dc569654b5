"""Video inputs without torchvision (vflowopt.video_inputs) on the tiny models of every video family.

Stock models only (no pruning): placeholders vs the model's own video features, forward + generate on
video-only and mixed image + video prompts, the Qwen patch packing, and the real video processors' rules,
read from the transformers sources (their modules import torchvision, so they are parsed, not imported).
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import VIDEO_FAMILY_BUILDERS
from vflowopt.video_inputs import (
    FAMILY_VIDEO_DEFAULTS,
    VIDEO_FAMILIES,
    VideoFrameProcessor,
    build_video_inputs,
    example_video,
    get_video_processor,
    qwen3_video_smart_resize,
    video_family,
    video_frame_processor,
    video_frame_processor_from_dict,
)

VIDEO_TOKEN_ID = 6
IMAGE_TOKEN_ID = 5
FRAMES = 5  # odd: Qwen pads the last temporal patch
QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on the shared 2-core machine two threads that
    compete with other processes made a forward ~100x slower (measured: 1.5 s vs 16 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _tiny(family: str):
    return VIDEO_FAMILY_BUILDERS[family]()


def _transformers_file(relative: str) -> pathlib.Path:
    spec = importlib.util.find_spec("transformers")
    return pathlib.Path(spec.origin).parent / relative


def _video_rows(model, batch) -> int:
    """Rows of video features the model's own get_video_features produces for ``batch``."""
    extra = {"video_grid_thw": batch["video_grid_thw"]} if "video_grid_thw" in batch else {}
    with torch.no_grad():
        out = model.model.get_video_features(batch["pixel_values_videos"], return_dict=True, **extra)
    pooled = out.pooler_output
    parts = pooled if isinstance(pooled, (list, tuple)) else [pooled]
    hidden = model.config.get_text_config().hidden_size
    return sum(p.numel() for p in parts) // hidden


def _expected_video_tokens(family: str, processor, frames: int, size: tuple[int, int]) -> int:
    """The per-family formula, computed here from the configs (independently of the processor code)."""
    width, height = size
    fp = get_video_processor(processor)
    if family == "llava_onevision":
        side = int(math.sqrt(processor.num_image_tokens))
        return frames * math.ceil(side / 2) ** 2 + 1
    if family == "llava_next_video":
        side = fp.crop_size["height"] // processor.patch_size
        return frames * (side // 2) ** 2
    if family == "video_llava":
        side = fp.crop_size["height"] // processor.patch_size
        return frames * (side * side + 1)  # the CLS of every frame is kept
    factor = fp.patch_size * fp.merge_size
    if family == "qwen3_vl":
        h, w = qwen3_video_smart_resize(frames, height, width, 2, factor, fp.size["shortest_edge"],
                                        fp.size["longest_edge"])
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=factor, min_pixels=fp.size["shortest_edge"],
                            max_pixels=fp.size["longest_edge"])
    return math.ceil(frames / 2) * (h // factor) * (w // factor)


def _frames_used(family: str, frames: int) -> int:
    """Qwen3-VL's real processor samples 2 frames per second of a 24 fps clip, at least 4 (fewer if shorter)."""
    if family != "qwen3_vl":
        return frames
    return min(max(int(frames / 24 * 2), 4), frames)


# --------------------------------------------------------------------------------------------------------------
# example_video
# --------------------------------------------------------------------------------------------------------------


def test_example_video_is_deterministic_and_animated():
    a, b, c = example_video(0), example_video(0), example_video(1)
    assert len(a) == 8 and a[0].size == (80, 120) and a[0].mode == "RGB"
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert all(not np.array_equal(np.asarray(a[t]), np.asarray(a[t + 1])) for t in range(7))
    assert [f.size for f in example_video(2, frames=3, size=(33, 21))] == [(33, 21)] * 3
    with pytest.raises(ValueError, match="at least one frame"):
        example_video(frames=0)


# --------------------------------------------------------------------------------------------------------------
# every family: video-only and mixed prompts on the stock model
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_prompt_matches_model_features_and_generates(family):
    model, processor = _tiny(family)
    assert video_family(processor) == family
    video = example_video(0, frames=FRAMES)
    batch = build_video_inputs(processor, video, "What happens in the video?")

    n_video = int((batch["input_ids"] == VIDEO_TOKEN_ID).sum())
    assert n_video == _expected_video_tokens(family, processor, _frames_used(family, FRAMES), video[0].size)
    assert n_video == _video_rows(model, batch)
    assert int((batch["input_ids"] == IMAGE_TOKEN_ID).sum()) == 0
    assert batch["attention_mask"].shape == batch["input_ids"].shape and bool(batch["attention_mask"].all())
    if family in QWEN:
        assert torch.equal(batch["mm_token_type_ids"] == 2, batch["input_ids"] == VIDEO_TOKEN_ID)
    else:
        assert tuple(batch["pixel_values_videos"].shape[:2]) == (1, FRAMES)

    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    out = model.generate(**batch, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape == (1, batch["input_ids"].shape[1] + 3)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_mixed_image_and_video_prompt(family):
    model, processor = _tiny(family)
    image = example_image(3)
    video = example_video(1, frames=4)
    mixed = build_video_inputs(processor, video, "Compare them.", images=[image])
    alone = build_inputs(processor, [image], ["Compare them."])
    video_only = build_video_inputs(processor, video, "Compare them.")

    # images go through the image processor exactly as for images alone
    image_keys = [k for k in alone if k not in ("input_ids", "attention_mask", "mm_token_type_ids")]
    assert image_keys
    for key in image_keys:
        assert torch.equal(torch.as_tensor(mixed[key]), torch.as_tensor(alone[key])), key
    assert int((mixed["input_ids"] == IMAGE_TOKEN_ID).sum()) == int((alone["input_ids"] == IMAGE_TOKEN_ID).sum())
    n_video = int((mixed["input_ids"] == VIDEO_TOKEN_ID).sum())
    assert n_video == int((video_only["input_ids"] == VIDEO_TOKEN_ID).sum()) == _video_rows(model, mixed)
    assert torch.equal(mixed["pixel_values_videos"], video_only["pixel_values_videos"])

    with torch.no_grad():
        logits = model(**mixed).logits
    assert torch.isfinite(logits).all()
    out = model.generate(**mixed, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert out.shape[1] == mixed["input_ids"].shape[1] + 3


def test_batch_of_prompts_with_and_without_videos():
    model, processor = _tiny("llava_onevision")
    videos = [example_video(0, frames=3), None, [example_video(1, frames=3), example_video(2, frames=3)]]
    batch, texts = build_video_inputs(processor, videos, ["one", "none", "two"], images=[None, example_image(), None],
                                      return_text=True)
    assert [t.count("<video>") for t in texts] == [1, 0, 2]
    per_row = (batch["input_ids"] == VIDEO_TOKEN_ID).sum(1).tolist()
    assert per_row == [3 * 4 + 1, 0, 2 * (3 * 4 + 1)]
    assert batch["attention_mask"][:, -1].all()  # left padding
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


# --------------------------------------------------------------------------------------------------------------
# Qwen: grids, packing, times
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", QWEN)
def test_qwen_grid_matches_pixel_patches_and_pads_odd_frames(family):
    _, processor = _tiny(family)
    fp = get_video_processor(processor)
    video = example_video(4, frames=FRAMES)
    batch = build_video_inputs(processor, video, "x", videos_kwargs={"do_sample_frames": False})
    (t, h, w), = batch["video_grid_thw"].tolist()
    pixels = batch["pixel_values_videos"]
    assert t == math.ceil(FRAMES / 2) and pixels.shape == (t * h * w, 3 * 2 * fp.patch_size ** 2)
    factor = fp.patch_size * fp.merge_size
    if family == "qwen3_vl":
        rh, rw = qwen3_video_smart_resize(FRAMES, 120, 80, 2, factor, fp.size["shortest_edge"], fp.size["longest_edge"])
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        rh, rw = smart_resize(120, 80, factor=factor, min_pixels=fp.size["shortest_edge"],
                              max_pixels=fp.size["longest_edge"])
    assert (h, w) == (rh // fp.patch_size, rw // fp.patch_size)
    # the odd frame count is padded by repeating the last frame: the last temporal patch holds it twice
    last = pixels[(t - 1) * h * w:].reshape(h * w, 3, 2, fp.patch_size, fp.patch_size)
    assert torch.equal(last[:, :, 0], last[:, :, 1])
    first = pixels[: h * w].reshape(h * w, 3, 2, fp.patch_size, fp.patch_size)
    assert not torch.equal(first[:, :, 0], first[:, :, 1])


def test_qwen2_5_second_per_grid_ts_follows_fps():
    _, processor = _tiny("qwen2_5_vl")
    video = example_video(0, frames=4)
    default = build_video_inputs(processor, video, "x")
    assert default["second_per_grid_ts"].tolist() == pytest.approx([2 / 24])  # transformers assumes 24 fps
    assert build_video_inputs(processor, video, "x", fps=4)["second_per_grid_ts"].tolist() == pytest.approx([0.5])


def test_qwen3_timestamps_between_frames():
    model, processor = _tiny("qwen3_vl")
    batch = build_video_inputs(processor, example_video(0, frames=6), "x", fps=2.0,
                               videos_kwargs={"do_sample_frames": False})
    decoded = processor.tokenizer.decode(batch["input_ids"][0])
    # frames 0..5 at 2 fps, each temporal patch stamped with its two frames' mean time: 0.25, 1.25, 2.25 s
    stamps = [decoded.index(f"<{t:.1f} seconds>") for t in (0.25, 1.25, 2.25)]
    assert stamps == sorted(stamps) and decoded.count(" seconds>") == 3
    assert decoded.count(processor.vision_start_token) == 3 and decoded.count(processor.vision_end_token) == 3
    assert int((batch["input_ids"] == VIDEO_TOKEN_ID).sum()) == _video_rows(model, batch)
    # Qwen3-VL's real default samples 2 frames per second (24 fps assumed): 6 frames -> 4
    assert build_video_inputs(processor, example_video(0, frames=6), "x")["video_grid_thw"][0, 0].item() == 2


# --------------------------------------------------------------------------------------------------------------
# bad input: one clear line
# --------------------------------------------------------------------------------------------------------------


def _one_line_error(processor, videos, match, **kw):
    with pytest.raises(ValueError, match=match) as info:
        build_video_inputs(processor, videos, "x", **kw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["llava_onevision", "qwen2_5_vl"])
def test_bad_videos_raise_one_line(family):
    _, processor = _tiny(family)
    frames = example_video(0, frames=3)
    _one_line_error(processor, frames + [example_image(0, size=(64, 64))], "frame 3 is 64x64 but frame 0 is 80x120")
    _one_line_error(processor, [], "has no frames")
    _one_line_error(processor, [frames, []], "video 1 has no frames")
    _one_line_error(processor, [frames[0], "frame.png"], "frame 1 has unsupported type str")
    _one_line_error(processor, [Image.new("RGB", (0, 0))], "frame 0 is empty")
    _one_line_error(processor, np.zeros((2, 8, 8, 3), dtype=np.float32), "float32 array")
    _one_line_error(processor, 42, "unsupported type int|must be a video")
    with pytest.raises(ValueError, match="got 2 video entries for 3 prompts"):
        build_video_inputs(processor, [frames, frames], ["a", "b", "c"])
    with pytest.raises(ValueError, match="at least one video"):
        build_video_inputs(processor, None, "x")
    if family == "llava_onevision":
        _one_line_error(processor, [frames, frames[:2]], "need the same number of frames; got 3, 2")
    else:  # Qwen concatenates patches, so videos of a call may differ in length
        build_video_inputs(processor, [frames, frames[:2]], "x")


def test_qwen3_single_frame_and_unsupported_processor():
    _, processor = _tiny("qwen3_vl")
    _one_line_error(processor, example_video(0, frames=1), "at least 2 frames",
                    videos_kwargs={"do_sample_frames": False})
    from vflowopt.tiny import tiny_llava

    with pytest.raises(ValueError, match="videos are not supported for LlavaProcessor"):
        build_video_inputs(tiny_llava()[1], example_video(0, frames=2), "x")


def test_caller_processor_is_untouched_and_images_unchanged():
    _, processor = _tiny("qwen2_vl")
    before = build_inputs(processor, [example_image()], ["x"])
    build_video_inputs(processor, example_video(0, frames=2), "x")
    assert processor.video_processor is None
    after = build_inputs(processor, [example_image()], ["x"])
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "vflowopt_video_processor" not in processor.to_dict()


# --------------------------------------------------------------------------------------------------------------
# the real video processors' rules, read from the transformers sources
# --------------------------------------------------------------------------------------------------------------

_VIDEO_PROCESSOR_SOURCES = {
    "llava_onevision": ("models/llava_onevision/video_processing_llava_onevision.py", "LlavaOnevisionVideoProcessor"),
    "qwen2_vl": ("models/qwen2_vl/video_processing_qwen2_vl.py", "Qwen2VLVideoProcessor"),
    "qwen2_5_vl": ("models/qwen2_vl/video_processing_qwen2_vl.py", "Qwen2VLVideoProcessor"),
    "qwen3_vl": ("models/qwen3_vl/video_processing_qwen3_vl.py", "Qwen3VLVideoProcessor"),
    "llava_next_video": ("models/llava_next_video/video_processing_llava_next_video.py",
                         "LlavaNextVideoVideoProcessor"),
    "video_llava": ("models/video_llava/video_processing_video_llava.py", "VideoLlavaVideoProcessor"),
}


def _class_defaults(relative: str, class_name: str) -> dict:
    import transformers.image_utils as image_utils

    tree = ast.parse(_transformers_file(relative).read_text())
    namespace = {name: getattr(image_utils, name) for name in dir(image_utils) if name.isupper() or name[0].isupper()}
    cls = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == class_name)
    values = {}
    for node in cls.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(NameError):  # names from elsewhere (kwargs classes) are not needed
                values[node.targets[0].id] = eval(compile(ast.Expression(node.value), relative, "eval"), namespace)
    return values


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_family_defaults_match_transformers_video_processors(family):
    real = _class_defaults(*_VIDEO_PROCESSOR_SOURCES[family])
    ours = video_frame_processor(family)
    assert ours.size == real["size"]
    assert list(ours.image_mean) == pytest.approx(list(real["image_mean"]))
    assert list(ours.image_std) == pytest.approx(list(real["image_std"]))
    assert ours.resample == int(real["resample"])
    assert ours.do_center_crop == bool(real.get("do_center_crop"))
    assert ours.crop_size == real.get("crop_size")
    assert ours.do_sample_frames == bool(real.get("do_sample_frames"))
    for name in ("patch_size", "temporal_patch_size", "merge_size", "fps", "min_frames", "max_frames"):
        if name in real:
            assert getattr(ours, name) == real[name], name
    assert set(FAMILY_VIDEO_DEFAULTS) == set(VIDEO_FAMILIES)


def test_checkpoint_video_config_overrides_defaults():
    # the fields of a Qwen2-VL-style video_preprocessor_config.json (legacy min/max_pixels) and a OneVision one
    qwen = video_frame_processor_from_dict("qwen2_5_vl", {"min_pixels": 3136, "max_pixels": 12845056,
                                                          "processor_class": "Qwen2_5_VLProcessor", "patch_size": 14})
    assert qwen.size == {"shortest_edge": 3136, "longest_edge": 12845056} and qwen.kind == "qwen2"
    onevision = video_frame_processor_from_dict("llava_onevision", {"image_mean": [0.5] * 3, "image_std": [0.5] * 3,
                                                                    "size": {"height": 384, "width": 384}})
    assert onevision.image_mean == (0.5, 0.5, 0.5) and onevision.resample == 3
    crop = video_frame_processor_from_dict("video_llava", {"crop_size": 224})
    assert crop.crop_size == {"height": 224, "width": 224}


def _source_function(relative: str, name: str, class_name: str | None = None):
    """Compile one function (or method) of a transformers module that cannot be imported here."""
    tree = ast.parse(_transformers_file(relative).read_text())
    body = tree.body
    if class_name:
        body = next(n for n in body if isinstance(n, ast.ClassDef) and n.name == class_name).body
    node = next(n for n in body if isinstance(n, ast.FunctionDef) and n.name == name)
    node.decorator_list = []
    namespace = {"math": math, "torch": torch}
    exec(compile(ast.Module(body=[node], type_ignores=[]), relative, "exec"), namespace)
    return namespace[name]


def test_resize_rules_match_transformers_sources():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    qwen2_video = _source_function("models/qwen2_vl/video_processing_qwen2_vl.py", "smart_resize")
    qwen3_video = _source_function("models/qwen3_vl/video_processing_qwen3_vl.py", "smart_resize")
    for height in (20, 56, 120, 333, 1080):
        for width in (28, 80, 200, 1920):
            for bounds in ((56 * 56, 28 * 28 * 64), (128 * 28 * 28, 28 * 28 * 768)):
                assert smart_resize(height, width, 28, *bounds) == qwen2_video(height, width, 28, *bounds)
            for frames in (2, 5, 16):
                for bounds in ((4 * 32 * 32, 16 * 64 * 32 * 32), (128 * 32 * 32, 32 * 32 * 768)):
                    ours = qwen3_video_smart_resize(frames, height, width, 2, 32, *bounds)
                    assert ours == qwen3_video(frames, height, width, temporal_factor=2, factor=32,
                                               min_pixels=bounds[0], max_pixels=bounds[1])


@pytest.mark.parametrize("frames", [4, 5])
def test_patch_packing_matches_transformers_patchify(frames):
    patchify = _source_function("models/qwen2_vl/video_processing_qwen2_vl.py", "patchify", "Qwen2VLVideoProcessor")
    fp = VideoFrameProcessor(kind="qwen2", size={"shortest_edge": 1, "longest_edge": 1}, image_mean=(0.5,) * 3,
                             image_std=(0.5,) * 3, patch_size=14)
    video = torch.randn(frames, 3, 56, 84, generator=torch.Generator().manual_seed(frames))
    ours, grid = fp._patchify(video)
    theirs, *their_grid = patchify(None, video[None], patch_size=14, merge_size=2, temporal_patch_size=2)
    assert grid == their_grid and torch.equal(ours, theirs[0])


def test_processor_text_expansion_is_the_real_processors():
    """The placeholder text comes from the real processor class (replace_video_token), not from vflowopt."""
    _, processor = _tiny("llava_onevision")
    batch = build_video_inputs(processor, example_video(0, frames=3), "x")
    expected = processor._get_num_multimodal_tokens(video_sizes=[(3, 56, 56)])["num_video_tokens"]
    assert [int((batch["input_ids"] == VIDEO_TOKEN_ID).sum())] == list(expected)


# --------------------------------------------------------------------------------------------------------------
# where torchvision works: the whole BatchFeature equals the real processor + real video processor
# --------------------------------------------------------------------------------------------------------------

_REAL_VIDEO_PROCESSORS = {
    "llava_onevision": "LlavaOnevisionVideoProcessor",
    "qwen2_vl": "Qwen2VLVideoProcessor",
    "qwen2_5_vl": "Qwen2VLVideoProcessor",
    "qwen3_vl": "Qwen3VLVideoProcessor",
    "llava_next_video": "LlavaNextVideoVideoProcessor",
    "video_llava": "VideoLlavaVideoProcessor",
}


def _real_video_processor(family: str, fp: VideoFrameProcessor):
    """The transformers video processor with the settings of ``fp``, or a skip where torchvision is unusable."""
    try:
        import torchvision  # noqa: F401
        import transformers

        cls = getattr(transformers, _REAL_VIDEO_PROCESSORS[family])
        settings = {"size": dict(fp.size), "image_mean": list(fp.image_mean), "image_std": list(fp.image_std),
                    "resample": fp.resample, "do_sample_frames": fp.do_sample_frames}
        if fp.kind == "resize":
            settings.update(do_center_crop=fp.do_center_crop, crop_size=fp.crop_size)
        else:
            settings.update(patch_size=fp.patch_size, temporal_patch_size=fp.temporal_patch_size,
                            merge_size=fp.merge_size, cap_pixels_per_frame=False)
            if fp.kind == "qwen3":
                settings.update(fps=fp.fps, min_frames=fp.min_frames, max_frames=fp.max_frames)
        return cls(**settings)
    except Exception as error:  # ImportError, or a torchvision build that does not load with this torch
        pytest.skip(f"no working torchvision ({type(error).__name__}): {str(error).splitlines()[0][:80]}")


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
@pytest.mark.parametrize("frames", [2, 5])
def test_equals_real_video_processor_where_torchvision_works(family, frames):
    _, processor = _tiny(family)
    real = _real_video_processor(family, get_video_processor(processor))
    video, image = example_video(5, frames=frames, size=(150, 90)), example_image(1)
    ours, texts = build_video_inputs(processor, video, "x", images=[image], fps=12, return_text=True)
    with_real = copy.copy(processor)
    with_real.video_processor = real
    theirs = with_real(images=[[image]], text=texts, videos=[video], return_tensors="pt", padding=True,
                       padding_side="left", videos_kwargs={"video_metadata": [
                           {"total_num_frames": frames, "fps": 12.0, "frames_indices": list(range(frames))}]})
    assert set(ours.keys()) == set(theirs.keys())
    for key in theirs:
        assert torch.equal(torch.as_tensor(ours[key]), torch.as_tensor(theirs[key])), key
