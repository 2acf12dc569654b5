"""Attention probabilities recomputed from a layer's own q/k projections.

The model keeps its attention implementation (sdpa by default, which returns no weights); methods
that need scores get them here, exactly as eager attention would compute them.
"""

from __future__ import annotations

import torch
from torch import nn


def vision_attention_probs(attn: nn.Module, hidden_states: torch.Tensor, chunk: int = 1) -> torch.Tensor:
    """Head-averaged softmax(q·kᵀ·scale) of a CLIP/SigLIP-style attention module, shape (B, N, N).

    Rows are queries, columns keys. Computed in float32, `chunk` images at a time so memory stays
    O(chunk·heads·N²) even for many anyres crops.
    """
    heads = attn.num_heads
    head_dim = attn.head_dim
    scale = float(attn.scale)
    out = []
    with torch.no_grad():
        for start in range(0, hidden_states.shape[0], chunk):
            h = hidden_states[start : start + chunk]
            b, n, _ = h.shape
            q = attn.q_proj(h).view(b, n, heads, head_dim).transpose(1, 2).float()
            k = attn.k_proj(h).view(b, n, heads, head_dim).transpose(1, 2).float()
            probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1)
            out.append(probs.mean(dim=1))
    return torch.cat(out, dim=0)
