"""DART, Duplication-Aware Reduction of Tokens (Wen et al., EMNLP 2025, arXiv 2502.11494): keep the visual
tokens that duplicate the pivots least.

At the input of LLM layer K (default 2, the paper's LLaVA setting) each image keeps the tokens least
redundant with a few *pivot* tokens:

1. pivots, ranked by the norm of their keys at layer K−1 (all KV heads concatenated; the official
   default criterion, "K-norm", here the L2 norm, which RoPE leaves unchanged): the image's
   `pivot_image_tokens` (4) visual tokens with the largest key norm, and the `pivot_text_tokens` (4) text
   tokens with the largest key norm among the prompt tokens after the image (the instruction);
2. duplicates: the hidden states entering layer K (= layer K−1's output), passed through the model's
   final norm as the official code does, are compared by cosine similarity. Pivot by pivot (image pivots
   first, then text pivots, each group by decreasing key norm), the pivot's share of the budget goes to the
   image's remaining tokens *least* similar to it (ties: the earliest token), which then leave the pool;
3. kept: the image pivots plus the tokens picked in 2 — exactly `keep_count(N_image, r)` tokens (text
   pivots are not visual tokens and are never dropped). When that count is at most `pivot_image_tokens`,
   the image keeps its largest-key-norm tokens only.

The keys are tapped from layer K−1's own attention call (`signals.llm_attention`), so sdpa and eager
attention stay usable and no layer runs twice; nothing is computed at decode.

Budget (as FastV's): every visual token is present in layers 0..K−1, so a budget B keeps
r = (B·L − K)/(L − K) of each image's tokens from layer K on; a budget below K/L is refused.
`keep_ratio` (= 1 − the official `reduction_ratio`) may be given instead; the budget is then
(K + keep_ratio·(L − K))/L.

The text pivots are the prompt tokens after the image at prefill: a forward without cache over prompt +
generated tokens has more of them and may select differently, so for DART (like FastV, PDrop,
SparseVLM) "decoding equals a no-cache forward" holds only with the prefill's decisions; decoding
reuses the caches pruned at prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import PruneConfig, check_fraction
from ..errors import ConfigError, PruningError
from ..models.base import ModelAdapter
from ..registry import register_method
from ..spaces import Candidate, Dim, SearchSpace
from .base import PrefillContext, PruningMethod, image_counts
from .common import check_layer_int, resolve_single_cut, single_cut_keep_ratio, single_cut_max_layer

DEFAULT_LAYER = 2  # the paper's K for LLaVA-1.5 (and the official Qwen2-VL scripts)
MAX_SEARCHED_PIVOTS = 16


def dart_keep_ratio(budget: float, layer: int, num_layers: int) -> float:
    """r = (B·L − K)/(L − K): the fraction kept from layer K on that gives a mean retention B."""
    return single_cut_keep_ratio("DART", budget, layer, num_layers)


def split_quota(total: int, parts: int) -> list[int]:
    """`total` spread over `parts` as evenly as possible, the earlier parts taking the remainder."""
    if parts <= 0:
        return []
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest `values` (ties: the earliest), largest first."""
    order = torch.argsort(values.float(), descending=True, stable=True)
    return order[: max(0, min(k, values.numel()))]


def dart_select(states: torch.Tensor, key_norms: torch.Tensor, text_states: torch.Tensor,
                text_key_norms: torch.Tensor, keep: int, pivot_image: int, pivot_text: int) -> torch.Tensor:
    """Indices (sorted) of the `keep` tokens DART keeps among one image's n tokens.

    states (n, D), key_norms (n,): the image's tokens; text_states (t, D), text_key_norms (t,): the text
    tokens that may serve as pivots. Image pivots are kept; the other kept tokens are taken pivot by pivot
    (image pivots, then text pivots, each by decreasing key norm; the earlier pivots take the remainder
    of an uneven split), each one's share being the remaining tokens of lowest cosine similarity to it.
    """
    n = states.shape[0]
    keep = max(0, min(int(keep), n))
    if keep >= n:
        return torch.arange(n, device=states.device)
    img_piv = top_indices(key_norms, min(pivot_image, keep))
    txt_piv = top_indices(text_key_norms, pivot_text)
    x = torch.nn.functional.normalize(states.float(), dim=-1)
    t = torch.nn.functional.normalize(text_states.float(), dim=-1)
    pivots = [x[i] for i in img_piv.tolist()] + [t[i] for i in txt_piv.tolist()]
    kept = torch.zeros(n, dtype=torch.bool, device=states.device)
    kept[img_piv] = True
    for vector, quota in zip(pivots, split_quota(keep - int(kept.sum()), len(pivots))):
        pool = (~kept).nonzero().squeeze(-1)
        if quota <= 0 or pool.numel() == 0:
            continue
        sim = x[pool] @ vector
        kept[pool[torch.argsort(sim, stable=True)[:quota]]] = True
    return kept.nonzero().squeeze(-1)


