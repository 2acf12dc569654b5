"""LLaVA-1.5 (LlavaForConditionalGeneration): CLIP ViT with CLS, one square patch grid per image."""

from __future__ import annotations

import torch

from .base import ModelAdapter, TokenLayout, grid_tokens, register_adapter, split_batch, tokens_from_flat

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@register_adapter
class LlavaAdapter(ModelAdapter):
    family = "llava"
    class_names = ("LlavaForConditionalGeneration", "LlavaModel")
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD

    @property
    def vit_prefix_tokens(self) -> int:
        # CLIP has a CLS token; SigLIP towers (used by some LLaVA checkpoints) do not.
        return 1 if "clip" in self.config.vision_config.model_type else 0

    def layout(self, image_mask: torch.Tensor, forward_kwargs: dict, n_crops: int) -> TokenLayout:
        side = self.config.vision_config.image_size // self.patch_size
        keeps_cls = self.config.vision_feature_select_strategy != "default" and self.vit_prefix_tokens
        per_image = side * side + (1 if keeps_cls else 0)
        dev = image_mask.device
        rows, cols, region = grid_tokens(n_crops, side, side, self.patch_size, dev)
        prunable = torch.ones(n_crops * side * side, dtype=torch.bool, device=dev)
        image = torch.arange(n_crops, device=dev).repeat_interleave(side * side)
        if keeps_cls:  # the CLS feature enters the LLM first: not prunable, not counted
            def with_cls(x: torch.Tensor, fill) -> torch.Tensor:
                x = x.reshape(n_crops, side * side, *x.shape[1:])
                pad = torch.full((n_crops, 1, *x.shape[2:]), fill, dtype=x.dtype, device=dev)
                return torch.cat([pad, x], 1).reshape(n_crops * per_image, *x.shape[2:])

            rows, cols, region = with_cls(rows, -1), with_cls(cols, -1), with_cls(region, 0.0)
            prunable = with_cls(prunable, False)
            image = torch.arange(n_crops, device=dev).repeat_interleave(per_image)
        tokens = tokens_from_flat(image_mask, image=image, row=rows, col=cols, region=region, prunable=prunable)

        def pack(vit_map: torch.Tensor) -> torch.Tensor:
            flat = vit_map.float()
            if keeps_cls:
                flat = torch.cat([torch.full_like(flat[:, :1], float("nan")), flat], 1)
            return split_batch(flat.reshape(-1), image_mask)

        return TokenLayout(tokens=tokens, pack=pack)
