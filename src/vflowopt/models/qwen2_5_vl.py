"""Qwen2.5-VL: Qwen2-VL's layout, but the ViT runs in window order with full attention only in the
blocks `fullatt_block_indexes` (windowed attention elsewhere).

The scored block defaults to the last full-attention block (`feature_layer()`; configurable through
`vision_layer`, where a windowed block gives a per-image map that is block-diagonal over its windows).
Maps are un-permuted from window order to image order with the ViT's own `window_index`
(argsort, as the model does after its merger), so they line up with the patches and the tokens.
"""

from __future__ import annotations

import torch
from transformers.vision_utils import get_vision_window_index

from .base import register_adapter
from .qwen2_vl import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, QwenVLAdapter


@register_adapter
class Qwen2_5_VLAdapter(QwenVLAdapter):
    family = "qwen2_5_vl"
    class_names = ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel")
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD

    def feature_layer(self) -> int:
        full = list(self.config.vision_config.fullatt_block_indexes or [])
        return max(full) if full else len(self.vision_layers) - 1

    def window_index(self) -> torch.Tensor:
        """Merged-token window order of the last vision pass (transformers' own computation)."""
        vcfg = self.config.vision_config
        index, _ = get_vision_window_index(
            self._grid_thw, spatial_merge_size=vcfg.spatial_merge_size, window_size=vcfg.window_size,
            patch_size=vcfg.patch_size,
        )
        return index

    def _image_order(self) -> list[torch.Tensor]:
        group = self.merge_size**2
        window = self.window_index()
        # running position j holds patch running_to_patch[j]
        running_to_patch = (window.view(-1, 1) * group + torch.arange(group)).reshape(-1)
        order, start = [], 0
        for length in self._image_lengths():
            local = running_to_patch[start : start + length] - start
            order.append(torch.argsort(local))  # image-order patch p sits at running position order[p]
            start += length
        return order
