"""Qwen-VL vision attention recomputed from a block's fused `qkv`, its vision RoPE and `cu_seqlens`.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL run their ViT on one flat sequence of patches (all images
concatenated) and attend only inside the segments given by `cu_seqlens` (one per image frame, or one
per window in Qwen2.5-VL's windowed blocks). The maps returned here are exactly the softmax that eager
attention computes inside each segment, assembled per image: an image's (N_i, N_i) map is
block-diagonal over its segments (a windowed block attends within windows only).
"""

from __future__ import annotations

import torch
from torch import nn


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def qwen_vision_attention_probs(
    attn: nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    image_lengths: list[int],
) -> list[torch.Tensor]:
    """Head-averaged attention (rows = queries) of a Qwen vision attention module, per image.

    hidden_states: (N, D) the attention's input (already normed), in the order the ViT runs.
    cu_seqlens: segment boundaries of this block; every segment lies inside one image.
    image_lengths: patches per image, in order (sum = N).
    Returns one (N_i, N_i) float32 map per image, in the ViT's order. Memory stays O(N_i²) per image:
    heads are accumulated one at a time.
    """
    n = hidden_states.shape[0]
    heads = attn.num_heads
    scale = float(attn.scaling)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    starts = [0]
    for length in image_lengths:
        starts.append(starts[-1] + int(length))
    if starts[-1] != n:
        raise ValueError(f"image lengths {image_lengths} do not add up to the {n} vision tokens")
    with torch.no_grad():
        q, k, _ = attn.qkv(hidden_states).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = (t.unsqueeze(-2).float() for t in position_embeddings)
        q, k = q.float(), k.float()
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        q, k = q.transpose(0, 1), k.transpose(0, 1)  # (H, N, d)
        maps = [torch.zeros(e - s, e - s, dtype=torch.float32, device=hidden_states.device)
                for s, e in zip(starts[:-1], starts[1:])]
        img = 0
        for s, e in zip(bounds[:-1], bounds[1:]):
            if e <= s:
                continue
            while starts[img + 1] <= s:
                img += 1
            if e > starts[img + 1]:
                raise ValueError("a vision attention segment spans two images")
            o = starts[img]
            block = maps[img][s - o : e - o, s - o : e - o]
            for h in range(heads):
                block += torch.softmax(q[h, s:e] @ k[h, s:e].T * scale, dim=-1)
            block /= heads
    return maps
