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

from ..errors import ConfigError
from ..registry import register_method
from .base import PrefillContext, PreLLMConfig, ScorerMethod
from .common import image_groups, no_search_space


@dataclass
class RandomConfig(PreLLMConfig):
    """Seeded random subset. budget: fraction of every image's visual tokens kept; seed: any
    non-negative integer; positions: "keep" the original position ids, or "compact" them."""

    seed: int = 0

    def validate(self) -> None:
        super().validate()
        if self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """None: the seed is not a hyper-parameter worth searching (that would tune to noise)."""
        raise no_search_space(cls.method or "random", "optimizing the seed would only fit noise")



def random_scores(n: int, seed: int, image: int) -> torch.Tensor:
    """(n,) CPU scores whose top k are exactly the first k of one seeded permutation, for every k: the rank
    of each token in a permutation drawn from a generator seeded by (seed, image)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + image) % (2**63 - 1))
    scores = torch.empty(n)
    scores[torch.randperm(n, generator=gen)] = torch.arange(n, 0, -1, dtype=torch.float32)
    return scores


def random_keep(n: int, k: int, seed: int, image: int) -> torch.Tensor:
    """(n,) bool CPU mask with exactly min(k, n) True: the first k of the seeded permutation."""
    keep = torch.zeros(n, dtype=torch.bool)
    keep[torch.argsort(random_scores(n, seed, image), descending=True)[: max(0, min(k, n))]] = True
    return keep


class RandomMethod(ScorerMethod):
    def score(self, ctx: PrefillContext) -> torch.Tensor:
        scores = torch.zeros(ctx.layout.tokens.prunable.shape, dtype=torch.float32)
        for b, img, idx in image_groups(ctx):
            scores[b, idx.cpu()] = random_scores(idx.numel(), self.config.seed, int(img))
        return scores.to(ctx.layout.tokens.prunable.device)


register_method("random", RandomConfig, RandomMethod)
