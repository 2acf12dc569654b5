"""LLaVA-OneVision: SigLIP (no CLS), anyres_max_9 packing with unpadding, downscaling and newlines.

Maps are packed with the model's own `pack_image_features`, so they go through exactly the same
reshaping, unpadding and bilinear resizing as the features and align 1:1 with the visual tokens.

Videos: every frame is one crop through the vision tower; the model pools each frame's grid 2×2
(bilinear, `apply_pooling`) and appends one newline per video. Video maps go through the same
`apply_pooling`, so they align 1:1 with the video tokens too.
"""

from __future__ import annotations

import math

import torch
from transformers.models.llava_onevision import modeling_llava_onevision as ov

from ..errors import PruningError
from .base import FeatureCountMismatch, ModelAdapter, TokenLayout, register_adapter, split_batch, tokens_from_flat


@register_adapter
class LlavaOnevisionAdapter(ModelAdapter):
    family = "llava_onevision"
    class_names = ("LlavaOnevisionForConditionalGeneration", "LlavaOnevisionModel")
    image_kwargs = ("image_sizes", "batch_num_images")

    def _num_crops(self, image_sizes, batch_num_images) -> list[int]:
        # Same rule as LlavaOnevisionModel.get_image_features: multi-image samples are not tiled.
        if batch_num_images is None:
            tiled = [True] * len(image_sizes)
        else:
            tiled = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        vcfg = self.config.vision_config
        return [
            ov.image_size_to_num_patches(size, self.config.image_grid_pinpoints, vcfg.image_size) if t else 1
            for size, t in zip(image_sizes, tiled)
        ]

    def layout(self, image_mask: torch.Tensor, forward_kwargs: dict, n_crops: int) -> TokenLayout:
        image_sizes = forward_kwargs.get("image_sizes")
        if image_sizes is None:
            raise PruningError("LLaVA-OneVision pruning needs `image_sizes` (as the processor returns them)")
        crops = self._num_crops(image_sizes, forward_kwargs.get("batch_num_images"))
        if sum(crops) != n_crops:
            raise PruningError(
                f"the vision tower saw {n_crops} crops but image_sizes imply {sum(crops)}; "
                "pass the processor's outputs unchanged"
            )
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        dev = image_mask.device
        aspect = getattr(self.config, "vision_aspect_ratio", "anyres_max_9")

        def pack_channels(maps: torch.Tensor) -> list[torch.Tensor]:
            """(n_crops, side*side, C) -> per image (n_tokens, C); newline rows are NaN."""
            chunks = torch.split(maps, crops, dim=0)
            newline = torch.full((maps.shape[-1],), float("nan"), device=maps.device)
            packed, _ = self.base.pack_image_features(
                list(chunks), image_sizes, image_newline=newline, vision_aspect_ratio=aspect
            )
            return packed

        # Geometry: pack (y, x) patch centres in canvas coordinates (patch units).
        r = torch.arange(side, device=dev, dtype=torch.float32).repeat_interleave(side) + 0.5
        c = torch.arange(side, device=dev, dtype=torch.float32).repeat(side) + 0.5
        geo = []
        for size, n in zip(image_sizes, crops):
            npw = 1
            if n > 1:
                _, npw = ov.get_anyres_image_grid_shape(size, self.config.image_grid_pinpoints, vcfg.image_size)
            for k in range(n):
                i, j = (0, 0) if k == 0 else divmod(k - 1, npw)
                geo.append(torch.stack([r + i * side, c + j * side], -1))
        packed = pack_channels(torch.stack(geo))

        rows, cols, regions, grids, prunable, images = [], [], [], [], [], []
        for img, (tok, n) in enumerate(zip(packed, crops)):
            is_nl = torch.isnan(tok[:, 0])
            nb = side * side if n > 1 else tok.shape[0] - 1  # base grid tokens
            base_r = torch.arange(side, device=dev).repeat_interleave(side)
            base_c = torch.arange(side, device=dev).repeat(side)
            row = [base_r[:nb]]
            col = [base_c[:nb]]
            reg = [_boxes(tok[:nb], vcfg.patch_size, 1.0)]
            grid = [torch.zeros(nb, dtype=torch.long, device=dev)]
            rest = tok[nb:]
            nl_rest = is_nl[nb:]
            if n > 1:
                width = int(nl_rest.nonzero()[0, 0]) + 1  # crop-grid columns + the newline column
                height = rest.shape[0] // width
                gr = torch.arange(height, device=dev).repeat_interleave(width)
                gc = torch.arange(width, device=dev).repeat(height)
                ys = rest[~nl_rest, 0]
                step = float((ys.max() - ys.min()) / (height - 1)) if height > 1 else 1.0
                row.append(gr)
                col.append(gc)
                reg.append(_boxes(rest, vcfg.patch_size, step))
                grid.append(torch.ones(rest.shape[0], dtype=torch.long, device=dev))
            else:  # one trailing newline after the base grid
                row.append(torch.full((1,), -1, device=dev))
                col.append(torch.full((1,), side, device=dev))
                reg.append(torch.zeros(1, 4, device=dev))
                grid.append(torch.zeros(1, dtype=torch.long, device=dev))
            rows.append(torch.cat(row))
            cols.append(torch.cat(col))
            regions.append(torch.nan_to_num(torch.cat(reg), nan=0.0))
            grids.append(torch.cat(grid))
            prunable.append(~is_nl)
            images.append(torch.full((tok.shape[0],), img, dtype=torch.long, device=dev))

        tokens = tokens_from_flat(
            image_mask, image=torch.cat(images), grid=torch.cat(grids), row=torch.cat(rows), col=torch.cat(cols),
            region=torch.cat(regions), prunable=torch.cat(prunable),
        )

        def pack(vit_map: torch.Tensor) -> torch.Tensor:
            packed_map = pack_channels(vit_map.float().unsqueeze(-1))
            return split_batch(torch.cat(packed_map)[:, 0], image_mask)

        return TokenLayout(tokens=tokens, pack=pack)

    # -- video ------------------------------------------------------------------------------------
    def video_unsupported(self) -> str | None:
        return None

    def video_layout(self, video_mask: torch.Tensor, forward_kwargs: dict, n_frames: int) -> TokenLayout:
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        pooled = math.ceil(side / 2)
        per_frame = pooled * pooled
        total = int(video_mask.sum())
        n_videos = total - n_frames * per_frame  # each video: its frames' pooled tokens + one newline
        if n_frames <= 0 or n_videos <= 0 or n_frames % n_videos:
            raise FeatureCountMismatch(
                f"the video pass saw {n_frames} frames, which do not match the {total} video placeholders "
                f"({per_frame} tokens per frame plus one newline per video)"
            )
        frames = n_frames // n_videos
        dev = video_mask.device
        cell = vcfg.image_size / pooled  # pixels of a frame behind one pooled token
        r = torch.arange(pooled, device=dev).repeat_interleave(pooled)
        c = torch.arange(pooled, device=dev).repeat(pooled)
        box = torch.stack([r * cell, c * cell, (r + 1) * cell, (c + 1) * cell], -1).float()
        one = {
            "row": torch.cat([r.repeat(frames), torch.full((1,), -1, device=dev)]),
            "col": torch.cat([c.repeat(frames), torch.full((1,), pooled, device=dev)]),
            "region": torch.cat([box.repeat(frames, 1), torch.zeros(1, 4, device=dev)]),
            "frame": torch.cat([torch.arange(frames, device=dev).repeat_interleave(per_frame),
                                torch.full((1,), frames - 1, device=dev)]),
            "prunable": torch.cat([torch.ones(frames * per_frame, dtype=torch.bool, device=dev),
                                   torch.zeros(1, dtype=torch.bool, device=dev)]),
        }
        n = frames * per_frame + 1
        image = torch.arange(n_videos, device=dev).repeat_interleave(n)
        tokens = tokens_from_flat(video_mask, image=image, row=one["row"].repeat(n_videos),
                                  col=one["col"].repeat(n_videos), region=one["region"].repeat(n_videos, 1),
                                  prunable=one["prunable"].repeat(n_videos))
        tokens.video = torch.ones_like(tokens.prunable)
        tokens.frame = split_batch(one["frame"].repeat(n_videos), video_mask)

        def pack(vit_map: torch.Tensor) -> torch.Tensor:
            if vit_map.shape[0] != n_frames:
                raise FeatureCountMismatch(f"a video map of {vit_map.shape[0]} frames for {n_frames} frames")
            pooled_map = self.base.apply_pooling(vit_map.float().reshape(n_frames, side * side, 1))[..., 0]
            per_video = pooled_map.reshape(n_videos, frames * per_frame)
            newline = torch.full((n_videos, 1), float("nan"), device=per_video.device)
            return split_batch(torch.cat([per_video, newline], 1).reshape(-1), video_mask)

        return TokenLayout(tokens=tokens, pack=pack)


def _boxes(centres: torch.Tensor, patch: int, step: float) -> torch.Tensor:
    """(n, 2) centres in patch units -> (n, 4) pixel boxes (y0, x0, y1, x1) of side step·patch."""
    half = 0.5 * step
    y, x = centres[:, 0], centres[:, 1]
    return torch.stack([y - half, x - half, y + half, x + half], -1) * patch
