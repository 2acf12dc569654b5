"""vflowopt.visualize.kept_tokens and `vflowopt show`: kept cells show the picture, dropped ones are darkened."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from PIL import Image

import vflowopt
from vflowopt import tiny_families
from vflowopt.cli import main
from vflowopt.tiny import build_inputs, tiny_llava, tiny_llava_onevision
from vflowopt.visualize import DROPPED_SHADE, kept_tokens

pytest.importorskip("matplotlib")

BUILDERS = {
    "llava": tiny_llava, "llava_next": tiny_families.tiny_llava_next, "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_families.tiny_qwen2_vl, "qwen2_5_vl": tiny_families.tiny_qwen2_5_vl,
    "qwen3_vl": tiny_families.tiny_qwen3_vl,
}
GREY = 230


@functools.cache
def _model(family: str):
    return BUILDERS[family]()


def _pixels(fig) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


def _at(fig, pixels: np.ndarray, ax, x: float, y: float) -> np.ndarray:
    """The figure's pixel at data point (x, y) of `ax` (display origin is the bottom-left)."""
    dx, dy = ax.transData.transform((x, y))
    return pixels[int(round(pixels.shape[0] - dy)), int(round(dx))].astype(int)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_kept_cells_show_the_picture_and_dropped_ones_are_dark(family):
    model, processor = _model(family)
    image = Image.new("RGB", (80, 120), (GREY, GREY, GREY))
    inputs = build_inputs(processor, [image], ["What is in the image?"])
    with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=0.25)) as handle:
        fig = kept_tokens(handle, image, inputs)
        kept = handle.stats.kept
        stages = [name for name, _ in handle.stats.stages]
    assert [name for name, _ in kept.stages] == stages == ["before LLM", "layer 2", "layer 4"]
    tokens = kept.layout.tokens
    grids = tokens.grid[0].unique().tolist()
    assert grids == ([0, 1] if family in ("llava_next", "llava_onevision") else [0])
    columns = len(stages) + 3  # + importance, entropy, K
    assert len(fig.axes) == columns * len(grids)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[3].startswith("importance map") and titles[4].startswith("entropy map")
    assert titles[5].startswith("K")
    pixels = _pixels(fig)
    checked = {True: 0, False: 0}
    for row, grid in enumerate(grids):
        for col, (name, mask) in enumerate(kept.stages):
            ax = fig.axes[row * columns + col]
            sel = ((tokens.grid[0] == grid) & tokens.prunable[0]).nonzero().squeeze(-1)
            region = tokens.region[0][sel].float()
            sy, sx = image.height / float(region[:, 2].max()), image.width / float(region[:, 3].max())
            keep = mask[sel]  # one grid of an anyres image may keep nothing: the budget is per image
            assert titles[row * columns + col].startswith(f"{name}: {int(keep.sum())}/{len(sel)} kept")
            for which, expect_bright in ((keep, True), (~keep, False)):
                if not bool(which.any()):
                    continue
                checked[expect_bright] += 1
                y0, x0, y1, x1 = region[int(which.nonzero()[0])].tolist()
                value = _at(fig, pixels, ax, (x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy)
                if expect_bright:
                    assert (abs(value - GREY) <= 3).all(), (family, name, value)
                else:
                    assert (abs(value - GREY * (1 - DROPPED_SHADE)) <= 6).all(), (family, name, value)
    assert checked[True] >= len(stages) and checked[False] >= len(stages)


def test_other_methods_and_last_prefill_without_inputs(make_model):
    model, processor = make_model("llava")
    image = Image.new("RGB", (80, 120), (GREY, GREY, GREY))
    inputs = build_inputs(processor, [image], ["What is in the image?"])
    with vflowopt.pruned(model, vflowopt.config_for("visionzip", budget=0.25)) as handle:
        model(**inputs)
        fig = kept_tokens(handle, image)  # the last prefill's record
        assert [ax.get_title().split(":")[0] for ax in fig.axes] == ["before LLM"]
        assert "merged" in fig.axes[0].get_title()  # VisionZip's contextual tokens
        with pytest.raises(vflowopt.ConfigError, match="image"):
            kept_tokens(handle, [image, image])
    with vflowopt.pruned(model, vflowopt.config_for("flowcut", budget=0.25)) as handle:  # prunes in the ViT
        fig = kept_tokens(handle, image, inputs)
        names = [name for name, _ in handle.stats.stages]
    assert names[:2] == ["vision encoder", "before LLM"]
    assert [ax.get_title().split(":")[0] for ax in fig.axes] == names
    batch = build_inputs(processor, [image, image], ["a", "b"])
    with vflowopt.pruned(model, vflowopt.config_for("random", budget=0.5)) as handle:
        model(**batch)
        assert handle.stats.kept is None  # recorded for batch size 1 only
        with pytest.raises(vflowopt.ConfigError, match="batch size"):
            kept_tokens(handle, image)


def test_cli_show_writes_a_png(tmp_path, capsys):
    out = tmp_path / "kept.png"
    assert main(["show", "--method", "vflowopt", "--budget", "0.25", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed and "importance map" in printed and "layer" in printed
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 300


@pytest.mark.parametrize("make_args, message", [
    (lambda d: ["--image", str(d / "clip.mp4"), "--prompt", "x"], "is a video file"),
    (lambda d: ["--image", str(d / "anim.gif"), "--prompt", "x"], "animated image (2 frames); pass it as --video"),
    (lambda d: ["--image", str(d / "still.png")], "--prompt is required"),
    (lambda d: ["--budget", "1.5"], "(0, 1]"),
    (lambda d: ["--method", "nope"], "unknown method"),
])
def test_cli_show_bad_input_is_one_line(tmp_path, capsys, make_args, message):
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "still.png")
    out = tmp_path / "kept.png"
    code = main(["show", *make_args(tmp_path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_cli_show_needs_out_and_a_writable_file(tmp_path, capsys):
    assert main(["show"]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["show", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
