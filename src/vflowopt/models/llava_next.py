"""LLaVA-NeXT (LLaVA-1.6): CLIP ViT with CLS, anyres tiles with unpadding and newline tokens.

Like LLaVA-OneVision but without the anyres_max downscaling: every image is a base tile (grid 0, the
side×side patches of the resized image) followed by the unpadded crop grid (grid 1) with one newline
token per row. Maps are packed with the model's own `pack_image_features`, so they go through exactly
the same reshaping and unpadding as the features and align 1:1 with the visual tokens. CLS is dropped
by the "default" feature strategy (the method skips `vit_prefix_tokens` of the attention maps).
"""

from __future__ import annotations

import torch
from transformers.models.llava_next import modeling_llava_next as nxt

from ..errors import ConfigError
from .base import ModelAdapter, TokenLayout, register_adapter, split_batch, tokens_from_flat
from .llava import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    class_names = ("LlavaNextForConditionalGeneration", "LlavaNextModel")
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    image_kwargs = ("image_sizes",)

    @property
    def vit_prefix_tokens(self) -> int:
        return 1 if "clip" in self.config.vision_config.model_type else 0

    def _pack(self, chunks: list[torch.Tensor], image_sizes) -> list[torch.Tensor]:
        """(n_crops_i, side*side, C) per image -> (n_tokens_i, C); newline tokens are NaN."""
        newline = torch.full((chunks[0].shape[-1],), float("nan"), device=chunks[0].device)
        packed, _ = self.base.pack_image_features(
            chunks, image_sizes, self.config.vision_feature_select_strategy, image_newline=newline
        )
        return packed

    def layout(self, image_mask: torch.Tensor, forward_kwargs: dict, n_crops: int) -> TokenLayout:
        image_sizes = forward_kwargs.get("image_sizes")
        if image_sizes is None:
            raise ConfigError("LLaVA-NeXT pruning needs `image_sizes` (as the processor returns them)")
        vcfg = self.config.vision_config
        side = vcfg.image_size // vcfg.patch_size
        patch = vcfg.patch_size
        pinpoints = self.config.image_grid_pinpoints
        crops = [nxt.image_size_to_num_patches(size, pinpoints, vcfg.image_size) for size in image_sizes]
        if n_crops and sum(crops) != n_crops:
            raise ConfigError(
                f"the vision tower saw {n_crops} crops but image_sizes imply {sum(crops)}; "
                "pass the processor's outputs unchanged"
            )
        dev = image_mask.device

        # Geometry: pack each patch's (row, col) on its grid through the model's own packing.
        r = torch.arange(side, device=dev, dtype=torch.float32).repeat_interleave(side)
        c = torch.arange(side, device=dev, dtype=torch.float32).repeat(side)
        chunks = []
        for size, n in zip(image_sizes, crops):
            geo = [torch.stack([r, c], -1)]
            if n > 1:
                _, npw = nxt.get_anyres_image_grid_shape(size, pinpoints, vcfg.image_size)
                for k in range(n - 1):
                    i, j = divmod(k, npw)
                    geo.append(torch.stack([r + i * side, c + j * side], -1))
            chunks.append(torch.stack(geo))
        packed = self._pack(chunks, image_sizes)

        rows, cols, grids, prunable, images = [], [], [], [], []
        for img, (tok, n) in enumerate(zip(packed, crops)):
            is_nl = torch.isnan(tok[:, 0])
            nb = side * side
            grid = torch.zeros(tok.shape[0], dtype=torch.long, device=dev)
            grid[nb:] = 1 if n > 1 else 0
            row = torch.nan_to_num(tok[:, 0], nan=-1.0).long()
            col = torch.nan_to_num(tok[:, 1], nan=-1.0).long()
            rest = slice(nb, None)
            if n > 1:  # crop grid: rows/cols relative to the unpadded grid; newline = one column past it
                nl_rest = is_nl[rest]
                width = int(nl_rest.nonzero()[0, 0]) + 1
                height = (tok.shape[0] - nb) // width
                row[rest] = torch.arange(height, device=dev).repeat_interleave(width)
                col[rest] = torch.arange(width, device=dev).repeat(height)
            else:  # a single tile: one trailing newline after the base grid
                col[rest] = side
            rows.append(row)
            cols.append(col)
            grids.append(grid)
            prunable.append(~is_nl)
            images.append(torch.full((tok.shape[0],), img, dtype=torch.long, device=dev))
        canvas = torch.cat([t for t in packed])  # (row, col) in patch units on each grid's canvas
        region = torch.stack([canvas[:, 0], canvas[:, 1], canvas[:, 0] + 1, canvas[:, 1] + 1], -1) * patch
        region = torch.nan_to_num(region, nan=0.0)

        tokens = tokens_from_flat(
            image_mask, image=torch.cat(images), grid=torch.cat(grids), row=torch.cat(rows), col=torch.cat(cols),
            region=region, prunable=torch.cat(prunable),
        )

        def pack(vit_map: torch.Tensor) -> torch.Tensor:
            maps = vit_map.float().unsqueeze(-1)
            packed_map = self._pack(list(torch.split(maps, crops, dim=0)), image_sizes)
            return split_batch(torch.cat(packed_map)[:, 0], image_mask)

        return TokenLayout(tokens=tokens, pack=pack)
