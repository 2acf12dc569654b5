"""Video-LLaVA (FlowCut's video model): two CLIP towers, one for images and one for videos.

Images are laid out as in LLaVA-1.5 (the image tower, CLS dropped by the "default" strategy). Videos go
through the video tower frame by frame and keep every frame's CLS feature: each frame is CLS + side×side
tokens, frames one after another. The CLS tokens are not prunable (always kept, never counted, like
newlines); video maps (one row per frame, CLS removed as for every ViT-level map) get NaN there.

Both towers are hooked the same way (`vision_towers`); the pass's kind (image or video) tells the runtime
which layout its signals belong to.
"""

from __future__ import annotations

import torch

from .base import (
    FeatureCountMismatch,
    TokenLayout,
    grid_tokens,
    register_adapter,
    split_batch,
    tokens_from_flat,
    video_counts,
)
from .llava import LlavaAdapter


@register_adapter
class VideoLlavaAdapter(LlavaAdapter):
    family = "video_llava"
    class_names = ("VideoLlavaForConditionalGeneration", "VideoLlavaModel")
    video_kwargs = ("pixel_values_videos_shape",)

    @property
    def vision_tower(self):
        return self.base.image_tower

    @property
    def vision_towers(self):
        return [self.base.image_tower, self.base.video_tower]

    def vision_layers_of(self, tower):
        return tower.encoder.layers

    def vision_attention_of(self, tower, layer: int):
        return tower.encoder.layers[layer].self_attn

    def video_unsupported(self) -> str | None:
        return None

    def video_layout(self, video_mask: torch.Tensor, forward_kwargs: dict, n_frames: int) -> TokenLayout:
        side = self.config.vision_config.image_size // self.patch_size
        per_frame = side * side + 1  # the frame's CLS feature first
        n_videos, frames = video_counts(video_mask, forward_kwargs, n_frames, per_frame)
        dev = video_mask.device
        rows, cols, region = grid_tokens(1, side, side, self.patch_size, dev)

        def with_cls(x: torch.Tensor, fill) -> torch.Tensor:
            pad = torch.full((1, *x.shape[1:]), fill, dtype=x.dtype, device=dev)
            return torch.cat([pad, x]).repeat(n_frames, *([1] * (x.dim() - 1)))

        prunable = with_cls(torch.ones(side * side, dtype=torch.bool, device=dev), False)
        tokens = tokens_from_flat(
            video_mask, image=torch.arange(n_videos, device=dev).repeat_interleave(frames * per_frame),
            row=with_cls(rows, -1), col=with_cls(cols, -1), region=with_cls(region, 0.0), prunable=prunable,
        )
        tokens.video = torch.ones_like(tokens.prunable)
        tokens.frame = split_batch(torch.arange(frames, device=dev).repeat_interleave(per_frame).repeat(n_videos),
                                   video_mask)

        def pack(vit_map: torch.Tensor) -> torch.Tensor:
            if vit_map.shape[0] != n_frames:
                raise FeatureCountMismatch(f"a video map of {vit_map.shape[0]} frames for {n_frames} frames")
            flat = vit_map.float().reshape(n_frames, side * side)
            flat = torch.cat([torch.full_like(flat[:, :1], float("nan")), flat], 1)
            return split_batch(flat.reshape(-1), video_mask)

        return TokenLayout(tokens=tokens, pack=pack)
