"""Pictures of what pruning kept: `kept_tokens(handle, image)` returns a matplotlib figure.

One row per token grid of each image (LLaVA-1.5 and Qwen-VL: one grid; LLaVA-NeXT / OneVision: the base
grid and the anyres crop grid, both drawn over the whole original picture), one panel per stage of the
last prefill ("vision encoder" when the method prunes there, "before LLM", each in-LLM stage). In a panel
the kept tokens show the picture as it is, dropped ones are darkened, and kept tokens that carry
recycled or merged features are outlined. A token is drawn at its pixel region (`TokenLayout`: CLIP
patches, Qwen merge groups of 28 px, 32 px for Qwen3-VL) scaled from the processor's canvas of its grid
onto the original picture.

For VFlowOpt, three more panels per row: the importance map I it ranked tokens by, the patch-entropy map
and the calibration set K (the tokens receiving more than t times the mean attention), per token. The
entropy and K need the vision pass itself: pass the processor output as `inputs`, and `kept_tokens`
runs one prefill (`model(**inputs)`) with the handle attached and records them; without `inputs` it draws
the handle's last prefill (importance only). The record exists for prefills of batch size 1 with images
(`PruneStats.kept`); videos are not drawn.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .errors import ConfigError

DROPPED_SHADE = 0.72  # opacity of the dark veil over dropped tokens
MERGED_COLOUR = "#ff8c00"
K_COLOUR = "#e0202a"


def _as_images(image) -> list:
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

    def on_pixels(module, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        if pixel_values is not None:
            got["entropy"] = adapter.patch_entropy(pixel_values, cfg.image_mean, cfg.image_std)

    original = method.on_vision_attention

    def on_attention(probs):
        rows = [probs] if torch.is_tensor(probs) else [p[None] for p in probs]
        k = [calibration_set(p.float(), cfg.threshold)[0][:, skip:].float() for p in rows]
        a = [calibrated_attention(p.float(), cfg.threshold, cfg.calibration)[:, skip:] for p in rows]
        got["K"] = k[0] if torch.is_tensor(probs) else [x[0] for x in k]
        got["attention"] = a[0] if torch.is_tensor(probs) else [x[0] for x in a]
        return original(probs)

    hook = adapter.vision_tower.register_forward_pre_hook(on_pixels, with_kwargs=True)
    method.on_vision_attention = on_attention
    try:
        yield got
    finally:
        hook.remove()
        del method.on_vision_attention  # the instance attribute; the class's method shows again


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


def kept_tokens(handle, image, inputs: Mapping | None = None, *, panel_size: float = 3.0):
    """The figure of what `handle` kept in its last prefill (or in one it runs on `inputs`); see the module doc.

    `image`: the PIL picture given to the processor (a list for a multi-image prompt, in prompt order).
    Raises ConfigError when there is nothing to draw (no image prefill of batch size 1 recorded, or a
    different number of pictures than the prompt had)."""
    from matplotlib.figure import Figure  # no pyplot: no window, no global state; notebooks display it

    kept, maps = _panels_data(handle, inputs)
    images = [im.convert("RGB") for im in _as_images(image)]
    tokens = kept.layout.tokens
    image_ids = tokens.image[0].unique().tolist()
    if len(image_ids) != len(images):
        raise ConfigError(f"the prompt had {len(image_ids)} image(s); got {len(images)} picture(s) to draw on")
    rows = [(i, g) for i in image_ids for g in tokens.grid[0][tokens.image[0] == i].unique().tolist()]
    columns: list[tuple[str, str]] = [("stage", name) for name, _ in kept.stages] + [("map", m) for m in maps]
    fig = Figure(figsize=(max(panel_size * len(columns), 4.5), panel_size * 1.1 * len(rows) + 0.3), dpi=100)
    axes = fig.subplots(len(rows), len(columns), squeeze=False)
    stage_masks = dict(kept.stages)
    for r, (img_id, grid) in enumerate(rows):
        picture = images[image_ids.index(img_id)]
        sel = ((tokens.image[0] == img_id) & (tokens.grid[0] == grid) & tokens.prunable[0]).nonzero().squeeze(-1)
        cells = _cells(tokens, sel, picture.size)
        for c, (kind, name) in enumerate(columns):
            ax = axes[r][c]
            ax.imshow(picture, extent=(0, picture.size[0], picture.size[1], 0), interpolation="nearest")
            ax.set_xlim(0, picture.size[0])
            ax.set_ylim(picture.size[1], 0)
            ax.set_xticks([])
            ax.set_yticks([])
            where = f"image {img_id}, " if len(image_ids) > 1 else ""
            where += ("anyres crops" if grid else "base grid") if len(rows) > len(image_ids) else ""
            if kind == "stage":
                keep = stage_masks[name][sel].cpu()
                merged = kept.merged.get(name)
                merged = merged[sel].cpu() & keep if merged is not None else torch.zeros_like(keep)
                _draw_stage(ax, cells, keep, merged)
                title = f"{name}: {int(keep.sum())}/{len(sel)} kept"
                if int(merged.sum()):
                    title += f", {int(merged.sum())} merged"
            else:
                values = torch.nan_to_num(maps[name][sel].detach().float().cpu(), nan=0.0)
                _draw_map(ax, cells, values, name)
                n_k = int((values > 0).sum())
                title = f"{name} map"
                if name == "calibration set K":
                    title = f"K: {n_k}/{len(sel)} tokens" if n_k else "K empty (all tokens used)"
            ax.set_title(f"{title}\n{where}" if where else title, fontsize=8)
    fig.suptitle(f"{handle.config.method}, budget {_budget_text(handle)}: visual tokens kept", fontsize=9)
    fig.tight_layout()
    return fig


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


def save_kept_tokens(handle, image, out: str, inputs: Mapping | None = None) -> Sequence[str]:
    """Draws `kept_tokens(...)` into the PNG `out`; returns the titles of the panels (what it shows)."""
    fig = kept_tokens(handle, image, inputs)
    fig.savefig(out, format="png")
    return [ax.get_title() for ax in fig.axes]


__all__ = ["kept_tokens", "save_kept_tokens"]
