"""Video model inputs without torchvision: a procedural example video and per-family video preprocessing.

Why this module exists: every transformers video processor (``BaseVideoProcessor``) needs torchvision, which
does not import with our CPU torch, so the tiny processors (and real ones loaded by the CLI) carry
``video_processor=None``. :class:`VideoFrameProcessor` is a torchvision-free stand-in that reproduces, per
family, what the real video processor computes (torchvision's CPU resize is ``torch.nn.functional.interpolate``
on the uint8 frames; Qwen's ``smart_resize`` and patch packing; centre crop; fused rescale + normalise), and
:func:`build_video_inputs` hands it to a shallow copy of the family's *real* processor class, so the placeholder
expansion (``replace_video_token``), ``mm_token_type_ids``, Qwen2.5-VL's ``second_per_grid_ts`` and Qwen3-VL's
timestamp text come from transformers' own code.

Families: LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT-Video, Video-LLaVA.

* :func:`example_video` - a deterministic animated picture (coloured shapes moving over a noisy background).
* :func:`video_frame_processor` - the family's default video settings (the real class defaults) + overrides.
* :func:`attach_video_processor` / :func:`get_video_processor` - let a processor carry its frame processor.
* :func:`build_video_inputs` - prompts with videos (and optionally images) -> ``BatchFeature``.
"""

from __future__ import annotations

import copy
import math
import platform
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "FAMILY_VIDEO_DEFAULTS",
    "VIDEO_FAMILIES",
    "VIDEO_PROCESSOR_ATTR",
    "VideoFrameProcessor",
    "attach_video_processor",
    "build_video_inputs",
    "example_video",
    "get_video_processor",
    "qwen3_video_smart_resize",
    "video_family",
    "video_frame_processor",
    "video_frame_processor_from_dict",
]

#: Attribute under which a processor carries its :class:`VideoFrameProcessor` (not a ProcessorMixin slot, so
#: ``save_pretrained`` ignores it and the processor behaves for images exactly as before).
VIDEO_PROCESSOR_ATTR = "vflowopt_video_processor"

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)

# processor class name (anywhere in the MRO) -> family; most specific first
_PROCESSOR_FAMILIES = (
    ("Qwen3VLProcessor", "qwen3_vl"),
    ("Qwen2_5_VLProcessor", "qwen2_5_vl"),
    ("Qwen2VLProcessor", "qwen2_vl"),
    ("LlavaOnevisionProcessor", "llava_onevision"),
    ("LlavaNextVideoProcessor", "llava_next_video"),
    ("VideoLlavaProcessor", "video_llava"),
)

#: The families :func:`build_video_inputs` supports.
VIDEO_FAMILIES: tuple[str, ...] = tuple(family for _, family in _PROCESSOR_FAMILIES)

_RESAMPLE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PILImageResampling values


# --------------------------------------------------------------------------------------------------------------
# Example video
# --------------------------------------------------------------------------------------------------------------


