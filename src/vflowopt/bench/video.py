"""Video prompts for ``vflowopt bench --video-frames``: which models take videos, and their frame settings.

The transformers video processors need torchvision, so every processor the bench builds or loads carries
``video_processor=None``; the frames go through :class:`vflowopt.video_inputs.VideoFrameProcessor` instead.
Its settings must be the real model's (frame size, Qwen pixel limits, mean/std), or the number of video
tokens, and so every timing, would be another model's. In order of precedence they come from:

1. a working transformers video processor in the processor's ``video_processor`` slot (then nothing here);
2. the model directory's ``video_preprocessor_config.json`` (over the family defaults below);
3. a frame processor already attached to the processor (the tiny models, :func:`offline_processor`);
4. the family defaults derived from the model config: LLaVA-style towers get frames at the tower's input
   size (OneVision: resized to ``image_size`` square; LLaVA-NeXT-Video and Video-LLaVA: shortest edge then
   centre crop), with the image processor's mean/std; Qwen-VL keeps the real video processor's pixel
   limits (Qwen2/2.5-VL: 128 to 768 merged 28 px cells per frame) and takes patch, merge and temporal
   patch sizes from the vision config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..video_inputs import (
    FAMILY_VIDEO_DEFAULTS,
    VIDEO_FAMILIES,
    VIDEO_PROCESSOR_ATTR,
    VideoFrameProcessor,
    video_frame_processor,
)

__all__ = ["VIDEO_FAMILIES", "frame_processor_for", "video_frame_settings", "video_refusal"]

_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: keys of a ``video_preprocessor_config.json`` that map one to one onto VideoFrameProcessor fields
_FILE_KEYS = ("size", "crop_size", "do_center_crop", "image_mean", "image_std", "resample", "rescale_factor",
              "patch_size", "temporal_patch_size", "merge_size", "do_sample_frames", "fps", "min_frames",
              "max_frames")


def video_refusal(model_type: str, name: str) -> str | None:
    """Why model type `model_type` (named `name` in the message) cannot take a video prompt, or None."""
    if model_type in VIDEO_FAMILIES:
        return None
    return (f"--video-frames: {name} is a '{model_type}' model, which takes no videos; video families: "
            f"{', '.join(VIDEO_FAMILIES)}")


def video_frame_settings(config: Any, image_processor: Any = None, shipped: dict | None = None) -> dict[str, Any]:
    """The frame processor settings of `config`'s family (see the module docstring, item 4), then the
    shipped architecture's ``_video_processor`` entries (`shipped`) over them."""
    family = config.model_type
    if family not in FAMILY_VIDEO_DEFAULTS:
        raise ValueError(video_refusal(family, family))
    vision = config.vision_config
    mean = tuple(getattr(image_processor, "image_mean", None) or ())
    std = tuple(getattr(image_processor, "image_std", None) or ())
    settings: dict[str, Any] = {}
    if family.startswith("qwen"):
        settings.update(patch_size=int(vision.patch_size), temporal_patch_size=int(vision.temporal_patch_size),
                        merge_size=int(vision.spatial_merge_size))
    else:
        side = int(vision.image_size)
        if family == "llava_onevision":
            settings["size"] = {"height": side, "width": side}
        else:
            settings.update(size={"shortest_edge": side}, do_center_crop=True,
                            crop_size={"height": side, "width": side})
    if len(mean) == 3 and len(std) == 3:
        settings.update(image_mean=mean, image_std=std)
    for key, value in (shipped or {}).items():
        settings[key] = value
    return settings


def _file_settings(folder: Path) -> dict[str, Any]:
    """The frame settings a model directory's ``video_preprocessor_config.json`` states ({} without one)."""
    path = folder / "video_preprocessor_config.json"
    if not path.is_file():
        return {}
    raw = json.loads(path.read_text(encoding="utf-8"))
    settings = {k: raw[k] for k in _FILE_KEYS if raw.get(k) is not None}
    size = dict(settings.get("size") or {})
    # Qwen2-VL style files state the pixel limits on their own too; they win over `size` as in transformers
    if raw.get("min_pixels") is not None:
        size["shortest_edge"] = int(raw["min_pixels"])
    if raw.get("max_pixels") is not None:
        size["longest_edge"] = int(raw["max_pixels"])
    if size:
        settings["size"] = size
    for key in ("image_mean", "image_std"):
        if key in settings:
            settings[key] = tuple(float(x) for x in settings[key])
    return settings


def frame_processor_for(processor: Any, config: Any, folder: Path | None = None) -> VideoFrameProcessor | None:
    """The frame processor a bench video prompt goes through for `processor` / `config` (see the module
    docstring for the order), or None when the processor's own transformers video processor works."""
    if getattr(processor, "video_processor", None) is not None:
        return None
    family = config.model_type
    from_file = _file_settings(folder) if folder is not None else {}
    attached = getattr(processor, VIDEO_PROCESSOR_ATTR, None)
    if attached is not None and not from_file:
        return attached
    settings = video_frame_settings(config, getattr(processor, "image_processor", None))
    settings.update(from_file)
    return video_frame_processor(family, **settings)