def _check_count(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass
class DARTConfig(PruneConfig):
    """DART. `budget` (mean visual retention over the LLM layers) or `keep_ratio` (the fraction of each
    image's visual tokens kept from `layer` on, 1 − the official reduction_ratio); `layer`: K, the LLM
    layer at whose input tokens are dropped, pivots ranked by layer K−1's keys (default 2, or the model's
    first allowed pruning layer if later, e.g. Qwen3-VL's deepstack); `pivot_image_tokens` /
    `pivot_text_tokens`: pivots per image taken among its visual tokens / the text after it (4 and 4)."""

    budget: float | None = None
    layer: int | None = None
    keep_ratio: float | None = None
    pivot_image_tokens: int = 4
    pivot_text_tokens: int = 4

    def validate(self) -> None:
        super().validate()
        if self.budget is None and self.keep_ratio is None:
            raise ConfigError("DARTConfig needs a budget in (0, 1] or an explicit keep_ratio in [0, 1]")
        if self.keep_ratio is not None:
            check_fraction("keep_ratio", self.keep_ratio)
        check_layer_int("layer (K)", self.layer)
        if self.layer is not None and self.layer < 1:
            raise ConfigError(f"layer (K) must be >= 1 (pivots come from layer K-1's keys), got {self.layer}")
        _check_count("pivot_image_tokens", self.pivot_image_tokens, 1)
        _check_count("pivot_text_tokens", self.pivot_text_tokens, 0)

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """K ∈ [1, min(L − 1, ⌊B·L⌋)] (the kept fraction after K is solved from the budget), and the pivot
        counts: image pivots ∈ [1, 16], text pivots ∈ [0, 16]. On a model with a later first pruning
        layer (Qwen3-VL) narrow the box with `space.with_bounds(K=(first, ...))`."""
        hi = single_cut_max_layer("DART", budget, num_layers)

        def build(p) -> Candidate:
            k = int(round(p["K"]))
            r = (budget * num_layers - k) / (num_layers - k)
            fields = {"layer": k, "pivot_image_tokens": int(round(p["image_pivots"])),
                      "pivot_text_tokens": int(round(p["text_pivots"]))}
            return Candidate(fields=fields, violation=-r, info={"keep_ratio": r})

        return SearchSpace(
            method=cls.method or "dart", budget=float(budget),
            dims=(Dim("K", 1, hi, integer=True, help="LLM layer at whose input visual tokens are dropped"),
                  Dim("image_pivots", 1, MAX_SEARCHED_PIVOTS, integer=True, help="pivots among each image's tokens"),
                  Dim("text_pivots", 0, MAX_SEARCHED_PIVOTS, integer=True,
                      help="pivots among the text after the image")),
            build=build, description="the kept fraction after K is solved from the budget",
        )

    def resolve(self, adapter: ModelAdapter) -> DARTConfig:
        self.validate()
        budget, layer, keep_ratio = resolve_single_cut("DART", self, adapter, DEFAULT_LAYER)
        return replace(self, budget=budget, layer=layer, keep_ratio=keep_ratio, model_family=adapter.family,
                       num_layers=adapter.num_llm_layers)


class DARTMethod(PruningMethod):
    config_cls = DARTConfig

    def __init__(self, config: DARTConfig, adapter: ModelAdapter):
        super().__init__(config, adapter)
        self.llm_layers = (config.layer,)
        self.llm_attention_layers = (config.layer - 1,)
        self._key_norms: torch.Tensor | None = None

    @property
    def prunes_before_llm(self) -> bool:
        return False

    def reset(self) -> None:
        self._key_norms = None

    def on_llm_attention(self, ctx: PrefillContext, layer: int, query, key, value, mask, scaling) -> None:
        # (B, Hkv, S, d) post-RoPE keys -> (B, S) L2 norm over every head: a rotation preserves it, so
        # it is the pre-RoPE norm and does not depend on the token's absolute position (the official
        # L1 norm of the rotated keys does). The official repeat_kv'd keys scale every norm alike.
        self._key_norms = key.detach().float().square().sum(dim=(1, 3)).sqrt()

    def _states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        norm = getattr(self.adapter.text_model, "norm", None)
        with torch.no_grad():
            return norm(hidden_states) if callable(norm) else hidden_states

    def at_layer(self, ctx: PrefillContext, layer: int, current: torch.Tensor,
                 hidden_states: torch.Tensor) -> torch.Tensor:
        key_norms, self._key_norms = self._key_norms, None
        b, s = hidden_states.shape[:2]
        if key_norms is None or key_norms.shape != (b, s):
            raise PruningError(
                f"dart: no keys were captured at LLM layer {layer - 1} for this prefill (the forward must run "
                "the decoder layers of the language model in order)"
            )
        cfg = self.config
        tokens = ctx.layout.tokens
        states = self._states(hidden_states)
        pos = ctx.visual_pos.to(hidden_states.device)
        image = torch.gather(tokens.image, 1, current)
        prunable = torch.gather(tokens.prunable, 1, current)
        counts = image_counts(tokens, current, cfg.keep_ratio)
        text = torch.ones(b, s, dtype=torch.bool, device=hidden_states.device)
        text.scatter_(1, pos, False)
        mask = ctx.attention_mask
        if mask is not None and mask.shape == (b, s):  # padding never serves as a pivot
            text &= mask.to(text.device).bool()
        keep = torch.zeros_like(current, dtype=torch.bool)
        for i in range(b):
            for g in image[i].unique().tolist():
                idx = ((image[i] == g) & prunable[i]).nonzero().squeeze(-1)
                if idx.numel() == 0:
                    continue
                rows = pos[i, idx]
                after = text[i].clone()
                after[: int(pos[i, image[i] == g].max()) + 1] = False
                text_rows = after.nonzero().squeeze(-1)
                chosen = dart_select(states[i, rows], key_norms[i, rows], states[i, text_rows],
                                     key_norms[i, text_rows], counts.get((i, g), 0), cfg.pivot_image_tokens,
                                     cfg.pivot_text_tokens)
                keep[i, idx[chosen.to(idx.device)]] = True
        return keep


register_method("dart", DARTConfig, DARTMethod)
