"""Random control (method name "random"): keep a seeded uniform random subset before the LLM.

Every image keeps exactly round(B·n) of its n prunable visual tokens, drawn uniformly without
replacement. The draw of an image depends only on `seed` and the image's index within its sample
(a CPU generator seeded with both), so it is reproducible across runs and devices, the same for every
prefill of the same layout, and the same for a sample alone or inside a batch. (The file is named
random_prune.py so that it cannot shadow the standard library's `random`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import keep_count
from ..config import PruneConfig
from ..errors import ConfigError
from ..models.base import ModelAdapter
from ..registry import register_method
from .base import PrefillContext, PruningMethod, Selection
from .common import image_groups, no_search_space, validate_pre_llm


@dataclass
class RandomConfig(PruneConfig):
    """Seeded random subset. budget: fraction of every image's visual tokens kept; seed: any
    non-negative integer; positions: "keep" the original position ids, or "compact" them."""

    budget: float | None = None
    seed: int = 0
    positions: str = "keep"

    def validate(self) -> None:
        validate_pre_llm(self)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """None: the seed is not a hyper-parameter worth searching (that would tune to noise)."""
        raise no_search_space(cls.method or "random", "optimizing the seed would only fit noise")

    def resolve(self, adapter: ModelAdapter) -> RandomConfig:
        self.validate()
        return self


def random_keep(n: int, k: int, seed: int, image: int) -> torch.Tensor:
    """(n,) bool CPU mask with exactly min(k, n) True, drawn from a generator seeded by (seed, image)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + image) % (2**63 - 1))
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.randperm(n, generator=gen)[: max(0, min(k, n))]] = True
    return keep


class RandomMethod(PruningMethod):
    config_cls = RandomConfig

    def before_llm(self, ctx: PrefillContext) -> Selection:
        keep = ~ctx.layout.tokens.prunable
        for b, img, idx in image_groups(ctx):
            k = keep_count(idx.numel(), self.config.budget)
            keep[b, idx] = random_keep(idx.numel(), k, self.config.seed, int(img)).to(keep.device)
        return Selection(keep=keep)


register_method("random", RandomConfig, RandomMethod)
