"""Videos in vflowopt.visualize.kept_tokens and `vflowopt show --video`: a strip of frames per video, kept
cells show the frame, dropped ones are darkened; bad frame inputs are one line and exit 2."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vflowopt
from vflowopt import tiny_families
from vflowopt.cli import main
from vflowopt.tiny import example_image, tiny_llava_onevision
from vflowopt.video_inputs import build_video_inputs, example_video
from vflowopt.visualize import DROPPED_SHADE, WASHED_OUT, kept_tokens, save_kept_tokens

pytest.importorskip("matplotlib")

BUILDERS = {"llava_onevision": tiny_llava_onevision, "qwen2_5_vl": tiny_families.tiny_qwen2_5_vl,
            "video_llava": tiny_families.tiny_video_llava}
GREY = 230
FRAMES = 4
SIZE = (120, 80)  # wider than high: Video-LLaVA's centre crop is the middle 80x80 of each frame
_MODELS: list = []


@functools.cache
def _model(family: str):
    pair = BUILDERS[family]()
    _MODELS.append(pair[0])
    return pair


@pytest.fixture(autouse=True)
def _unprune_models():
    yield
    for model in _MODELS:
        vflowopt.unprune(model)


def _grey_video(frames: int = FRAMES) -> list[Image.Image]:
    return [Image.new("RGB", SIZE, (GREY, GREY, GREY)) for _ in range(frames)]


def _pixels(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _at(pixels: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The figure's pixel at data point (x, y) of `ax` (display origin is the bottom-left)."""
    dx, dy = ax.transData.transform((x, y))
    return pixels[int(round(pixels.shape[0] - dy)), int(round(dx))].astype(int)


def _check_strip(fig, pixels, axes, kept, family: str, columns: int) -> dict:
    """For every stage row and drawn frame: one kept cell shows the grey frame, one dropped cell is dark."""
    tokens = kept.layout.tokens
    video = (tokens.video[0] & tokens.prunable[0]).nonzero().squeeze(-1)
    region = tokens.region[0][video].float()
    canvas_h, canvas_w = float(region[:, 2].max()), float(region[:, 3].max())
    bx, bw = (20.0, 80.0) if family == "video_llava" else (0.0, float(SIZE[0]))  # centre crop: the middle 80 px
    sx, sy = bw / canvas_w, SIZE[1] / canvas_h
    groups = sorted(tokens.frame[0][video].unique().tolist())
    assert len(axes) == columns * len(groups)
    checked = {True: 0, False: 0}
    for r, (name, mask) in enumerate(kept.stages):
        for c, group in enumerate(groups):
            ax = axes[r * len(groups) + c]
            sel = video[tokens.frame[0][video] == group]
            keep = mask[sel]
            assert ax.get_title().startswith(f"{name}: {int(keep.sum())}/{len(sel)} kept")
            for which, bright in ((keep, True), (~keep, False)):
                if not bool(which.any()):
                    continue
                checked[bright] += 1
                y0, x0, y1, x1 = tokens.region[0][sel[int(which.nonzero()[0])]].float().tolist()
                value = _at(pixels, ax, bx + (x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy)
                expected = GREY if bright else GREY * (1 - DROPPED_SHADE)
                assert (abs(value - expected) <= 6).all(), (family, name, group, bright, value)
        if family == "video_llava":  # outside the crop: washed out towards white, not darkened
            value = _at(pixels, axes[r * len(groups)], 5.0, 40.0)
            assert (abs(value - (GREY + (255 - GREY) * WASHED_OUT)) <= 4).all(), value
    return checked


@pytest.mark.parametrize("family", list(BUILDERS))
def test_video_strip_kept_cells_show_the_frame_and_dropped_ones_are_dark(family):
    model, processor = _model(family)
    frames = _grey_video()
    inputs = build_video_inputs(processor, [frames], ["What happens in the video?"])
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.25)) as handle:
        model.generate(**inputs, max_new_tokens=1)  # the record of generate()'s prefill, drawn without inputs
        plain = kept_tokens(handle, None, video=frames)
        fig = kept_tokens(handle, None, inputs, video=frames)  # one more prefill: entropy and K too
        kept = handle.stats.kept
    stages = [name for name, _ in kept.stages]
    assert stages == ["before LLM", "layer 2", "layer 4"]
    groups = FRAMES // 2 if family.startswith("qwen") else FRAMES
    assert len(plain.axes) == (len(stages) + 1) * groups  # + importance
    assert len(fig.axes) == (len(stages) + 3) * groups  # + importance, entropy, K
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].endswith("frames 0-1 (shows 0)" if family.startswith("qwen") else "frame 0")
    assert [t.split("\n")[0] for t in titles[3 * groups::groups]][:2] == ["importance map", "entropy map"]
    assert titles[5 * groups].startswith("K")
    checked = _check_strip(fig, _pixels(fig), fig.axes, kept, family, len(stages) + 3)
    assert checked[True] >= len(stages) and checked[False] >= len(stages)


