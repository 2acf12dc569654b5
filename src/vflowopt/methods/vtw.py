"""VTW, Visual Tokens Withdrawal (Lin et al., AAAI 2025, arXiv 2405.05803): the visual tokens leave the
sequence at one LLM layer K.

The paper observes that by the middle of the LLM the text tokens have absorbed what they need from the
image (information migration) while the visual tokens mostly act as attention sinks; from layer K on
they are withdrawn: layers K..L−1 (and their KV caches) see only the text. No score, no attention and
no text condition are needed, so decoding equals a no-cache forward.

Budget (the library's unit, the mean visual-token retention over the L LLM layers): every visual token
is present in layers 0..K−1 and none from K on, so R̄ = K/L; the budget fixes K = B·L. **Rule:** a
budget that is not a multiple of 1/L (within 1e-3) is refused, and the message names the nearest
budgets this model can meet (and their K); nothing is rounded silently. `layer` (K) may be given
instead of the budget; K = L withdraws nothing (budget 1.0, the unpruned model, bit for bit).

The library's floor (`budget.keep_count`: a stage never empties an image) is kept by default: from
layer K on each image keeps exactly one visual token, its last one in the sequence (which, under causal
attention, is the visual token that has attended to the whole image); the realised mean is then
K/L + (L−K)/(L·N) for an image of N tokens, within one token of the budget. `withdraw_all=True` is the
paper's exact withdrawal (no visual token of any image from layer K on; the one documented exception
to the floor). Newline/CLS tokens (LLaVA-OneVision/NeXT) are never pruned by the runtime, in either mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..config import PruneConfig
from ..errors import ConfigError
from ..models.base import ModelAdapter
from ..registry import register_method
from .base import PrefillContext, PruningMethod, topk_per_group
from .common import check_layer_int, no_search_space

TOLERANCE = 1e-3  # how far a budget may sit from a multiple of 1/L and still name that K


def vtw_layer(budget: float, num_layers: int, first: int = 1) -> int:
    """K = B·L when the budget is a multiple of 1/L (within `TOLERANCE` of K/L) and K >= `first`;
    otherwise a ConfigError naming the nearest budgets this model can meet."""
    exact = budget * num_layers
    k = int(round(exact))
    multiple = abs(budget - k / num_layers) <= TOLERANCE
    if multiple and first <= k <= num_layers:
        return k
    below, above = math.floor(exact + 1e-9), math.ceil(exact - 1e-9)
    valid = sorted({min(max(j, first), num_layers) for j in (below, above)})
    options = " or ".join(f"{j / num_layers:.4f} (K = {j})" for j in valid)
    head = (f"VTW withdraws every visual token at one LLM layer K, so its budget is K/L, a multiple of "
            f"1/{num_layers} = {1 / num_layers:.4f} on this model's {num_layers} layers")
    if multiple:  # a multiple of 1/L, but before the first layer this family can prune at
        raise ConfigError(
            f"{head}; budget {budget} needs K = {k}, but this model can withdraw visual tokens only from layer "
            f"{first} on (earlier layers still add visual features at the image positions). Nearest: {options}"
        )
    floor = f" (this model can withdraw them only from layer {first} on)" if first > 1 else ""
    raise ConfigError(
        f"{head}{floor}; budget {budget} is not one of them. Nearest: {options}; or give layer=K instead"
    )


@dataclass
class VTWConfig(PruneConfig):
    """VTW. `budget` (mean visual retention over the LLM layers, a multiple of 1/L: K = B·L) or `layer`
    (K, the LLM layer at whose input the visual tokens are withdrawn; L withdraws nothing);
    `withdraw_all`: drop every visual token at K (the paper) instead of keeping one per image (the
    library's floor)."""

    budget: float | None = None
    layer: int | None = None
    withdraw_all: bool = False

    def validate(self) -> None:
        super().validate()
        if self.budget is None and self.layer is None:
            raise ConfigError("VTWConfig needs a budget in (0, 1] (a multiple of 1/L) or an explicit layer K")
        check_layer_int("layer (K)", self.layer)
        if self.layer is not None and self.layer < 1:
            raise ConfigError(f"layer (K) must be >= 1 (visual tokens enter the LLM at layer 0), got {self.layer}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """None: the budget fixes K (K = B·L), and VTW has no other hyper-parameter."""
        raise no_search_space(cls.method or "vtw", "the withdrawal layer K is fixed by the budget, K = B·L")

    def resolve(self, adapter: ModelAdapter) -> VTWConfig:
        self.validate()
        n_layers = adapter.num_llm_layers
        first = max(1, adapter.min_llm_prune_layer)
        if self.layer is None:
            layer = vtw_layer(self.budget, n_layers, first)
        else:
            layer = self.layer
            if not first <= layer <= n_layers:
                raise ConfigError(
                    f"layer (K) {layer} must lie in [{first}, {n_layers}] for this {adapter.family} model, whose "
                    f"LLM has {n_layers} decoder layers (K = {n_layers} withdraws nothing)"
                    + (f"; layers before {first} still add visual features at the image positions" if first > 1
                       else "")
                )
            if self.budget is not None and abs(self.budget - layer / n_layers) > TOLERANCE:
                raise ConfigError(
                    f"layer {layer} of {n_layers} gives a mean retention of {layer / n_layers:.4f}, not the budget "
                    f"{self.budget}; give one of budget and layer"
                )
        return replace(self, budget=layer / n_layers, layer=layer, model_family=adapter.family,
                       num_layers=n_layers)


def last_token_per_image(ctx: PrefillContext, current: torch.Tensor) -> torch.Tensor:
    """Keep mask (B, n) over the visual tokens `current`: each image's last prunable token in the
    sequence (the one that has attended to the whole image)."""
    tokens = ctx.layout.tokens
    prunable = torch.gather(tokens.prunable, 1, current)
    image = torch.gather(tokens.image, 1, current)
    position = torch.gather(tokens.seq_index, 1, current)
    counts = {(b, g): 1 for b in range(current.shape[0]) for g in image[b].unique().tolist()}
    return topk_per_group(position.float(), image, prunable, counts)


class VTWMethod(PruningMethod):
    config_cls = VTWConfig

    def __init__(self, config: VTWConfig, adapter: ModelAdapter):
        super().__init__(config, adapter)
        # K = L: nothing to withdraw, no hook at all (budget 1.0 is the unpruned model)
        self.llm_layers = (config.layer,) if config.layer < adapter.num_llm_layers else ()

    @property
    def prunes_before_llm(self) -> bool:
        return False

    def at_layer(self, ctx: PrefillContext, layer: int, current: torch.Tensor,
                 hidden_states: torch.Tensor) -> torch.Tensor:
        if self.config.withdraw_all:
            return torch.zeros_like(current, dtype=torch.bool)
        return last_token_per_image(ctx, current)


register_method("vtw", VTWConfig, VTWMethod)
