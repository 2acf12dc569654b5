"""CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token
Pruning in MLLMs", arXiv 2506.10967, NeurIPS 2025): keep the visual tokens that maximise the determinant
of an instruction-conditioned similarity kernel, once, before the LLM (docs/methods/cdpruner.md).

Per image, over its n prunable tokens with projected features x_i (`ctx.features`):

    S_ij = cos(x_i, x_j)                                   (similarity of the visual tokens)
    r_i  = (1/M) Σ_m cos(x_i, t_m)                         (relevance to the M text tokens t_m)
    r̃_i  = (r_i − min r + 1e-6) / (max r − min r)          (min-max normalised, as the official code)
    w_i  = r̃_i                   (theta=None, the official default)
         = exp(α·r̃_i), α = θ/(2(1−θ))    (theta=θ, the weighting the official code leaves commented out)
    L    = diag(w) · S · diag(w)

and the kept set is the greedy MAP of the DPP with kernel L: k = keep_count(n, budget) times, the token
that most increases log det L_Y is added. The gains come from the incremental Cholesky update of
Chen et al. (NeurIPS 2018) that the paper uses: with d_i² = L_ii and empty vectors c_i, after picking j

    e_i = (L_ji − ⟨c_j, c_i⟩) / d_j,   c_i ← [c_i, e_i],   d_i² ← d_i² − e_i²

so d_i² is exactly det L_{Y∪{i}} / det L_Y; L's rows are built on the fly (w_j·w·(X̂ x̂_j)), never the
n×n matrix: O(k·n·D + k²·n) time, O(k·n) memory.

Departures (details in the doc): no CLIP text encoder exists in a stock HF model, so the relevance
compares the projected visual features with the LLM input embeddings of the prompt's text tokens (the
official code: CLIP image embeddings vs the CLIP text embedding of the question, negated); normalisation
and selection per image of each sample (official: over the whole batch tensor, per crop for anyres); and
once a round of greedy picks has exhausted the kernel's rank (every remaining d_i² numerically zero,
which happens whenever k exceeds the feature dimension), a new round starts over the remaining tokens
instead of dividing by ~0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..budget import keep_count
from ..config import check_fraction
from ..errors import ConfigError, PruningError
from ..registry import register_method
from ..spaces import Candidate, Dim, SearchSpace
from .base import PrefillContext, PreLLMConfig, PruningMethod, Selection
from .common import image_groups

TEXT_CHOICES = ("prompt", "after_image")
THETA_SEARCH_HIGH = 0.9  # α = 4.5: the most relevant token weighs e^4.5 ≈ 90× the least relevant one
# A token whose residual d_i² is at most this fraction of its own L_ii lies in the span of the tokens
# already picked, to float32 precision (sin² of its angle to that span): its gain is zero.
IN_SPAN = 1e-4
RELEVANCE_EPS = 1e-6  # the official code's offset in the min-max normalisation


@dataclass
class CDPrunerConfig(PreLLMConfig):
    """CDPruner. budget: fraction of every image's visual tokens kept; positions: "keep" the original
    position ids (default) or "compact" them as the official LLaVA code effectively does.

    theta: None (default) weights the kernel by the normalised relevance itself, as the official code
    does; a number θ in [0, 1) weights it by exp(α·r̃) with α = θ/(2(1−θ)) (θ = 0: relevance ignored,
    a plain DPP on the similarities; larger θ: relevance counts more).
    text: the text tokens the relevance is measured against: "prompt" (every prompt position that is
    neither an image placeholder nor padding) or "after_image" (only those after the sample's first image
    placeholder, which leaves out a system prompt and the template before the image).
    """

    theta: float | None = None
    text: str = "prompt"

    def validate(self) -> None:
        super().validate()
        if self.theta is not None:
            check_fraction("theta", self.theta)
            if float(self.theta) >= 1.0:
                raise ConfigError(f"theta must be in [0, 1) (α = θ/(2(1−θ)) is infinite at 1), got {self.theta!r}")
        if self.text not in TEXT_CHOICES:
            raise ConfigError(f"text must be one of {TEXT_CHOICES}, got {self.text!r}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """theta ∈ [0, 0.9]: from a plain DPP on the similarities (relevance ignored) to a relevance
        weight ratio of e^4.5 ≈ 90 between the most and the least relevant token. The official default
        (theta=None, linear weighting) is a different form and lies outside the box."""
        check_fraction("budget", budget, allow_zero=False)
        dims = (Dim("theta", 0.0, THETA_SEARCH_HIGH, help="relevance vs diversity, α = θ/(2(1−θ))"),)

        def build(p) -> Candidate:
            return Candidate(fields={"theta": float(p["theta"])}, info={"alpha": relevance_alpha(float(p["theta"]))})

        return SearchSpace(method=cls.method or "cdpruner", budget=float(budget), dims=dims, build=build,
                           description="single pruning step before the LLM: mean retention = budget")


def relevance_alpha(theta: float) -> float:
    """α = θ / (2(1 − θ)): exp(α·r̃) weights make log det L_Y = (θ/(1−θ))·Σ_Y r̃ + log det S_Y."""
    return theta / (2.0 * (1.0 - theta))


def _unit(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def instruction_relevance(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """r_i = mean over the text tokens of cos(visual_i, text_m), then min-max normalised as the official
    code does: (r − min r + 1e-6) / (max r − min r). visual (n, D), text (M, D) -> (n,) in float32 or
    wider. No text, or all r equal: every token gets 1 (the kernel is then the plain similarity)."""
    out_dtype = torch.promote_types(visual.dtype, torch.float32)
    if text.shape[0] == 0 or visual.shape[0] == 0:
        return torch.ones(visual.shape[0], dtype=out_dtype, device=visual.device)
    r = (_unit(visual) @ _unit(text.to(visual.device)).T).mean(dim=-1).to(out_dtype)
    lo, hi = r.min(), r.max()
    return (r - lo + RELEVANCE_EPS) / (hi - lo).clamp_min(RELEVANCE_EPS)


def kernel_weights(relevance: torch.Tensor, theta: float | None) -> torch.Tensor:
    """The diagonal weights w of L = diag(w) S diag(w): r̃ itself (theta None) or exp(α·r̃)."""
    if theta is None:
        return relevance
    return torch.exp(relevance_alpha(float(theta)) * relevance)


def conditional_dpp_greedy(features: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (in selection order) of the k tokens the greedy MAP inference of the DPP with kernel
    L = diag(weights) · cos(features) · diag(weights) picks from features (n, D).

    Each pick is the remaining token with the largest d_i² = det L_{Y∪{i}} / det L_Y (ties: the lower
    index), updated incrementally (Chen et al. 2018); kernel rows are computed on the fly. A token whose
    residual is at most IN_SPAN of its own L_ii counts as in the span of Y (gain 0); when every remaining
    token is, the rank is exhausted and a new round starts over the remaining tokens (its d_i² = L_ii
    again, earlier rounds forgotten), so k distinct tokens always come back. The loop is written
    without host syncs (no .item(), no data-dependent Python branch).
    """
    n = features.shape[0]
    k = max(0, min(int(k), n))
    device = features.device
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    x = _unit(features)
    w = weights.to(device=device, dtype=x.dtype)
    diag = torch.where(x.abs().amax(dim=-1) > 0, w * w, torch.zeros_like(w))  # L_ii = w_i² exactly (0: zero vector)
    floor = IN_SPAN * diag
    d2 = diag.clone()
    c = torch.zeros(k, n, dtype=x.dtype, device=device)  # row t: e of the t-th pick, the Cholesky columns
    taken = torch.zeros(n, dtype=torch.bool, device=device)
    chosen = torch.zeros(k, dtype=torch.long, device=device)
    minus_inf = torch.tensor(float("-inf"), dtype=x.dtype, device=device)
    steps = torch.arange(k, device=device)
    round_start = torch.zeros((), dtype=torch.long, device=device)  # first pick of the current round
    for t in range(k):
        # rank exhausted (no remaining token adds volume): start a new round over the remaining tokens
        exhausted = torch.where(taken, minus_inf, d2).max() <= 0
        d2 = torch.where(exhausted, diag, d2)
        round_start = torch.where(exhausted, t, round_start)
        j = torch.argmax(torch.where(taken, minus_inf, d2))
        chosen[t] = j
        taken[j] = True
        if t == k - 1:
            break
        dj = d2[j]
        row = w[j] * w * (x @ x[j])  # L_j·
        cj = c[:t, j] * (steps[:t] >= round_start).to(x.dtype)  # this round's Cholesky entries of j
        e = (row - cj @ c[:t]) / dj.clamp_min(torch.finfo(x.dtype).tiny).sqrt()
        e = torch.where(dj > 0, e, torch.zeros_like(e))
        c[t] = e
        d2 = d2 - e * e
        d2 = torch.where(d2 <= floor, torch.zeros_like(d2), d2)
    return chosen