def test_mixed_prompt_draws_the_image_rows_and_the_video_strip(tmp_path):
    model, processor = _model("llava_onevision")
    image = Image.new("RGB", (80, 120), (GREY, GREY, GREY))
    frames = _grey_video()
    inputs = build_video_inputs(processor, [frames], ["What is shown?"], images=[[image]])
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.25)) as handle:
        fig = kept_tokens(handle, image, inputs, video=frames)
        kept = handle.stats.kept
        lines = save_kept_tokens(handle, image, str(tmp_path / "mixed.png"), video=frames)  # the same prefill
        with pytest.raises(vflowopt.ConfigError, match="video"):
            kept_tokens(handle, image)  # the prompt had a video
        with pytest.raises(vflowopt.ConfigError, match="image"):
            kept_tokens(handle, None, video=frames)
    columns = len(kept.stages) + 3
    image_axes, strip_axes = fig.axes[:2 * columns], fig.axes[2 * columns:]  # base grid + anyres crops rows
    assert all(ax.get_title().endswith(("base grid", "anyres crops")) for ax in image_axes)
    pixels = _pixels(fig)
    checked = _check_strip(fig, pixels, strip_axes, kept, "llava_onevision", columns)
    assert checked[True] and checked[False]
    tokens = kept.layout.tokens  # and one image panel: the base grid, as the image tests check it
    sel = ((tokens.grid[0] == 0) & ~tokens.video[0] & tokens.prunable[0]).nonzero().squeeze(-1)
    region = tokens.region[0][sel].float()
    sy, sx = image.height / float(region[:, 2].max()), image.width / float(region[:, 3].max())
    keep = kept.stages[0][1][sel]
    for which, expected in ((keep, GREY), (~keep, GREY * (1 - DROPPED_SHADE))):
        y0, x0, y1, x1 = region[int(which.nonzero()[0])].tolist()
        assert (abs(_at(pixels, image_axes[0], (x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy) - expected) <= 6).all()
    assert any(line.startswith("video 0: 4 frames given") for line in lines)
    assert "video 0, before LLM" in " ".join(lines) and "base grid" in " ".join(lines)
    with Image.open(tmp_path / "mixed.png") as im:
        assert im.format == "PNG"


def test_two_videos_per_frame_scope_and_max_frames():
    model, processor = _model("llava_onevision")
    videos = [example_video(seed=s, frames=10, size=SIZE) for s in (0, 1)]
    inputs = build_video_inputs(processor, videos, ["Which video moves more?"])
    config = vflowopt.VFlowOptConfig(budget=0.5, video_scope="frame")  # a unit per frame: runs told apart by frame
    with vflowopt.pruned(model, config) as handle:
        model(**inputs)
        fig = kept_tokens(handle, None, video=videos, max_frames=3)
        with pytest.raises(vflowopt.ConfigError, match="2 video"):
            kept_tokens(handle, None, video=videos[0])
    titles = [ax.get_title() for ax in fig.axes]
    assert len(titles) == 2 * 4 * 3  # two strips of (3 stages + importance) rows x 3 frames
    assert [t.split("\n")[1] for t in titles[:3]] == ["frame 0", "frame 4", "frame 9"]  # evenly, ends included
    assert sum("video 1:" in t.get_text() for sub in fig.subfigs for t in sub.texts) == 1


def _save_model_dir(folder, family: str = "llava_onevision") -> None:
    """A tiny model directory as a checkpoint has it, with its video settings (video_preprocessor_config.json)."""
    model, processor = _model(family)
    model.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": processor.num_image_tokens,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "vision_aspect_ratio": processor.vision_aspect_ratio,
        "chat_template": processor.chat_template,
    }))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"height": 56, "width": 56}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))


@pytest.fixture(scope="module")
def video_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_onevision")
    _save_model_dir(folder)
    return folder


