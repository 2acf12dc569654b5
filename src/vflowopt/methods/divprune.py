"""DivPrune (Alvar et al., CVPR 2025): keep a maximally diverse subset of the projected visual tokens.

Diversity is the max–min (farthest-point) criterion on cosine distance d(i, j) = 1 − cos(x_i, x_j)
between the visual features as they enter the LLM (`ctx.features`):

    s_1     = argmax_i  min_{j≠i} d(i, j)           (the most isolated token)
    s_{t+1} = argmax_i  min_{j∈S_t} d(i, j)         (the token farthest from everything kept)

Every image keeps exactly round(B·n) of its n prunable tokens, selected among its own tokens (newline
and CLS tokens are not candidates and are always kept). No attention and no scores from the model are
needed. Cost: one pass of chunked similarities for s_1, then one matrix-vector product per kept token
(O(k·n·D)); memory O(chunk·n). Ties go to the earlier token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import keep_count
from ..registry import register_method
from .base import PrefillContext, PreLLMConfig, PruningMethod, Selection
from .common import image_groups, no_search_space


@dataclass
class DivPruneConfig(PreLLMConfig):
    """DivPrune. budget: fraction of every image's visual tokens kept; positions: "keep" the original
    position ids (default), or "compact" them as the official LLaVA code effectively does."""

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """None: DivPrune has no numeric hyper-parameter besides the budget."""
        raise no_search_space(cls.method or "divprune", "the selection is parameter-free")



def divprune_order(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Indices of the k tokens of `features` (n, D) chosen by greedy max–min cosine distance, in the
    order they were chosen."""
    n = features.shape[0]
    k = max(0, min(k, n))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=features.device)
    x = torch.nn.functional.normalize(features.float(), dim=-1)
    nearest = torch.empty(n, device=x.device)
    for s in range(0, n, chunk):
        sim = x[s : s + chunk] @ x.T
        rows = torch.arange(sim.shape[0], device=x.device)
        sim[rows, rows + s] = float("-inf")
        nearest[s : s + chunk] = 1.0 - sim.max(-1).values
    chosen = [int(torch.argmax(nearest))]
    min_dist = 1.0 - x @ x[chosen[0]]
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[chosen[0]] = True
    for _ in range(k - 1):
        i = int(torch.argmax(min_dist.masked_fill(taken, float("-inf"))))
        chosen.append(i)
        taken[i] = True
        min_dist = torch.minimum(min_dist, 1.0 - x @ x[i])
    return torch.tensor(chosen, dtype=torch.long, device=features.device)


class DivPruneMethod(PruningMethod):
    config_cls = DivPruneConfig

    def before_llm(self, ctx: PrefillContext) -> Selection:
        keep = ~ctx.layout.tokens.prunable
        for b, _, idx in image_groups(ctx):
            k = keep_count(idx.numel(), self.config.budget)
            if k >= idx.numel():
                keep[b, idx] = True
                continue
            keep[b, idx[divprune_order(ctx.features[b, idx], k)]] = True
        return Selection(keep=keep)


register_method("divprune", DivPruneConfig, DivPruneMethod)
