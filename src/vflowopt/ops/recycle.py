"""Token recycling (VFlowOpt eqs. 6-7): pruned tokens of each a×a grid cell fused into one token."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Recycled:
    keep: torch.Tensor  # (n,) bool: kept directly or as a recycled token
    replaced: torch.Tensor  # (n,) bool: positions that carry a fused token
    features: torch.Tensor  # (n, D): fused features where `replaced`, the input elsewhere


def grid_cells(grid: torch.Tensor, row: torch.Tensor, col: torch.Tensor, size: float,
               frame: torch.Tensor | None = None, frames_per_cell: int = 1) -> torch.Tensor:
    """Cell id of every token: (grid, floor(row/a), floor(col/a)), grids never share a cell; with video
    `frame`s, also floor(frame / frames_per_cell): a × a spatial cells per frame by default, a × a × n
    spatio-temporal cells with n frames per cell (0: all frames of the video in one cell)."""
    cr = torch.floor(row.double() / size).long()
    cc = torch.floor(col.double() / size).long()
    parts = [grid, cr, cc]
    if frame is not None and frames_per_cell > 0:
        parts.append(torch.div(frame, frames_per_cell, rounding_mode="floor"))
    key = torch.stack(parts, -1)
    return torch.unique(key, dim=0, return_inverse=True)[1]


def select_with_recycling(
    scores: torch.Tensor, cells: torch.Tensor, n_keep: int, features: torch.Tensor
) -> Recycled:
    """Keep exactly `n_keep` tokens counting recycled ones, ranking by `scores` (higher = kept).

    With k tokens kept directly, the pruned ones (ranks >= k) fill the cells whose least important
    member has rank >= k, so the total is f(k) = k + cells(k), which grows by 0 or 1 per step from
    f(0) = #cells to f(n) = n; we take the k with f(k) = n_keep. If n_keep < #cells, no token is
    kept directly and only the n_keep cells holding the most important tokens are recycled.
    Weights are the importances clamped at 0 (a negative entropy weight can make them negative);
    a cell whose weights sum to 0 is averaged uniformly, so no NaN can appear.
    """
    n = scores.numel()
    dev = scores.device
    keep = torch.zeros(n, dtype=torch.bool, device=dev)
    replaced = torch.zeros(n, dtype=torch.bool, device=dev)
    out = features.clone()
    if n_keep >= n:
        keep[:] = True
        return Recycled(keep, replaced, features)
    if n_keep <= 0:
        return Recycled(keep, replaced, features)
    safe = torch.nan_to_num(scores.float(), nan=float("-inf"))
    order = torch.argsort(safe, descending=True, stable=True)
    rank = torch.empty(n, dtype=torch.long, device=dev)
    rank[order] = torch.arange(n, device=dev)
    n_cells = int(cells.max()) + 1
    worst = torch.full((n_cells,), -1, dtype=torch.long, device=dev).scatter_reduce(0, cells, rank, "amax")
    # cells(k) = #{c : worst_c >= k} for k = 0..n
    hist = torch.bincount(worst, minlength=n + 1)
    cells_ge = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0])
    f = torch.arange(n + 1, device=dev) + cells_ge
    hits = (f == n_keep).nonzero()
    k = int(hits[0, 0]) if hits.numel() else 0
    keep[order[:k]] = True
    pruned = rank >= k
    # The most important pruned member of each cell receives the fused token.
    best = torch.full((n_cells,), n, dtype=torch.long, device=dev).scatter_reduce(
        0, cells[pruned], rank[pruned], "amin"
    )
    used = (best < n).nonzero().squeeze(-1)
    if k == 0 and used.numel() > n_keep:  # too few slots: recycle the cells with the best tokens
        used = used[torch.argsort(best[used], stable=True)[:n_keep]]
    in_used = torch.zeros(n_cells, dtype=torch.bool, device=dev)
    in_used[used] = True
    members = pruned & in_used[cells]
    w = torch.where(members, torch.nan_to_num(scores.float(), nan=0.0).clamp_min(0.0), torch.zeros_like(safe))
    wsum = torch.zeros(n_cells, device=dev).index_add_(0, cells, w)
    count = torch.zeros(n_cells, device=dev).index_add_(0, cells, members.float())
    uniform = wsum[cells] <= 0
    w = torch.where(uniform & members, torch.ones_like(w), w)
    denom = torch.where(wsum > 0, wsum, count)
    fused = torch.zeros(n_cells, features.shape[-1], dtype=torch.float32, device=dev)
    fused.index_add_(0, cells, w.unsqueeze(-1) * features.float())
    fused = fused / denom.clamp_min(1e-30).unsqueeze(-1)
    target = order[best[used]]
    keep[target] = True
    replaced[target] = True
    out[target] = fused[used].to(features.dtype)
    return Recycled(keep, replaced, out)