class CDPrunerMethod(PruningMethod):
    config_cls = CDPrunerConfig

    def _text_masks(self, ctx: PrefillContext) -> torch.Tensor:
        """(B, L) bool: the prompt positions whose input embeddings are the instruction's text tokens."""
        image = ctx.image_mask.to(ctx.embeds.device).bool()
        text = ~image
        if ctx.attention_mask is not None:
            text = text & ctx.attention_mask.to(text.device).bool()
        if self.config.text == "after_image":
            seen = torch.cumsum(image.int(), dim=1) > 0  # at or after the first image placeholder
            text = text & seen
        return text

    def before_llm(self, ctx: PrefillContext) -> Selection:
        cfg = self.config
        needs_text = cfg.theta is None or float(cfg.theta) > 0
        if needs_text and ctx.embeds is None:
            raise PruningError(
                "cdpruner: the prompt's input embeddings were not passed to the method (select_before_llm needs "
                "embeds=...); with theta=0 the relevance is not used and none are needed"
            )
        tokens = ctx.layout.tokens
        keep = ~tokens.prunable
        text = self._text_masks(ctx) if needs_text else None
        budget = float(cfg.budget)
        for b, _, idx in image_groups(ctx):
            n = idx.numel()
            k = keep_count(n, budget)
            if k >= n:
                keep[b, idx] = True
                continue
            visual = ctx.features[b, idx]
            if text is None:
                weights = torch.ones(n, dtype=torch.float32, device=visual.device)
            else:
                weights = kernel_weights(instruction_relevance(visual, ctx.embeds[b][text[b]]), cfg.theta)
            picked = conditional_dpp_greedy(visual, weights, k).to(idx.device)
            keep[b, idx[picked]] = True
        return Selection(keep=keep)


register_method("cdpruner", CDPrunerConfig, CDPrunerMethod)
