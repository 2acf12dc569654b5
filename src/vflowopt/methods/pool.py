"""Pooling control: 2-D average pooling of each token grid down to the budget, before the LLM.

Every image keeps exactly round(B·n) of its n prunable visual tokens. The count is shared between the
image's token grids (the base grid and, for anyres models, the crop grid; `tokens.grid`) in
proportion to their sizes (largest remainder), and each grid of h×w tokens is cut into exactly k
non-overlapping windows that are as square as the count allows:

* oh = round(sqrt(k·h/w)) horizontal bands (clamped to [ceil(k/w), min(h, k)]), band i holding the
  rows r with floor(r·oh/h) = i;
* band i is cut into c_i = floor((i+1)·k/oh) − floor(i·k/oh) column bins (Σ c_i = k, c_i <= w), the
  column c going to bin floor(c·c_i/w).

So a window is about sqrt(n/k) tokens on a side (e.g. 576 tokens at budget 1/9: 64 windows of 3×3).
A window's tokens are averaged into one token placed at the window member nearest the window's
centroid (ties: the earlier token), so the positions that stay are original ones. A grid that is not
a full rectangle cannot leave a window empty: the largest windows are then split until there are k.
A window of one token keeps that token unchanged, so budget 1.0 is the identity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import keep_count
from ..registry import register_method
from .base import PrefillContext, PreLLMConfig, PruningMethod, Selection
from .common import apportion, image_groups, no_search_space


@dataclass
class PoolConfig(PreLLMConfig):
    """2-D average pooling control. budget: fraction of every image's visual tokens kept (all of them
    pooled windows); positions: "keep" the original position ids, or "compact" them."""

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """None: pooling has no numeric hyper-parameter besides the budget (the window follows from it)."""
        raise no_search_space(cls.method or "pool", "the window size follows from the budget")



# -- helpers shared by the pre-LLM baselines --------------------------------------------------------
# -- pooling ---------------------------------------------------------------------------------------
def pool_windows(row: torch.Tensor, col: torch.Tensor, k: int) -> torch.Tensor:
    """Window id in [0, k) of every token of one grid (see the module docstring), exactly k windows."""
    n = row.numel()
    if k >= n:
        return torch.arange(n, device=row.device)
    if k <= 1:
        return torch.zeros(n, dtype=torch.long, device=row.device)
    r = (row - row.min()).long()
    c = (col - col.min()).long()
    h, w = int(r.max()) + 1, int(c.max()) + 1
    oh = int(round(math.sqrt(k * h / w)))
    oh = max(math.ceil(k / w), min(oh, h, k))
    oh = max(1, min(oh, h, k))
    band = (r * oh) // h
    starts = torch.tensor([(i * k) // oh for i in range(oh + 1)], device=row.device)
    per_band = starts[1:] - starts[:-1]
    window = starts[band] + (c * per_band[band]) // w
    window = torch.unique(window, return_inverse=True)[1]
    while int(window.max()) + 1 < k:  # holes left a window empty: split the largest one in two
        sizes = torch.bincount(window)
        big = int(torch.argmax(sizes))
        members = (window == big).nonzero().squeeze(-1)
        window[members[: members.numel() // 2]] = int(window.max()) + 1
    return window


def pool_grid(row: torch.Tensor, col: torch.Tensor, features: torch.Tensor, k: int):
    """Average-pool one grid to k tokens: (keep, replaced, features) over its n tokens."""
    n = row.numel()
    window = pool_windows(row, col, k)
    keep = torch.zeros(n, dtype=torch.bool, device=row.device)
    replaced = torch.zeros_like(keep)
    out = features.clone()
    if k >= n:
        keep[:] = True
        return keep, replaced, out
    if k <= 0:
        return keep, replaced, out
    count = torch.bincount(window, minlength=k).float()
    pos = torch.stack([row, col], -1).float()
    centre = torch.zeros(k, 2, device=row.device).index_add_(0, window, pos) / count[:, None]
    dist = ((pos - centre[window]) ** 2).sum(-1)
    # nearest member to each window's centroid; ties to the earlier token (stable sort)
    order = torch.argsort(dist, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=row.device)
    best = torch.full((k,), n, dtype=torch.long, device=row.device).scatter_reduce(0, window, rank, "amin")
    target = torch.sort(order[best]).values
    mean = torch.zeros(k, features.shape[-1], dtype=torch.float32, device=features.device)
    mean.index_add_(0, window.to(features.device), features.float())
    mean /= count.to(features.device)[:, None]
    keep[target] = True
    multi = count[window[target]] > 1
    replaced[target[multi]] = True
    out[target[multi]] = mean[window[target[multi]]].to(features.dtype)
    return keep, replaced, out


class PoolMethod(PruningMethod):
    config_cls = PoolConfig

    def before_llm(self, ctx: PrefillContext) -> Selection:
        tokens = ctx.layout.tokens
        keep = ~tokens.prunable
        replaced = torch.zeros_like(keep)
        features = ctx.features.clone()
        for b, _, idx in image_groups(ctx):
            n_keep = keep_count(idx.numel(), self.config.budget)
            # one 2-D grid per (token grid, frame): a video is pooled frame by frame
            grids = tokens.grid[b, idx] * (int(tokens.frame[b].max()) + 1) + tokens.frame[b, idx]
            ids = grids.unique().tolist()
            sizes = [int((grids == g).sum()) for g in ids]
            for g, k in zip(ids, apportion(sizes, n_keep)):
                sub = idx[grids == g]
                kp, rp, ft = pool_grid(tokens.row[b, sub], tokens.col[b, sub], ctx.features[b, sub], k)
                keep[b, sub] = kp
                replaced[b, sub] = rp
                features[b, sub] = ft
        if not bool(replaced.any()):
            return Selection(keep=keep)
        return Selection(keep=keep, features=features, replaced=replaced)


register_method("pool", PoolConfig, PoolMethod)
