"""LLaVA-NeXT-Video (TrimTokenator's video model): LLaVA-NeXT's anyres images plus pooled video frames.

Images are laid out exactly as for LLaVA-NeXT. Every video frame is one crop through the same CLIP tower
(CLS dropped by the "default" strategy); `vision_resampler` pools each frame's side×side grid with a
stride-s window (average by default) before the projector, and the frames' tokens follow each other with
no newline. Video maps go through the same pooling (a "conv" resampler is learned: its maps are
averaged over the window instead), so they align 1:1 with the video tokens.

Pruning inside the vision encoder: in the video path the resampler, not the projector, is the first
module to read the ViT's hidden states, so it is a projector for the V point too.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .base import FeatureCountMismatch, TokenLayout, register_adapter, split_batch, tokens_from_flat, video_counts
from .llava_next import LlavaNextAdapter


@register_adapter
class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    class_names = ("LlavaNextVideoForConditionalGeneration", "LlavaNextVideoModel")
    video_kwargs = ("pixel_values_videos_shape",)

    def vision_projectors(self):
        return [self.base.multi_modal_projector, self.base.vision_resampler]

    def video_unsupported(self) -> str | None:
        return None

    def video_layout(self, video_mask: torch.Tensor, forward_kwargs: dict, n_frames: int) -> TokenLayout:
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        stride = int(self.config.spatial_pool_stride)
        pooled = side // stride
        per_frame = pooled * pooled
        n_videos, frames = video_counts(video_mask, forward_kwargs, n_frames, per_frame)
        dev = video_mask.device
        cell = float(stride * vcfg.patch_size)
        r = torch.arange(pooled, device=dev).repeat_interleave(pooled)
        c = torch.arange(pooled, device=dev).repeat(pooled)
        box = torch.stack([r * cell, c * cell, (r + 1) * cell, (c + 1) * cell], -1).float()
        tokens = tokens_from_flat(
            video_mask, image=torch.arange(n_videos, device=dev).repeat_interleave(frames * per_frame),
            row=r.repeat(n_frames), col=c.repeat(n_frames), region=box.repeat(n_frames, 1),
        )
        tokens.video = torch.ones_like(tokens.prunable)
        tokens.frame = split_batch(torch.arange(frames, device=dev).repeat_interleave(per_frame).repeat(n_videos),
                                   video_mask)
        max_pool = self.config.spatial_pool_mode == "max"

        def pack(vit_map: torch.Tensor) -> torch.Tensor:
            if vit_map.shape[0] != n_frames:
                raise FeatureCountMismatch(f"a video map of {vit_map.shape[0]} frames for {n_frames} frames")
            grid = vit_map.float().reshape(n_frames, 1, side, side)
            pool = F.max_pool2d if max_pool else F.avg_pool2d
            return split_batch(pool(grid, stride, stride).reshape(-1), video_mask)

        return TokenLayout(tokens=tokens, pack=pack)
