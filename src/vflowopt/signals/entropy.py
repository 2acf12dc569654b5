"""Patch entropy of the de-normalised image in 8-bit grey levels (VFlowOpt eq. 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def grey_levels(pixel_values: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(B, 3, H, W) normalised pixels -> (B, H, W) integer grey levels 0..255 (mean of R, G, B).

    The official code skips de-normalisation and casts negative values to uint8; we undo the
    processor's normalisation first, as the paper describes.
    """
    px = pixel_values.detach().float()
    m = torch.tensor(mean, dtype=torch.float32, device=px.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=px.device).view(1, -1, 1, 1)
    rgb = (px * s + m).clamp(0.0, 1.0) * 255.0
    return rgb.mean(dim=1).round().clamp(0, 255).long()


def entropy_of_levels(levels: torch.Tensor) -> torch.Tensor:
    """(..., P) integer grey levels -> (...) Shannon entropy in nats over 256 bins."""
    flat = levels.reshape(-1, levels.shape[-1])
    counts = torch.zeros(flat.shape[0], 256, dtype=torch.float32, device=levels.device)
    counts.scatter_add_(1, flat, torch.ones_like(flat, dtype=torch.float32))
    p = counts / flat.shape[-1]
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(1e-30)), torch.zeros_like(p))
    return (-plogp.sum(-1)).reshape(levels.shape[:-1])


def patch_entropy(
    pixel_values: torch.Tensor, patch_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H//p * W//p) entropy per ViT patch, row-major like the ViT's tokens."""
    grey = grey_levels(pixel_values, mean, std)
    b, h, w = grey.shape
    gh, gw = h // patch_size, w // patch_size
    grey = grey[:, : gh * patch_size, : gw * patch_size]
    patches = grey.reshape(b, gh, patch_size, gw, patch_size).permute(0, 1, 3, 2, 4)
    patches = patches.reshape(b, gh * gw, patch_size * patch_size)
    return entropy_of_levels(patches)
