"""TrimTokenator (papers/trimtokenator.md, section 4): text-conditioned pruning once, before the LLM.

Stage 1, cross-modal alignment (eqs. 3-4): each projected visual token x_i^v gets
    α_i = −(1/M) Σ_j ‖x_i^v − x_j^t‖₂
over the M text tokens of the prompt (their input embeddings: every non-image, non-padding position of
the prompt as it enters the LLM), and the N1 = ⌊stage1_ratio·N⌋ best-aligned tokens survive.
Stage 2, greedy RepMax (eqs. 8-16): on the cosine-similarity matrix C of the survivors the seed is the
token with the lowest mean similarity to all of them; then, N2 − 1 times, the remaining token with the
lowest mean similarity to the selected set is added, the accumulated similarity σ ← σ + C[s] being
updated incrementally (O(N1·N2) after one matrix product).

Budget: the method prunes once before the LLM, so R̄ = N2/N; N2 = round(budget·N) per image (each image
of a sample is ranked on its own and keeps its share). Newline tokens are not visual tokens for the
budget and are always kept. No official code exists (reference/seeds.md §3): the paper is the spec.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..budget import keep_count
from ..config import PruneConfig, check_fraction
from ..errors import ConfigError
from ..models.base import ModelAdapter
from ..registry import register_method
from ..spaces import Candidate, Dim, SearchSpace
from .base import PrefillContext, PruningMethod, Selection

DEFAULT_STAGE1_RATIO = 0.8  # N1 = ⌊0.8·N⌋ (paper, appendix E)


@dataclass
class TrimTokenatorConfig(PruneConfig):
    """TrimTokenator. budget: fraction N2/N of the visual tokens kept (= R̄, pruning once before the LLM).

    stage1_ratio: N1/N kept by the cross-modal alignment stage (N1 = ⌊stage1_ratio·N⌋, raised to N2
    when the budget is larger).
    """

    budget: float | None = None
    stage1_ratio: float = DEFAULT_STAGE1_RATIO

    def validate(self) -> None:
        super().validate()
        if self.budget is None:
            raise ConfigError("TrimTokenatorConfig needs a budget in (0, 1]")
        check_fraction("stage1_ratio", self.stage1_ratio, allow_zero=False)

    def resolve(self, adapter: ModelAdapter) -> TrimTokenatorConfig:
        self.validate()
        return replace(self, stage1_ratio=float(self.stage1_ratio), model_family=adapter.family,
                       num_layers=adapter.num_llm_layers)

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """stage1_ratio ∈ [max(B, 0.5), 1] (the paper tests 0.7-0.9); below B it would have no effect."""
        check_fraction("budget", budget, allow_zero=False)
        lo = min(1.0, max(float(budget), 0.5))
        dims = (Dim("stage1_ratio", lo, 1.0, help="fraction N1/N kept by cross-modal alignment"),)

        def build(p) -> Candidate:
            return Candidate(fields={"stage1_ratio": float(p["stage1_ratio"])})

        return SearchSpace(method=cls.method or "trimtokenator", budget=float(budget), dims=dims, build=build,
                           description="N2 = budget·N fixed; N1 searched")


def alignment_scores(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """α_i = −(1/M) Σ_j ‖v_i − t_j‖₂ for visual (N, D) and text (M, D): (N,) float32."""
    if text.shape[0] == 0:
        return torch.zeros(visual.shape[0], dtype=torch.float32, device=visual.device)
    return -torch.cdist(visual.float()[None], text.float()[None])[0].mean(dim=-1)


def cosine_matrix(x: torch.Tensor) -> torch.Tensor:
    """C_ij = x_i·x_j / (‖x_i‖‖x_j‖) in float32 (zero vectors have similarity 0 to everything)."""
    x = x.float()
    unit = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return unit @ unit.T


def greedy_repmax(x: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices (in selection order) of the N2 = n_keep tokens Greedy RepMax picks from x (N1, D).

    Seed: argmin of the mean similarity to all tokens (eq. 9-10); then each step adds the remaining
    token with the lowest mean similarity to the selected set (eqs. 13-16). Ties go to the lower index.
    """
    n = x.shape[0]
    n_keep = min(int(n_keep), n)
    if n_keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    c = cosine_matrix(x)
    seed = int(torch.argmin(c.mean(dim=1)))
    chosen = [seed]
    sigma = c[seed].clone()  # accumulated similarity to the selected set (eq. 12)
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    taken[seed] = True
    for _ in range(1, n_keep):
        # argmin of σ/(t−1) over the remaining set is argmin of σ (eq. 13-14)
        s = int(torch.argmin(sigma.masked_fill(taken, math.inf)))
        chosen.append(s)
        taken[s] = True
        sigma += c[s]  # eq. 16
    return torch.tensor(chosen, dtype=torch.long, device=x.device)


def trim_select(visual: torch.Tensor, text: torch.Tensor, n1: int, n2: int) -> torch.Tensor:
    """Both stages on one image: (N,) bool keep mask over its N visual tokens."""
    n = visual.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=visual.device)
    n2 = min(n2, n)
    n1 = min(n, max(n1, n2))
    if n2 >= n:
        keep[:] = True
        return keep
    if n2 <= 0:
        return keep
    alpha = alignment_scores(visual, text)
    stage1 = torch.argsort(alpha, descending=True, stable=True)[:n1]
    stage1 = torch.sort(stage1).values  # spatial order, so RepMax ties resolve by position
    picked = greedy_repmax(visual[stage1], n2)
    keep[stage1[picked]] = True
    return keep


class TrimTokenatorMethod(PruningMethod):
    config_cls = TrimTokenatorConfig

    def before_llm(self, ctx: PrefillContext) -> Selection:
        if ctx.embeds is None:
            raise RuntimeError("trimtokenator: the prompt embeddings were not passed to the method")
        tokens = ctx.layout.tokens
        keep = ~tokens.prunable
        text_mask = ~ctx.image_mask.to(ctx.embeds.device)
        if ctx.attention_mask is not None:
            text_mask = text_mask & ctx.attention_mask.to(text_mask.device).bool()
        budget = float(self.config.budget)
        for b in range(tokens.batch_size):
            text = ctx.embeds[b][text_mask[b]]
            for img in tokens.image[b].unique().tolist():
                idx = ((tokens.image[b] == img) & tokens.prunable[b]).nonzero().squeeze(-1)
                n = idx.numel()
                n2 = keep_count(n, budget)
                n1 = int(math.floor(self.config.stage1_ratio * n + 1e-9))
                keep[b, idx] = trim_select(ctx.features[b, idx], text, n1, n2)
        return Selection(keep=keep)


register_method("trimtokenator", TrimTokenatorConfig, TrimTokenatorMethod)
