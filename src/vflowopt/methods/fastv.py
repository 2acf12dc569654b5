"""FastV (Chen et al., ECCV 2024): one in-LLM cut ranked by the last prompt token's attention.

At the input of LLM layer K (default 2) keep, per image, the visual tokens that the last token of the
prompt attended to most at layer K−1 (heads averaged). The attention row is computed on the side from
the post-RoPE query/key that layer K−1's own attention call receives (`signals.llm_attention`), so
the model keeps its attention implementation (sdpa) and no layer runs twice.

Budget (the library's unit, the mean visual-token retention over the L LLM layers): every visual
token is present in layers 0..K−1, so to spend a budget B the cut keeps r = (B·L − K)/(L − K) of each
image's visual tokens from layer K on (rounded per image). A budget below K/L is refused. The paper's
R is the fraction *dropped*; `keep_ratio` = 1 − R may be given instead of the budget, which is then
derived as (K + keep_ratio·(L − K))/L.

"Last prompt token": position `seq_len − 1` of the prefill, which is the last real token of every
sample under left padding (right-padded prompts are not supported by this choice). A forward without
cache over prompt + generated tokens has a different last token and so selects differently: for this
method (and PDrop, SparseVLM) "decoding equals a no-cache forward" does not hold; decoding reuses the
caches pruned at prefill, as the official KV-cache path does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import PruneConfig, check_fraction
from ..errors import ConfigError
from ..models.base import ModelAdapter
from ..registry import register_method
from ..spaces import Candidate, Dim, SearchSpace
from .common import (
    LastTokenAttentionMethod,
    check_layer_int,
    resolve_single_cut,
    single_cut_keep_ratio,
    single_cut_max_layer,
)

DEFAULT_LAYER = 2  # the paper's K


# -- FastV ----------------------------------------------------------------------------------------------
def fastv_keep_ratio(budget: float, layer: int, num_layers: int) -> float:
    """r = (B·L − K)/(L − K): the fraction kept from layer K on that gives a mean retention B."""
    return single_cut_keep_ratio("FastV", budget, layer, num_layers)


@dataclass
class FastVConfig(PruneConfig):
    """FastV. `budget` (mean visual retention over the LLM layers) or `keep_ratio` (the fraction of
    each image's visual tokens kept from `layer` on, 1 − the paper's R); `layer`: K, the LLM layer at
    whose input tokens are dropped, scored with layer K−1's attention (default 2, or the model's first
    allowed pruning layer if later, e.g. Qwen3-VL's deepstack)."""

    budget: float | None = None
    layer: int | None = None
    keep_ratio: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.budget is None and self.keep_ratio is None:
            raise ConfigError("FastVConfig needs a budget in (0, 1] or an explicit keep_ratio in [0, 1]")
        if self.keep_ratio is not None:
            check_fraction("keep_ratio", self.keep_ratio)
        check_layer_int("layer (K)", self.layer)
        if self.layer is not None and self.layer < 1:
            raise ConfigError(f"layer (K) must be >= 1 (scores come from layer K-1), got {self.layer}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """One integer dimension, K ∈ [1, min(L − 1, ⌊B·L⌋)] (beyond ⌊B·L⌋ the budget is spent before
        the cut); the kept fraction is solved from the budget. On a model with a later first pruning
        layer (Qwen3-VL) narrow the box with `space.with_bounds(K=(first, ...))`."""
        hi = single_cut_max_layer("FastV", budget, num_layers)

        def build(p) -> Candidate:
            k = int(round(p["K"]))
            r = (budget * num_layers - k) / (num_layers - k)
            return Candidate(fields={"layer": k}, violation=-r, info={"keep_ratio": r})

        return SearchSpace(
            method=cls.method or "fastv", budget=float(budget),
            dims=(Dim("K", 1, hi, integer=True, help="LLM layer at whose input visual tokens are dropped"),),
            build=build, description="the kept fraction after K is solved from the budget",
        )

    def resolve(self, adapter: ModelAdapter) -> FastVConfig:
        self.validate()
        budget, layer, keep_ratio = resolve_single_cut("FastV", self, adapter, DEFAULT_LAYER)
        return replace(self, budget=budget, layer=layer, keep_ratio=keep_ratio, model_family=adapter.family,
                       num_layers=adapter.num_llm_layers)


class FastVMethod(LastTokenAttentionMethod):
    config_cls = FastVConfig
    name = "fastv"

    def __init__(self, config: FastVConfig, adapter: ModelAdapter):
        super().__init__(config, adapter, (config.layer,))

    def fraction_at(self, layer: int) -> float:
        return self.config.keep_ratio


register_method("fastv", FastVConfig, FastVMethod)
