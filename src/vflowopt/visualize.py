"""Pictures of what pruning kept: `kept_tokens(handle, image, video=frames)` returns a matplotlib figure.

Images: one row per token grid of each image (LLaVA-1.5 and Qwen-VL: one grid; LLaVA-NeXT / OneVision: the
base grid and the anyres crop grid, both drawn over the whole original picture), one panel per stage of the
last prefill ("vision encoder" when the method prunes there, "before LLM", each in-LLM stage). In a panel
the kept tokens show the picture as it is, dropped ones are darkened, and kept tokens that carry
recycled or merged features are outlined. A token is drawn at its pixel region (`TokenLayout`: CLIP
patches, Qwen merge groups of 28 px, 32 px for Qwen3-VL) scaled from the processor's canvas of its grid
onto the original picture.

Videos (`video=`: the PIL frames given to the processor; a list of such lists for several videos): each
video is a strip, one row per stage and one column per drawn frame (at most `max_frames`, evenly chosen
over the video; the titles say which), drawn like the image panels: each frame picture with its own
tokens kept, dropped or outlined. Qwen-VL tokens cover a temporal group of 2 frames: a panel draws the
group's first frame and its title names both. LLaVA-NeXT-Video and Video-LLaVA see a centre crop of each
frame: the token cells cover that crop and the rest of the frame is washed out. A prompt with images and
videos gets the image rows first, then one strip per video.

For VFlowOpt, three more panels per image row (per video: three more rows): the importance map I it ranked
tokens by, the patch-entropy map and the calibration set K (the tokens receiving more than t times the mean
attention), per token. The entropy and K need the vision pass itself: pass the processor output as `inputs`,
and `kept_tokens` runs one prefill (`model(**inputs)`) with the handle attached and records them (a prompt
with images and videos: both vision passes, joined as the runtime joins them); without `inputs` it draws the
handle's last prefill (importance only). The record exists for prefills of batch size 1 (`PruneStats.kept`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import ConfigError
from .models.base import join_vit_maps

DROPPED_SHADE = 0.72  # opacity of the dark veil over dropped tokens
MERGED_COLOUR = "#ff8c00"
K_COLOUR = "#e0202a"
WASHED_OUT = 0.6  # opacity of the white veil over the parts of a frame the model does not see (centre crop)
MAX_FRAMES = 8  # frames drawn per video by default
TITLE_BAND = 0.42  # inches above a panel for its two-line title


def _as_images(image) -> list:
    if image is None:
        return []
    return list(image) if isinstance(image, (list, tuple)) else [image]


@contextlib.contextmanager
def _vflowopt_signals(handle):
    """While open, records VFlowOpt's ViT-level patch entropy and calibration set K of each vision pass."""
    from .methods.vflowopt import VFlowOptMethod, calibrated_attention, calibration_set

    method = handle.method
    got: dict[str, Any] = {}
    if not isinstance(method, VFlowOptMethod):
        yield got
        return
    adapter, cfg = method.adapter, handle.config
    skip = adapter.vit_prefix_tokens
    entropies: list = []  # one per vision pass (a prompt with images and videos runs two)

    def on_pixels(module, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        if pixel_values is not None:  # the runtime's own pre-hook ran first: the adapter describes this pass
            entropies.append(adapter.patch_entropy(pixel_values, cfg.image_mean, cfg.image_std))

    original = method.on_vision_attention

    def on_attention(probs):  # the runtime hands over every pass of the prompt, already joined
        rows = [probs] if torch.is_tensor(probs) else [p[None] for p in probs]
        k = [calibration_set(p.float(), cfg.threshold)[0][:, skip:].float() for p in rows]
        a = [calibrated_attention(p.float(), cfg.threshold, cfg.calibration)[:, skip:] for p in rows]
        got["K"] = k[0] if torch.is_tensor(probs) else [x[0] for x in k]
        got["attention"] = a[0] if torch.is_tensor(probs) else [x[0] for x in a]
        return original(probs)

    towers = list({id(t): t for t in getattr(adapter, "vision_towers", [adapter.vision_tower])}.values())
    hooks = [t.register_forward_pre_hook(on_pixels, with_kwargs=True) for t in towers]
    method.on_vision_attention = on_attention
    try:
        yield got
    finally:
        for hook in hooks:
            hook.remove()
        del method.on_vision_attention  # the instance attribute; the class's method shows again
        joined = join_vit_maps(entropies)
        if joined is not None:
            got["entropy"] = joined


def _panels_data(handle, inputs: Mapping | None):
    """(KeptTokens record, {map name: (Nv,) tensor}) for the last prefill (run one when inputs are given)."""
    maps: dict[str, torch.Tensor] = {}
    if inputs is not None:
        if int(inputs["input_ids"].shape[0]) != 1:
            raise ConfigError(f"kept_tokens draws one sample; inputs have batch size {inputs['input_ids'].shape[0]}")
        with _vflowopt_signals(handle) as got, torch.inference_mode():
            handle.model(**inputs, logits_to_keep=1, use_cache=False)
        kept = handle.stats.kept
        if kept is not None:
            for name, label in (("entropy", "entropy"), ("K", "calibration set K")):
                if name in got:
                    maps[label] = kept.layout.pack(got[name])[0]
    kept = handle.stats.kept
    if kept is None:
        raise ConfigError(
            "no record of kept tokens: the handle's last prefill had no image tokens or a batch size above 1 "
            "(kept_tokens draws one sample; pass its processor output as inputs)"
        )
    if "importance" in kept.maps:
        maps = {"importance": kept.maps["importance"], **maps}
    return kept, maps


def kept_tokens(handle, image, inputs: Mapping | None = None, *, video=None, panel_size: float = 3.0,
                max_frames: int = MAX_FRAMES):
    """The figure of what `handle` kept in its last prefill (or in one it runs on `inputs`); see the module doc.

    `image`: the PIL picture given to the processor (a list for a multi-image prompt, in prompt order; None
    or [] for a prompt with videos only). `video`: the PIL frames of the prompt's video as given to the
    processor (a list of such lists for several videos). Raises ConfigError when there is nothing to draw
    (no prefill of batch size 1 recorded, or other pictures or videos than the prompt had)."""
    return _render(handle, image, inputs, video, panel_size, max_frames)[0]


def _render(handle, image, inputs: Mapping | None, video, panel_size: float, max_frames: int):
    """(figure, one line per panel or per video row: what it shows)."""
    from matplotlib.figure import Figure  # no pyplot: no window, no global state; notebooks display it

    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ConfigError(f"max_frames must be a positive integer, got {max_frames!r}")
    kept, maps = _panels_data(handle, inputs)
    images = [im.convert("RGB") for im in _as_images(image)]
    tokens = kept.layout.tokens
    is_video = _video_mask(tokens)
    image_ids = tokens.image[0][~is_video].unique().tolist()
    if len(image_ids) != len(images):
        raise ConfigError(f"the prompt had {len(image_ids)} image(s); got {len(images)} picture(s) to draw on")
    runs = _video_runs(tokens)
    videos = _as_videos(video)
    if len(runs) != len(videos):
        raise ConfigError(f"the prompt had {len(runs)} video(s); got {len(videos)} video(s) of frames to draw on "
                          "(video=: the list of PIL frames given to the processor, a list of lists for several)")
    rows = [(i, g) for i in image_ids for g in tokens.grid[0][(tokens.image[0] == i) & ~is_video].unique().tolist()]
    columns: list[tuple[str, str]] = [("stage", name) for name, _ in kept.stages] + [("map", m) for m in maps]
    title = f"{handle.config.method}, budget {_budget_text(handle)}: visual tokens kept"
    if not runs:  # images only: the figure as it always was
        fig = Figure(figsize=(max(panel_size * len(columns), 4.5), panel_size * 1.1 * len(rows) + 0.3), dpi=100)
        axes = fig.subplots(len(rows), len(columns), squeeze=False)
        _draw_images(axes, kept, maps, images, image_ids, rows, columns)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        return fig, [ax.get_title() for ax in fig.axes]

    strips = [_Strip.of(handle, tokens, run, frames, max_frames) for run, frames in zip(runs, videos)]
    # Fixed geometry in inches (a layout engine over ~50 panels costs seconds): a title band above every
    # panel, a band for each section's title, a margin on the left for the row labels of the strips.
    width = max(panel_size * max([len(columns)] * bool(rows) + [len(s.shown) for s in strips]) + 0.5, 4.5)
    sections = [("images", panel_size * 1.1 - TITLE_BAND, len(rows), 0.1)] * bool(rows)
    sections += [("video", panel_size * s.aspect, len(columns), 0.35) for s in strips]
    heights = [n * (ph + TITLE_BAND) + top + 0.1 for _, ph, n, top in sections]
    fig = Figure(figsize=(width, sum(heights) + 0.35), dpi=100)
    bands = fig.subfigures(len(heights) + 1, 1, height_ratios=[0.35, *heights], squeeze=False)[:, 0]
    bands[0].suptitle(title, fontsize=9, y=0.5, va="center")
    axes_of = []
    for (kind, ph, n, top), height, band in zip(sections, heights, bands[1:]):
        cols = len(columns) if kind == "images" else len(strips[len(axes_of) - bool(rows)].shown)
        left = 0.45 / width if kind == "video" else 0.05 / width
        axes_of.append(band.subplots(n, cols, squeeze=False, gridspec_kw={
            "top": 1 - (top + TITLE_BAND) / height, "bottom": 0.1 / height, "left": left,
            "right": 1 - 0.05 / width, "hspace": TITLE_BAND / ph, "wspace": 0.06}))
    lines: list[str] = []
    if rows:
        _draw_images(axes_of[0], kept, maps, images, image_ids, rows, columns)
        lines += [ax.get_title() for ax in axes_of[0].flat]
    for v, (strip, axes, band) in enumerate(zip(strips, axes_of[bool(rows):], bands[1 + bool(rows):])):
        lines += _draw_strip(band, axes, strip, kept, maps, columns, v if len(strips) > 1 or rows else None)
    return fig, lines


def _draw_images(axes, kept, maps: dict, images: list, image_ids: list, rows: list, columns: list) -> None:
    """The image panels: one row per (image, grid), one column per stage, then the maps."""
    tokens = kept.layout.tokens
    stage_masks = dict(kept.stages)
    for r, (img_id, grid) in enumerate(rows):
        picture = images[image_ids.index(img_id)]
        sel = ((tokens.image[0] == img_id) & (tokens.grid[0] == grid) & tokens.prunable[0]
               & ~_video_mask(tokens)).nonzero().squeeze(-1)
        cells = _cells(tokens, sel, picture.size)
        for c, (kind, name) in enumerate(columns):
            ax = axes[r][c]
            _show_picture(ax, picture)
            where = f"image {img_id}, " if len(image_ids) > 1 else ""
            where += ("anyres crops" if grid else "base grid") if len(rows) > len(image_ids) else ""
            title = _draw_panel(ax, kind, name, cells, sel, kept, maps, stage_masks)
            ax.set_title(f"{title}\n{where}" if where else title, fontsize=8)


def _show_picture(ax, picture) -> None:
    ax.imshow(picture, extent=(0, picture.size[0], picture.size[1], 0), interpolation="nearest")
    ax.set_xlim(0, picture.size[0])
    ax.set_ylim(picture.size[1], 0)
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_panel(ax, kind: str, name: str, cells, sel: torch.Tensor, kept, maps: dict, stage_masks: dict) -> str:
    """Draws one stage or map over the picture already shown in `ax`; returns its title."""
    if kind == "stage":
        keep = stage_masks[name][sel].cpu()
        merged = kept.merged.get(name)
        merged = merged[sel].cpu() & keep if merged is not None else torch.zeros_like(keep)
        _draw_stage(ax, cells, keep, merged)
        title = f"{name}: {int(keep.sum())}/{len(sel)} kept"
        if int(merged.sum()):
            title += f", {int(merged.sum())} merged"
        return title
    values = torch.nan_to_num(maps[name][sel].detach().float().cpu(), nan=0.0)
    _draw_map(ax, cells, values, name)
    n_k = int((values > 0).sum())
    if name == "calibration set K":
        return f"K: {n_k}/{len(sel)} tokens" if n_k else "K empty (all tokens used)"
    return f"{name} map"


def _as_videos(video) -> list[list]:
    """`video=` as a list of videos, each a list of RGB PIL frames (a list of frames is one video)."""
    from PIL import Image

    if video is None:
        return []
    if isinstance(video, (list, tuple)) and video and all(isinstance(f, Image.Image) for f in video):
        video = [video]
    if not isinstance(video, (list, tuple)) or not all(isinstance(v, (list, tuple)) for v in video):
        raise ConfigError("video= takes the PIL frames given to the processor (a list of lists for several videos)")
    out = []
    for i, frames in enumerate(video):
        if not frames or not all(isinstance(f, Image.Image) for f in frames):
            raise ConfigError(f"video {i} must be a non-empty list of PIL frames")
        out.append([f.convert("RGB") for f in frames])
    return out


def _video_mask(tokens) -> torch.Tensor:
    """(Nv,) bool: the sample's video tokens (none for a layout made before `VisualTokens` knew videos)."""
    video = getattr(tokens, "video", None)
    return video[0] if video is not None else torch.zeros_like(tokens.prunable[0], dtype=torch.bool)


def _video_runs(tokens) -> list[torch.Tensor]:
    """The token indices of each video of the sample, in prompt order. Videos are told apart by their unit
    (`image`) or, with `video_scope="frame"` (a unit per frame), by the frame number starting again."""
    idx = _video_mask(tokens).nonzero().squeeze(-1)
    if idx.numel() == 0:
        return []
    order = idx[torch.argsort(tokens.seq_index[0][idx], stable=True)]
    frame, unit = tokens.frame[0][order].tolist(), tokens.image[0][order].tolist()
    runs, start = [], 0
    for j in range(1, len(order)):
        if frame[j] < frame[j - 1] or (frame[j] == frame[j - 1] and unit[j] != unit[j - 1]):
            runs.append(order[start:j])
            start = j
    runs.append(order[start:])
    return runs


#: Families whose video processor centre-crops the (shortest-edge resized) frames: their tokens cover that crop.
CENTRE_CROP_FAMILIES = ("llava_next_video", "video_llava")


class _Strip:
    """One video's strip: its frames, the token frames drawn, and where the token canvas lies on a frame."""

    def __init__(self, frames: list, run: torch.Tensor, tokens, shown: list[int], labels: dict[int, str],
                 picture_of: dict[int, int], canvas: tuple[float, float], box: tuple[float, float, float, float],
                 note: str):
        self.frames, self.run, self.tokens, self.shown = frames, run, tokens, shown
        self.labels, self.picture_of, self.canvas, self.box, self.note = labels, picture_of, canvas, box, note

    @classmethod
    def of(cls, handle, tokens, run: torch.Tensor, frames: list, max_frames: int) -> _Strip:
        adapter = getattr(handle.method, "adapter", None)
        family = getattr(adapter, "family", "")
        vision = getattr(getattr(adapter, "config", None), "vision_config", None)
        step = int(getattr(vision, "temporal_patch_size", 1) or 1) if family.startswith("qwen") else 1
        prunable = run[tokens.prunable[0][run]]
        groups = sorted(tokens.frame[0][prunable].unique().tolist())
        n = len(frames)
        exact = -(-n // step) == len(groups)
        picture_of, labels = {}, {}
        for t, g in enumerate(groups):
            if exact:
                first, last = t * step, min(t * step + step, n) - 1
                picture_of[g] = first
                labels[g] = f"frame {first}" if last == first else f"frames {first}-{last} (shows {first})"
            else:  # the processor sampled the frames (e.g. Qwen3-VL by fps): the nearest given frame
                picture_of[g] = min(n - 1, round(t * n / len(groups)))
                labels[g] = f"~frame {picture_of[g]}"
        count = min(max_frames, len(groups))
        picks = sorted({round(i * (len(groups) - 1) / max(count - 1, 1)) for i in range(count)})
        shown = [groups[i] for i in picks]
        region = tokens.region[0][prunable].detach().float().cpu()
        canvas = (float(region[:, 2].max()), float(region[:, 3].max())) if len(region) else (1.0, 1.0)
        width, height = frames[0].size
        box = (0.0, 0.0, float(width), float(height))
        crop = family in CENTRE_CROP_FAMILIES
        if crop:  # the largest centred box of the canvas's shape: the crop after a shortest-edge resize
            aspect = canvas[1] / max(canvas[0], 1.0)
            w, h = (height * aspect, float(height)) if width / height > aspect else (float(width), width / aspect)
            box = ((width - w) / 2, (height - h) / 2, w, h)
        unit = f"temporal groups of {step} frames (each panel draws a group's first frame)" if step > 1 else "frames"
        note = f"{n} frames given, {len(groups)} {unit} in tokens, {len(shown)} drawn"
        if not exact:
            note += "; the processor sampled the frames, so a panel shows the nearest given frame"
        if crop:
            note += "; the model sees the centre crop (the rest is washed out)"
        return cls(frames, run, tokens, shown, labels, picture_of, canvas, box, note)

    @property
    def aspect(self) -> float:
        """Height over width of the frames (the panels of a strip take their shape)."""
        width, height = self.frames[0].size
        return min(max(height / width, 0.25), 4.0)

    def cells(self, sel: torch.Tensor) -> list[tuple[float, float, float, float]]:
        """Each selected token's (x, y, w, h) on the frame picture: its region on the processed frame canvas,
        stretched onto the part of the frame the canvas shows."""
        region = self.tokens.region[0][sel].detach().float().cpu()
        bx, by, bw, bh = self.box
        sx, sy = bw / max(self.canvas[1], 1.0), bh / max(self.canvas[0], 1.0)
        return [(bx + float(x0) * sx, by + float(y0) * sy, float(x1 - x0) * sx, float(y1 - y0) * sy)
                for y0, x0, y1, x1 in region.tolist()]


def _draw_strip(section, axes, strip: _Strip, kept, maps: dict, columns: list, number: int | None) -> list[str]:
    """One video: a row per stage (then per map), a column per drawn frame; returns a line per row."""
    tokens = strip.tokens
    stage_masks = dict(kept.stages)
    name_of = "video" if number is None else f"video {number}"
    section.suptitle(f"{name_of}: {strip.note}", fontsize=8)
    prunable = strip.run[tokens.prunable[0][strip.run]]
    frame_of = tokens.frame[0][prunable]
    drawn = ", ".join(strip.labels[g].split(" (")[0] for g in strip.shown)
    lines = [f"{name_of}: {strip.note} ({drawn})"]
    for r, (kind, name) in enumerate(columns):
        for c, group in enumerate(strip.shown):
            ax = axes[r][c]
            picture = strip.frames[strip.picture_of[group]]
            _show_picture(ax, picture)
            _wash_outside(ax, strip.box, picture.size)
            sel = prunable[frame_of == group]
            title = _draw_panel(ax, kind, name, strip.cells(sel), sel, kept, maps, stage_masks)
            ax.set_title(f"{title}\n{strip.labels[group]}", fontsize=8)
        if kind == "stage":
            keep = stage_masks[name][prunable].cpu()
            line = f"{name}: {int(keep.sum())}/{len(prunable)} kept"
        else:
            line = "calibration set K" if name == "calibration set K" else f"{name} map"
        axes[r][0].set_ylabel(line, fontsize=8)
        lines.append(f"{name_of}, {line}")
    return lines


def _wash_outside(ax, box: tuple[float, float, float, float], size: tuple[int, int]) -> None:
    """Washes out the part of a frame outside the crop its tokens cover (nothing when they cover it all)."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    x, y, w, h = box
    width, height = size
    parts = [(0, 0, width, y), (0, y + h, width, height - y - h), (0, y, x, h), (x + w, y, width - x - w, h)]
    rects = [Rectangle((px, py), pw, ph) for px, py, pw, ph in parts if pw > 0.5 and ph > 0.5]
    if rects:
        ax.add_collection(PatchCollection(rects, facecolor="white", edgecolor="none", alpha=WASHED_OUT))


def _budget_text(handle) -> str:
    budget = getattr(handle.config, "budget", None)
    return "-" if budget is None else f"{budget:g}"


def _cells(tokens, sel: torch.Tensor, size: tuple[int, int]) -> list[tuple[float, float, float, float]]:
    """Each selected token's (x, y, w, h) on the original picture: its region on the grid's processor canvas,
    stretched to the picture (the canvas is the whole picture resized, padding already removed)."""
    region = tokens.region[0][sel].detach().float().cpu()
    if region.numel() == 0:
        return []
    height, width = float(region[:, 2].max()), float(region[:, 3].max())
    sx, sy = size[0] / max(width, 1.0), size[1] / max(height, 1.0)
    return [(float(x0) * sx, float(y0) * sy, float(x1 - x0) * sx, float(y1 - y0) * sy)
            for y0, x0, y1, x1 in region.tolist()]


def _draw_stage(ax, cells, keep: torch.Tensor, merged: torch.Tensor) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    dropped = [Rectangle((x, y), w, h) for (x, y, w, h), k in zip(cells, keep.tolist()) if not k]
    if dropped:
        ax.add_collection(PatchCollection(dropped, facecolor="black", edgecolor="none", alpha=DROPPED_SHADE))
    outlined = [Rectangle((x, y), w, h) for (x, y, w, h), m in zip(cells, merged.tolist()) if m]
    if outlined:
        lw = max(1.0, min(3.0, 0.08 * min(cells[0][2], cells[0][3])))
        ax.add_collection(PatchCollection(outlined, facecolor="none", edgecolor=MERGED_COLOUR, linewidth=lw))


def _draw_map(ax, cells, values: torch.Tensor, name: str) -> None:
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    rects = [Rectangle((x, y), w, h) for x, y, w, h in cells]
    if not rects:
        return
    if name == "calibration set K":
        chosen = [r for r, v in zip(rects, values.tolist()) if v > 0]
        ax.add_collection(PatchCollection(rects, facecolor="black", edgecolor="none", alpha=0.45))
        if chosen:
            ax.add_collection(PatchCollection(chosen, facecolor=K_COLOUR, edgecolor="white", alpha=0.85,
                                              linewidth=0.5))
        return
    coll = PatchCollection(rects, cmap="viridis", edgecolor="none", alpha=0.75)
    coll.set_array(values.numpy())
    lo, hi = float(values.min()), float(values.max())
    coll.set_clim(lo, hi if hi > lo else lo + 1.0)
    ax.add_collection(coll)


def save_kept_tokens(handle, image, out: str, inputs: Mapping | None = None, *, video=None,
                     max_frames: int = MAX_FRAMES) -> Sequence[str]:
    """Draws `kept_tokens(...)` into the PNG `out`; returns what it shows: the title of each image panel and,
    for a video, one line per row of its strip (a strip has a panel per frame: too many to list)."""
    fig, lines = _render(handle, image, inputs, video, 3.0, max_frames)
    fig.savefig(out, format="png")
    return lines


__all__ = ["kept_tokens", "save_kept_tokens"]
