"""Removing tokens from everything that is indexed by sequence position."""

from __future__ import annotations

import torch

from ..errors import PruningError


def gather_seq(x: torch.Tensor, index: torch.Tensor, dim: int, batch_dim: int = 0) -> torch.Tensor:
    """Entries `index` (B, S) of `x` along `dim`, per sample along `batch_dim`.

    A batch dim of size 1 is broadcast to B (positions and rotary tables are often shared).
    """
    b, s = index.shape
    dim = dim % x.dim()
    bdim = batch_dim % x.dim()
    if x.shape[bdim] == 1 and b > 1:
        x = x.expand(*x.shape[:bdim], b, *x.shape[bdim + 1 :])
    shape = [1] * x.dim()
    shape[bdim], shape[dim] = b, s
    idx = index.to(x.device).view(shape).expand(*x.shape[:dim], s, *x.shape[dim + 1 :])
    return torch.gather(x, dim, idx)


def gather_mask(mask: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor) -> torch.Tensor:
    """Slice a (B|1, H|1, Q, K) attention mask: query rows `rows` (None = all) and key columns `cols`."""
    out = gather_seq(mask, cols, -1)
    if rows is not None:
        out = gather_seq(out, rows, -2)
    return out


def positions_after_drop(positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Compact renumbering: each kept position minus the number of dropped tokens before it.

    positions (..., B, L) of the full sequence, keep (B, S) sorted indices into L.
    """
    b, length = keep.shape[0], positions.shape[-1]
    kept = torch.zeros(b, length, dtype=torch.long, device=keep.device)
    kept.scatter_(1, keep, 1)
    dropped_before = torch.cumsum(1 - kept, dim=1)
    gathered = gather_seq(positions, keep, -1, batch_dim=-2)
    shift = torch.gather(dropped_before, 1, keep)
    return gathered - shift.to(gathered.device)


def complement_keep(length: int, drop: torch.Tensor, batch: int) -> torch.Tensor:
    """Sorted kept indices (B, S) given a (B, length) bool drop mask with equal counts per row."""
    keep = ~drop
    counts = keep.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise PruningError(
            "vflowopt: samples of this batch would keep different numbers of tokens "
            f"({counts.tolist()}); batched pruning needs equal counts — run them one at a time"
        )
    return keep.nonzero()[:, 1].view(batch, int(counts[0]))