def test_cli_show_video_from_a_frame_directory_and_an_animated_gif(tmp_path, capsys, video_model_dir):
    frames = example_video(seed=2, frames=12, size=SIZE)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, frame in enumerate(frames):
        frame.save(folder / f"{i:04d}.png")
    (folder / ".DS_Store").write_bytes(b"\x00")  # hidden files are not frames
    out = tmp_path / "dir.png"
    assert main(["show", "--model", str(video_model_dir), "--video", str(folder), "--frames", "5",
                 "--prompt", "What moves?", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "5 of 12 frames (source frames 0, 3, 6, 8, 11" in printed
    assert f"wrote {out}: video: 5 frames given" in printed and "video, layer 4:" in printed
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 300

    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    image = tmp_path / "still.png"
    example_image(seed=1).save(image)
    out = tmp_path / "gif.png"
    assert main(["show", "--model", str(video_model_dir), "--video", str(gif), "--image", str(image),
                 "--frames", "3", "--prompt", "What moves?", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3 of 12 frames (source frames 0, 6, 11" in printed
    assert "base grid" in printed and "video 0, before LLM" in printed
    with Image.open(out) as im:
        assert im.format == "PNG"


def test_cli_show_video_settings_that_do_not_fit_the_model_are_one_line(tmp_path, capsys, video_model_dir):
    """Without video_preprocessor_config.json the family's default frame size (384 px) is used; the tiny
    tower takes 56 px: the model fails, and says so in one line (exit 1)."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(video_model_dir, folder)
    (folder / "video_preprocessor_config.json").unlink()
    gif = tmp_path / "clip.gif"
    frames = example_video(frames=2, size=SIZE)
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    out = tmp_path / "kept.png"
    code = main(["show", "--model", str(folder), "--video", str(gif), "--prompt", "x", "--out", str(out)])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the loading bar: the model loaded, then failed
    assert code == 1 and last.startswith("vflowopt: error: the model could not run this prompt")
    assert "video_preprocessor_config.json" in last and "Traceback" not in err
    assert not out.exists()


def _bad_inputs(d):
    """(name, the argument list, the message) of every bad --video input; `d` holds the files."""
    model = ["--model", str(d / "model")]
    return [
        ("mp4", [*model, "--video", str(d / "clip.mp4")], "extract its frames"),
        ("missing", [*model, "--video", str(d / "nowhere")], "not found"),
        ("empty", [*model, "--video", str(d / "empty")], "holds no frames"),
        ("sizes", [*model, "--video", str(d / "sizes")], "must have the same size"),
        ("text", [*model, "--video", str(d / "text")], "not an image Pillow can read"),
        ("subdir", [*model, "--video", str(d / "nested")], "not a file"),
        ("still", [*model, "--video", str(d / "still.png")], "still image (one frame)"),
        ("no model", ["--video", str(d / "good")], "--video needs --model"),
        ("no prompt", [*model, "--video", str(d / "good")], "--prompt is required with --video"),
        ("frames 0", [*model, "--video", str(d / "good"), "--frames", "0"], "whole number >= 1"),
        ("frames alone", ["--frames", "3"], "--frames applies to --video"),
        ("image model", ["--model", str(d / "llava"), "--video", str(d / "good")], "takes no videos"),
        ("mp4 image", [*model, "--video", str(d / "good"), "--image", str(d / "clip.mp4")], "is a video file"),
    ]


@pytest.mark.parametrize("case", [c[0] for c in _bad_inputs(Path("."))])
def test_cli_show_bad_video_input_is_one_line(tmp_path, capsys, case):
    d = tmp_path
    (d / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    for name in ("empty", "sizes", "text", "nested", "good", "model", "llava"):
        (d / name).mkdir()
    Image.new("RGB", (8, 8)).save(d / "sizes" / "a.png")
    Image.new("RGB", (9, 8)).save(d / "sizes" / "b.png")
    Image.new("RGB", (8, 8)).save(d / "text" / "a.png")
    (d / "text" / "notes.txt").write_text("not a frame")
    (d / "nested" / "inner").mkdir()
    Image.new("RGB", (8, 8)).save(d / "still.png")
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(d / "good" / f"{i}.png")
    # config.json only: every bad input is refused before any weights are looked for
    (d / "model" / "config.json").write_text(json.dumps({"model_type": "llava_onevision"}))
    (d / "llava" / "config.json").write_text(json.dumps({"model_type": "llava"}))
    _, args, message = next(c for c in _bad_inputs(d) if c[0] == case)
    prompt = [] if case == "no prompt" else ["--prompt", "What moves?"]
    out = d / "kept.png"
    code = main(["show", *args, *prompt, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
