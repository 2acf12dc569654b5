"""Qwen3-VL: Qwen2-VL's layout (16 px patches, 2×2 merge, interleaved M-RoPE) plus deepstack.

Deepstack: features of some ViT blocks are added to the hidden states at the visual positions after
each of the first `len(deepstack_visual_indexes)` LLM layers. Pruning before the LLM therefore also
slices `visual_pos_masks` and the rows of `deepstack_visual_embeds`; pruning inside the LLM is only
allowed from layer `len(deepstack_visual_indexes)` on (`min_llm_prune_layer`; the runtime refuses an
earlier pruning layer with a ConfigError). Recycled tokens keep the deepstack rows of the kept token.
"""

from __future__ import annotations

import torch

from ..ops.sequence import gather_seq
from .base import register_adapter
from .qwen2_vl import QwenVLAdapter


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    family = "qwen3_vl"
    class_names = ("Qwen3VLForConditionalGeneration", "Qwen3VLModel")
    image_mean = (0.5, 0.5, 0.5)
    image_std = (0.5, 0.5, 0.5)

    @property
    def min_llm_prune_layer(self) -> int:
        return len(self.config.vision_config.deepstack_visual_indexes or [])

    def vision_projectors(self):
        visual = self.vision_tower
        return [visual.merger, *getattr(visual, "deepstack_merger_list", [])]

    def slice_llm_inputs(self, kwargs: dict, keep: torch.Tensor) -> None:
        visual = kwargs.get("visual_pos_masks")
        if visual is None:
            return
        kept = torch.zeros_like(visual, dtype=torch.bool)
        kept.scatter_(1, keep.to(visual.device), True)
        rows = kept[visual.bool()]  # one flag per deepstack row (visual tokens in flattened (B, L) order)
        kwargs["visual_pos_masks"] = gather_seq(visual, keep, 1)
        embeds = kwargs.get("deepstack_visual_embeds")
        if embeds is not None:
            kwargs["deepstack_visual_embeds"] = [e[rows.to(e.device)] for e in embeds]