def example_video(seed: int = 0, frames: int = 8, size: tuple[int, int] = (80, 120)) -> list[Image.Image]:
    """A deterministic procedural RGB video: coloured shapes that move and bounce over a noisy background.

    Like :func:`vflowopt.tiny.example_image` but animated, so consecutive frames differ (temporal redundancy
    is high but not total, as in real clips). ``size`` is ``(width, height)``; returns ``frames`` PIL images.
    Uses a private ``numpy`` generator, so global RNG state is not touched.
    """
    if int(frames) < 1:
        raise ValueError(f"example_video needs at least one frame, got frames={frames}")
    width, height = int(size[0]), int(size[1])
    if width < 1 or height < 1:
        raise ValueError(f"example_video needs a positive size, got {size}")
    rng = np.random.default_rng(seed)
    base = rng.integers(90, 170, size=3)
    noise = rng.normal(0.0, 18.0, size=(height, width, 3))
    gradient = np.linspace(-25.0, 25.0, height)[:, None, None]
    background = np.clip(base[None, None, :] + noise + gradient, 0, 255).astype(np.uint8)

    palette = [(220, 40, 40), (40, 80, 220), (40, 180, 60), (240, 200, 30), (150, 60, 190)]
    order = rng.permutation(len(palette))
    short = min(width, height)
    shapes = []
    for i, kind in enumerate(("ellipse", "rectangle", "triangle", "ellipse")):
        extent = int(rng.integers(max(4, short // 5), max(5, short // 2)))
        x0 = float(rng.integers(0, max(1, width - extent)))
        y0 = float(rng.integers(0, max(1, height - extent)))
        speed = rng.uniform(1.0, max(1.5, short / 12.0), size=2) * rng.choice([-1.0, 1.0], size=2)
        shapes.append((kind, palette[int(order[i % len(palette)])], extent, x0, y0, float(speed[0]), float(speed[1])))

    def bounce(start: float, step: float, t: int, span: int) -> int:
        # position on a path that reflects at 0 and `span` (a triangle wave), so shapes stay in the frame
        if span <= 0:
            return 0
        p = (start + step * t) % (2 * span)
        return int(round(p if p <= span else 2 * span - p))

    video = []
    for t in range(int(frames)):
        image = Image.fromarray(background, mode="RGB")
        draw = ImageDraw.Draw(image)
        for kind, colour, extent, x0, y0, vx, vy in shapes:
            x = bounce(x0, vx, t, width - extent)
            y = bounce(y0, vy, t, height - extent)
            box = (x, y, x + extent, y + extent)
            if kind == "ellipse":
                draw.ellipse(box, fill=colour, outline=(0, 0, 0))
            elif kind == "rectangle":
                draw.rectangle(box, fill=colour, outline=(0, 0, 0))
            else:
                draw.polygon([(x + extent // 2, y), (x, y + extent), (x + extent, y + extent)], fill=colour)
        video.append(image)
    return video


# --------------------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------------------


def _is_frame(obj: Any) -> bool:
    return isinstance(obj, Image.Image) or (isinstance(obj, np.ndarray) and obj.ndim in (2, 3))


def _is_clip(obj: Any) -> bool:
    return isinstance(obj, (np.ndarray, torch.Tensor)) and obj.ndim == 4


def _is_video(obj: Any) -> bool:
    """A video is a non-nested sequence of frames or a 4-D array (a list of videos is a sequence of those)."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.ndim == 4
    if isinstance(obj, (list, tuple)):
        return not obj or not (isinstance(obj[0], (list, tuple)) or _is_clip(obj[0]))
    return False


def _frame_array(frame: Any, where: str) -> np.ndarray:
    """One frame as an HxWx3 uint8 array (what transformers' ``make_batched_videos`` makes of a PIL frame)."""
    if isinstance(frame, Image.Image):
        if frame.width == 0 or frame.height == 0:
            raise ValueError(f"{where} is empty ({frame.width}x{frame.height} pixels)")
        return np.asarray(frame if frame.mode == "RGB" else frame.convert("RGB"))
    if isinstance(frame, np.ndarray):
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[-1] != 3:
            raise ValueError(f"{where} is a {frame.dtype} array of shape {frame.shape}; expected HxWx3 uint8")
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise ValueError(f"{where} is empty ({frame.shape[1]}x{frame.shape[0]} pixels)")
        return frame
    raise ValueError(
        f"{where} has unsupported type {type(frame).__name__}; expected a PIL.Image.Image or an HxWx3 uint8 array"
    )


def _video_tensor(video: Any, index: int) -> torch.Tensor:
    """Validate one video and return it as a (frames, 3, height, width) uint8 tensor."""
    name = f"video {index}"
    if isinstance(video, np.ndarray):
        if video.ndim != 4:
            raise ValueError(f"{name} is an array of shape {video.shape}; expected (frames, height, width, 3)")
        frames = list(video)
    elif isinstance(video, (list, tuple)):
        frames = list(video)
    else:
        raise ValueError(
            f"{name} has unsupported type {type(video).__name__}; expected a list of PIL images or a "
            "(frames, height, width, 3) uint8 array"
        )
    if not frames:
        raise ValueError(f"{name} has no frames; a video needs at least one")
    arrays = [_frame_array(frame, f"{name}, frame {j}") for j, frame in enumerate(frames)]
    h0, w0 = arrays[0].shape[:2]
    for j, arr in enumerate(arrays[1:], start=1):
        if arr.shape[:2] != (h0, w0):
            raise ValueError(
                f"{name}: frame {j} is {arr.shape[1]}x{arr.shape[0]} but frame 0 is {w0}x{h0}; "
                "all frames of a video must have the same size"
            )
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Frame processing (the real video processors' math, no torchvision)
# --------------------------------------------------------------------------------------------------------------


def qwen3_video_smart_resize(
    num_frames: int, height: int, width: int, temporal_factor: int, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Qwen3-VL's video resize rule: sides multiple of ``factor``, the whole clip's pixels within bounds.

    Unlike Qwen2-VL's per-frame rule, the bounds apply to ``frames x height x width`` (transformers'
    ``video_processing_qwen3_vl.smart_resize``, which cannot be imported without torchvision).
    """
    if num_frames < temporal_factor:
        raise ValueError(
            f"Qwen3-VL needs at least {temporal_factor} frames per video (its temporal patch), got {num_frames}"
        )
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"video aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class VideoFrameProcessor:
    """A torchvision-free video processor for one family, with the real video processor's settings.

    ``kind`` selects the pipeline: ``"qwen2"`` (Qwen2-VL / Qwen2.5-VL: per-frame ``smart_resize``, pad to a
    multiple of ``temporal_patch_size`` by repeating the last frame, flatten to patches + ``video_grid_thw``),
    ``"qwen3"`` (the same with Qwen3-VL's whole-clip ``smart_resize`` and optional fps frame sampling), or
    ``"resize"`` (LLaVA families: resize to ``size`` - fixed height/width or shortest edge - then optional
    centre crop; ``pixel_values_videos`` is ``(videos, frames, 3, H, W)``).
    Callable like a transformers video processor, so a real processor class can use it in its
    ``video_processor`` slot.
    """

    kind: str
    size: dict[str, int]
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    resample: int = 3  # PILImageResampling.BICUBIC, every supported family's default
    rescale_factor: float = 1 / 255
    do_center_crop: bool = False
    crop_size: dict[str, int] | None = None
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    do_sample_frames: bool = False
    fps: float | None = None
    min_frames: int = 4
    max_frames: int = 768
    model_input_names: list[str] = field(default_factory=lambda: ["pixel_values_videos"])

    def __post_init__(self) -> None:
        if self.kind not in ("qwen2", "qwen3", "resize"):
            raise ValueError(f"unknown VideoFrameProcessor kind {self.kind!r}; expected 'qwen2', 'qwen3' or 'resize'")
        if self.resample not in _RESAMPLE_MODES:
            raise ValueError(f"unsupported resample {self.resample}; expected one of {sorted(_RESAMPLE_MODES)}")
        if self.kind != "resize":
            self.model_input_names = ["pixel_values_videos", "video_grid_thw"]

    # -- the steps ------------------------------------------------------------------------------------------

    def _resize(self, video: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """torchvision's CPU ``resize`` of uint8 frames: native uint8 interpolation with antialiasing."""
        if video.shape[-2:] == (height, width):
            return video
        mode = _RESAMPLE_MODES[int(self.resample)]
        options = {"align_corners": False, "antialias": True} if mode != "nearest" else {}
        native_bilinear = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") or platform.machine() in (
            "aarch64", "arm64")
        if mode == "bilinear" and not native_bilinear:
            # torchvision resizes bilinear uint8 natively only on AVX2/AVX512/ARM CPUs; elsewhere via float + round
            out = torch.nn.functional.interpolate(video.float(), size=(height, width), mode=mode, **options)
            return out.round_().to(torch.uint8)
        return torch.nn.functional.interpolate(video, size=(height, width), mode=mode, **options)

    def _target_size(self, video: torch.Tensor) -> tuple[int, int]:
        num_frames, _, height, width = video.shape
        factor = self.patch_size * self.merge_size
        if self.kind == "qwen2":
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

            return smart_resize(height, width, factor=factor, min_pixels=self.size["shortest_edge"],
                                max_pixels=self.size["longest_edge"])
        if self.kind == "qwen3":
            return qwen3_video_smart_resize(num_frames, height, width, self.temporal_patch_size, factor,
                                            self.size["shortest_edge"], self.size["longest_edge"])
        if "height" in self.size and "width" in self.size:
            return int(self.size["height"]), int(self.size["width"])
        if "shortest_edge" in self.size:
            from transformers.image_transforms import get_resize_output_image_size
            from transformers.image_utils import ChannelDimension

            out = get_resize_output_image_size(video[0], size=self.size["shortest_edge"], default_to_square=False,
                                               input_data_format=ChannelDimension.FIRST)
            return int(out[0]), int(out[1])
        raise ValueError(f"unsupported video size {self.size}; expected height/width or shortest_edge")

    def _center_crop(self, video: torch.Tensor) -> torch.Tensor:
        """Centre crop to ``crop_size``, zero-padding first when the crop is larger (torchvision's rule)."""
        crop_h, crop_w = int(self.crop_size["height"]), int(self.crop_size["width"])
        height, width = video.shape[-2:]
        if crop_w > width or crop_h > height:
            left = (crop_w - width) // 2 if crop_w > width else 0
            top = (crop_h - height) // 2 if crop_h > height else 0
            right = (crop_w - width + 1) // 2 if crop_w > width else 0
            bottom = (crop_h - height + 1) // 2 if crop_h > height else 0
            video = torch.nn.functional.pad(video, (left, right, top, bottom), value=0)
            height, width = video.shape[-2:]
        top = int((height - crop_h) / 2.0)
        left = int((width - crop_w) / 2.0)
        return video[..., top:top + crop_h, left:left + crop_w]

    def _normalise(self, video: torch.Tensor) -> torch.Tensor:
        """Fused rescale + normalise, in the same float32 operations as transformers' torchvision backend."""
        mean = torch.tensor(self.image_mean) * (1.0 / self.rescale_factor)
        std = torch.tensor(self.image_std) * (1.0 / self.rescale_factor)
        return video.to(torch.float32).sub(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))

    def _patchify(self, video: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Qwen packing: (frames, C, H, W) -> (t·h·w, C·tps·p·p) rows in merge-window order, and [t, h, w]."""
        tps, p, m = self.temporal_patch_size, self.patch_size, self.merge_size
        if pad := -video.shape[0] % tps:
            video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
        frames, channels, height, width = video.shape
        grid_t, grid_h, grid_w = frames // tps, height // p, width // p
        patches = video.reshape(grid_t, tps, channels, grid_h // m, m, p, grid_w // m, m, p)
        patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        return patches.reshape(grid_t * grid_h * grid_w, channels * tps * p * p), [grid_t, grid_h, grid_w]

    def _sample(self, video: torch.Tensor, metadata: dict) -> torch.Tensor:
        """Qwen3-VL's default sampling: ``fps`` frames per second of the clip, at least ``min_frames``."""
        total = video.shape[0]
        if metadata.get("fps") is None:
            metadata["fps"] = 24  # what transformers assumes (with a warning) for frames without metadata
        num = int(total / metadata["fps"] * self.fps)
        num = min(max(num, self.min_frames), self.max_frames, total)
        indices = np.linspace(0, total - 1, num).round().astype(int)
        metadata["frames_indices"] = indices
        return video[torch.from_numpy(indices)]

    # -- the call -------------------------------------------------------------------------------------------

    def __call__(self, videos, video_metadata=None, do_sample_frames: bool | None = None,
                 return_metadata: bool = False, return_tensors=None, **_ignored):
        """Preprocess ``videos`` (a list of videos, or one) like the family's real video processor."""
        from transformers import BatchFeature
        from transformers.video_utils import VideoMetadata

        if _is_video(videos):
            videos = [videos]
        clips = [v if isinstance(v, torch.Tensor) else _video_tensor(v, i) for i, v in enumerate(videos)]
        if video_metadata is None or isinstance(video_metadata, dict):
            video_metadata = [dict(video_metadata or {}) for _ in clips]
        if len(video_metadata) != len(clips):
            raise ValueError(f"got {len(video_metadata)} video_metadata entries for {len(clips)} videos")
        sample = self.do_sample_frames if do_sample_frames is None else do_sample_frames
        metas, pixel_values, grids = [], [], []
        for clip, given in zip(clips, video_metadata):
            meta = {"total_num_frames": clip.shape[0], "fps": None, "frames_indices": list(range(clip.shape[0])),
                    "height": clip.shape[2], "width": clip.shape[3]}
            meta.update({k: v for k, v in dict(given).items() if v is not None})
            if sample and self.kind == "qwen3" and self.fps is not None:
                clip = self._sample(clip, meta)
            height, width = self._target_size(clip)
            clip = self._resize(clip, height, width)
            if self.kind == "resize" and self.do_center_crop and self.crop_size:
                clip = self._center_crop(clip)
            clip = self._normalise(clip)
            if self.kind == "resize":
                pixel_values.append(clip)
            else:
                patches, grid = self._patchify(clip)
                pixel_values.append(patches)
                grids.append(grid)
            metas.append(VideoMetadata(**meta))
        if self.kind == "resize":
            out = BatchFeature({"pixel_values_videos": pixel_values}, tensor_type=return_tensors)
        else:
            out = BatchFeature({"pixel_values_videos": torch.cat(pixel_values), "video_grid_thw": torch.tensor(grids)},
                               tensor_type=return_tensors)
        if return_metadata:
            out["video_metadata"] = metas
        return out


# --------------------------------------------------------------------------------------------------------------
# Family defaults
# --------------------------------------------------------------------------------------------------------------

_QWEN2_DEFAULTS = {"kind": "qwen2", "size": {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768},
                   "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD, "patch_size": 14}

#: The class defaults of each family's transformers video processor (``LlavaOnevisionVideoProcessor``,
#: ``Qwen2VLVideoProcessor`` - also Qwen2.5-VL's -, ``Qwen3VLVideoProcessor``, ``LlavaNextVideoVideoProcessor``,
#: ``VideoLlavaVideoProcessor``); tests/test_video_inputs.py checks them against the transformers sources.
FAMILY_VIDEO_DEFAULTS: dict[str, dict[str, Any]] = {
    "llava_onevision": {"kind": "resize", "size": {"height": 384, "width": 384},
                        "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
    "qwen2_vl": dict(_QWEN2_DEFAULTS),
    "qwen2_5_vl": dict(_QWEN2_DEFAULTS),
    "qwen3_vl": {"kind": "qwen3", "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 32 * 32 * 768},
                 "image_mean": IMAGENET_STANDARD_MEAN, "image_std": IMAGENET_STANDARD_STD, "patch_size": 16,
                 "do_sample_frames": True, "fps": 2, "min_frames": 4, "max_frames": 768},
    "llava_next_video": {"kind": "resize", "size": {"shortest_edge": 224}, "do_center_crop": True,
                         "crop_size": {"height": 224, "width": 224},
                         "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
    "video_llava": {"kind": "resize", "size": {"shortest_edge": 224}, "do_center_crop": True,
                    "crop_size": {"height": 224, "width": 224},
                    "image_mean": OPENAI_CLIP_MEAN, "image_std": OPENAI_CLIP_STD},
}


def video_frame_processor(family: str, **overrides: Any) -> VideoFrameProcessor:
    """The family's :class:`VideoFrameProcessor` with the real video processor's defaults, then ``overrides``.

    Checkpoints may override the class defaults in ``video_preprocessor_config.json`` (e.g. LLaVA-OneVision's
    use mean/std 0.5); pass those values as ``overrides``.
    """
    if family not in FAMILY_VIDEO_DEFAULTS:
        raise ValueError(f"no video defaults for family {family!r}; supported: {', '.join(VIDEO_FAMILIES)}")
    settings = copy.deepcopy(FAMILY_VIDEO_DEFAULTS[family])
    settings.update(overrides)
    settings["image_mean"] = tuple(settings["image_mean"])
    settings["image_std"] = tuple(settings["image_std"])
    return VideoFrameProcessor(**settings)


_SETTING_NAMES = ("size", "image_mean", "image_std", "resample", "rescale_factor", "do_center_crop", "crop_size",
                  "patch_size", "temporal_patch_size", "merge_size", "do_sample_frames", "fps", "min_frames",
                  "max_frames")


def video_frame_processor_from_dict(family: str, config: dict[str, Any]) -> VideoFrameProcessor:
    """The family's :class:`VideoFrameProcessor` with a checkpoint's ``video_preprocessor_config.json`` values.

    Keys the frame processor has no use for are ignored; Qwen's legacy ``min_pixels``/``max_pixels`` become
    ``size`` as in ``Qwen2VLVideoProcessor.__init__``.
    """
    settings = {k: config[k] for k in _SETTING_NAMES if config.get(k) is not None}
    if family.startswith("qwen"):
        size = dict(settings.get("size") or FAMILY_VIDEO_DEFAULTS[family]["size"])
        if config.get("min_pixels") is not None:
            size["shortest_edge"] = int(config["min_pixels"])
        if config.get("max_pixels") is not None:
            size["longest_edge"] = int(config["max_pixels"])
        settings["size"] = {k: size[k] for k in ("shortest_edge", "longest_edge")}
    if isinstance(settings.get("crop_size"), int):
        settings["crop_size"] = {"height": settings["crop_size"], "width": settings["crop_size"]}
    return video_frame_processor(family, **settings)


def video_family(processor) -> str:
    """The video family of a processor, from its class hierarchy (tiny subclasses included)."""
    names = {cls.__name__ for cls in type(processor).__mro__}
    for name, family in _PROCESSOR_FAMILIES:
        if name in names:
            return family
    raise ValueError(
        f"videos are not supported for {type(processor).__name__}; supported processors: "
        + ", ".join(name for name, _ in _PROCESSOR_FAMILIES)
    )


def attach_video_processor(processor, frame_processor: VideoFrameProcessor):
    """Let ``processor`` carry ``frame_processor`` for :func:`build_video_inputs`; returns ``processor``.

    Stored as an extra attribute (:data:`VIDEO_PROCESSOR_ATTR`), not in the ``video_processor`` slot, so the
    processor's image/text behaviour and ``save_pretrained`` output do not change.
    """
    setattr(processor, VIDEO_PROCESSOR_ATTR, frame_processor)
    return processor


def get_video_processor(processor) -> VideoFrameProcessor | Any:
    """The video processor :func:`build_video_inputs` uses for ``processor``.

    In order: a working transformers video processor in the ``video_processor`` slot (where torchvision works),
    the attached :class:`VideoFrameProcessor`, else the family defaults with the patch/merge sizes of the
    processor's image processor (Qwen).
    """
    slot = getattr(processor, "video_processor", None)
    if slot is not None:
        return slot
    attached = getattr(processor, VIDEO_PROCESSOR_ATTR, None)
    if attached is not None:
        return attached
    family = video_family(processor)
    overrides = {}
    if family.startswith("qwen"):
        image_processor = processor.image_processor
        for name in ("patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(image_processor, name, None)
            if value is not None:
                overrides[name] = int(value)
    return video_frame_processor(family, **overrides)


# --------------------------------------------------------------------------------------------------------------
# Model inputs
# --------------------------------------------------------------------------------------------------------------


def _normalise_videos(videos, batch_size: int) -> list[list[Any]]:
    """The ``videos`` argument of :func:`build_video_inputs` as one list of videos per prompt."""
    if videos is None:
        return [[] for _ in range(batch_size)]
    if _is_video(videos):
        if batch_size != 1:
            raise ValueError(f"got one video for {batch_size} prompts; pass one entry (video, list or None) per prompt")
        return [[videos]]
    if not isinstance(videos, (list, tuple)):
        raise ValueError(
            f"videos must be a video, a list of videos or one entry per prompt, got {type(videos).__name__}"
        )
    entries = list(videos)
    if batch_size == 1 and all(_is_video(v) for v in entries):
        return [entries]  # several videos in one prompt
    if len(entries) != batch_size:
        raise ValueError(f"got {len(entries)} video entries for {batch_size} prompts")
    per_prompt = []
    for entry in entries:
        if entry is None:
            per_prompt.append([])
        elif _is_video(entry):
            per_prompt.append([entry])
        else:
            per_prompt.append(list(entry))
    return per_prompt


def normalise_images(images, batch_size: int) -> list[list[Image.Image]]:
    """Turn an ``images`` argument (of :func:`build_video_inputs` or :func:`vflowopt.tiny.build_inputs`) into one
    list of images per prompt."""
    if images is None:
        return [[] for _ in range(batch_size)]
    if isinstance(images, Image.Image):
        images = [images]
    images = list(images)
    if batch_size == 1 and all(isinstance(im, Image.Image) for im in images):
        return [images]  # several images in a single prompt
    if len(images) != batch_size:
        raise ValueError(f"got {len(images)} image entries for {batch_size} prompts")
    per_prompt: list[list[Image.Image]] = []
    for entry in images:
        if entry is None:
            per_prompt.append([])
        elif isinstance(entry, Image.Image):
            per_prompt.append([entry])
        else:
            per_prompt.append(list(entry))
    return per_prompt


def build_video_inputs(
    processor,
    videos,
    prompts: str | Sequence[str] = "What happens in the video?",
    images=None,
    *,
    chat: bool = True,
    fps: float | None = None,
    video_processor: VideoFrameProcessor | None = None,
    return_text: bool = False,
    **processor_kwargs: Any,
):
    """Model inputs for prompts with videos (and optionally images), built without torchvision.

    Args:
        processor: the family's processor (a tiny one, or a real one loaded with ``video_processor=None``).
        videos: for one prompt, a video (list of PIL frames or a ``(frames, H, W, 3)`` uint8 array) or a list of
            videos; for several prompts, one entry per prompt: a video, a list of videos or ``None``.
        prompts: one prompt or a list of prompts (a batch; left padding).
        images: optional images, as in :func:`vflowopt.tiny.build_inputs` (mixed image + video prompts); they go
            through the processor's own image processor, so their keys are as for images alone.
        chat: render the processor's chat template (a user turn with the images, the videos, then the text);
            otherwise ``"<image>\\n" * n + "<video>\\n" * m + prompt``.
        fps: frames per second of the given frames (video metadata). ``None`` = unknown, which transformers
            treats as 24 (Qwen2.5-VL ``second_per_grid_ts``, Qwen3-VL timestamps and frame sampling).
        video_processor: overrides :func:`get_video_processor` (e.g. a checkpoint's video settings).
        return_text: also return the formatted prompts (before placeholder expansion).
        **processor_kwargs: forwarded to the processor call (``videos_kwargs={"do_sample_frames": False}`` keeps
            every frame for Qwen3-VL, whose real default samples 2 frames per second).

    Returns:
        A ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values_videos`` and the family's keys:
        ``video_grid_thw`` and ``mm_token_type_ids`` for Qwen, ``second_per_grid_ts`` for Qwen2.5-VL, plus the
        image keys when ``images`` are given), or ``(batch, texts)`` if ``return_text``.
    """
    family = video_family(processor)
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("at least one prompt is required")
    per_prompt_videos = _normalise_videos(videos, len(prompt_list))
    per_prompt_images = normalise_images(images, len(prompt_list))
    flat_videos = [video for entry in per_prompt_videos for video in entry]
    if not flat_videos:
        raise ValueError("build_video_inputs needs at least one video; use vflowopt.tiny.build_inputs for images")
    tensors = [_video_tensor(video, i) for i, video in enumerate(flat_videos)]

    if not family.startswith("qwen") and len({t.shape[0] for t in tensors}) > 1:
        counts = ", ".join(str(t.shape[0]) for t in tensors)
        raise ValueError(f"{family} stacks the videos of one call into a (videos, frames, 3, H, W) tensor, so they "
                         f"need the same number of frames; got {counts}")
    frame_processor = video_processor if video_processor is not None else get_video_processor(processor)
    if family == "qwen3_vl" and isinstance(frame_processor, VideoFrameProcessor):
        sample = processor_kwargs.get("videos_kwargs", {}).get("do_sample_frames", frame_processor.do_sample_frames)
        shortest = min(t.shape[0] for t in tensors)
        if not sample and shortest < frame_processor.temporal_patch_size:
            raise ValueError(f"Qwen3-VL needs at least {frame_processor.temporal_patch_size} frames per video, "
                             f"got a video with {shortest}")

    template = getattr(processor, "chat_template", None)
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    video_token = getattr(processor, "video_token", "<video>")
    texts = []
    for prompt, imgs, vids in zip(prompt_list, per_prompt_images, per_prompt_videos):
        if chat and template:
            content = [{"type": "image"} for _ in imgs] + [{"type": "video"} for _ in vids]
            content.append({"type": "text", "text": prompt})
            texts.append(tokenizer.apply_chat_template([{"role": "user", "content": content}], chat_template=template,
                                                       tokenize=False, add_generation_prompt=True))
        else:
            texts.append(f"{image_token}\n" * len(imgs) + f"{video_token}\n" * len(vids) + prompt)
    for text, imgs, vids in zip(texts, per_prompt_images, per_prompt_videos):
        if text.count(video_token) != len(vids) or text.count(image_token) != len(imgs):
            raise ValueError(f"the chat template of {type(processor).__name__} does not render one {video_token} per "
                             "video and one image token per image; pass chat=False")

    kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "padding_side": "left"}
    kwargs.update(processor_kwargs)
    videos_kwargs = dict(kwargs.pop("videos_kwargs", {}))
    if fps is None and family == "qwen3_vl":
        fps = 24.0  # what transformers assumes (with a warning) for frames without metadata; same result
    if fps is not None:
        # the metadata transformers makes for pre-decoded frames (make_batched_metadata), plus the fps
        videos_kwargs.setdefault("video_metadata", [
            {"total_num_frames": t.shape[0], "fps": float(fps), "frames_indices": list(range(t.shape[0])),
             "height": t.shape[2], "width": t.shape[3]} for t in tensors])
    if videos_kwargs:
        kwargs["videos_kwargs"] = videos_kwargs

    call_processor = copy.copy(processor)  # the caller's processor keeps video_processor=None
    call_processor.video_processor = frame_processor
    inputs = {"text": texts, "videos": tensors}
    if any(per_prompt_images):
        inputs["images"] = [imgs for imgs in per_prompt_images]
    batch = call_processor(**inputs, **kwargs)
    return (batch, texts) if return_text else batch

