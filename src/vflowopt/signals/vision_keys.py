"""Head-averaged attention keys of one vision-encoder layer, recomputed from that layer's input.

VisionZip merges its contextual tokens by the cosine similarity of the keys of the layer it scores
(ToMe's metric). The runtime's vision-attention hook hands methods the attention *probabilities*;
the keys come from the same forward inputs through the layer's own key projection:

* CLIP / SigLIP (`k_proj`): keys (n_crops, N, head_dim), CLS included when the tower has one;
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL (fused `qkv`): one (N_i, head_dim) tensor per image, in image
  order (Qwen2.5-VL's window order undone with the adapter's own permutation). The keys are taken
  before the vision RoPE, so the similarity compares content, not position.

Keys are averaged over heads (as ToMe and VisionZip do) and returned in float32. Maps shaped like the
attention maps pack onto the visual tokens with `layout.pack`, one channel at a time (`pack_vectors`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:  # annotations only: signals never import the model adapters at run time
    from ..models.base import ModelAdapter, TokenLayout, VitMaps


def vision_keys(adapter: ModelAdapter, attn: nn.Module, args: tuple, kwargs: dict) -> VitMaps:
    """Head-averaged keys of the vision attention module `attn`, from its forward inputs."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden is None:
        raise ValueError("vision_keys: the attention call carried no hidden_states")
    with torch.no_grad():
        if hasattr(attn, "k_proj"):  # CLIP / SigLIP: (n_crops, N, D)
            b, n, _ = hidden.shape
            return attn.k_proj(hidden).view(b, n, attn.num_heads, -1).float().mean(2)
        if hasattr(attn, "qkv"):  # Qwen-VL: (N, D) over all images, in the ViT's running order
            n = hidden.shape[0]
            k = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1)[:, 1].float().mean(1)
            lengths = adapter._image_lengths()
            per_image = list(torch.split(k, lengths))
            order = adapter._image_order()
            if order is not None:
                per_image = [x[o.to(x.device)] for x, o in zip(per_image, order)]
            return per_image
    raise ValueError(f"vision_keys: unsupported vision attention module {type(attn).__name__}")


def strip_prefix(maps: VitMaps, prefix: int) -> VitMaps:
    """Drop the first `prefix` ViT tokens (CLS) of tensor maps; per-image lists have none."""
    if torch.is_tensor(maps) and prefix:
        return maps[:, prefix:]
    return maps


def pack_vectors(layout: TokenLayout, maps: VitMaps) -> torch.Tensor:
    """(n_crops, n_patches, C) or per-image (N_i, C) ViT-level vectors -> (B, Nv, C) on the visual
    tokens, through the adapter's own packing (unpadding, pooling, resizing), one channel at a time.
    Non-prunable tokens (newline, CLS) get NaN."""
    if torch.is_tensor(maps):
        channels = maps.shape[-1]
        return torch.stack([layout.pack(maps[..., c]) for c in range(channels)], -1)
    channels = maps[0].shape[-1]
    return torch.stack([layout.pack([m[:, c] for m in maps]) for c in range(channels)], -1)
