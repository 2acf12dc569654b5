"""Helpers shared by several methods: budget shares per image and grid, per-image top-k on LLM
attention, layer checks. Not a method itself (the methods package skips this module)."""

from __future__ import annotations

import math

import torch

from ..config import PruneConfig, check_fraction
from ..errors import ConfigError, NoSearchSpace, PruningError
from ..models.base import ModelAdapter
from ..signals.llm_attention import attention_rows
from .base import PrefillContext, PruningMethod, image_counts, keep_top_per_image, topk_per_group  # noqa: F401


# -- methods that prune once before the LLM ----------------------------------------------------------
def no_search_space(method: str, why: str) -> NoSearchSpace:
    return NoSearchSpace(
        f"method '{method}' has no numeric hyper-parameter to optimize besides the budget ({why}); "
        "compare it at fixed budgets instead"
    )


def apportion(sizes: list[int], total: int) -> list[int]:
    """Split `total` over groups of the given sizes in proportion (largest remainder, ties to the
    earlier group), never giving a group more than its size."""
    n = sum(sizes)
    if n == 0 or total <= 0:
        return [0] * len(sizes)
    total = min(total, n)
    exact = [s * total / n for s in sizes]
    out = [min(s, math.floor(e)) for s, e in zip(sizes, exact)]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    left = total - sum(out)
    while left > 0:
        for i in order:
            if left and out[i] < sizes[i]:
                out[i] += 1
                left -= 1
    return out


def image_groups(ctx: PrefillContext):
    """(b, image, indices into Nv of the image's prunable tokens) for every image of every sample."""
    tokens = ctx.layout.tokens
    for b in range(tokens.batch_size):
        for img in tokens.image[b].unique().tolist():
            idx = ((tokens.image[b] == img) & tokens.prunable[b]).nonzero().squeeze(-1)
            if idx.numel():
                yield b, img, idx


# -- methods scored by LLM attention (FastV, PDrop, SparseVLM) ----------------------------------------
def last_token_scores(query: torch.Tensor, key: torch.Tensor, visual_pos: torch.Tensor, seq_len: int,
                      scaling: float | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Head-averaged attention of the last position (`seq_len − 1`) to the visual tokens at rows
    `visual_pos` (B, n) of the current sequence: (B, n). query (B, H, S, d), key (B, Hkv, S, d)."""
    b = query.shape[0]
    rows = torch.full((b, 1), seq_len - 1, dtype=torch.long, device=query.device)
    probs = attention_rows(query, key, rows, scaling, mask)[:, 0]  # (B, K)
    return torch.gather(probs, 1, visual_pos.to(probs.device))


def check_prune_layers(name: str, layers: tuple[int, ...], adapter: ModelAdapter) -> tuple[int, ...]:
    """Pruning layers scored from the attention of the layer before them: integers, strictly
    increasing, in [max(1, adapter.min_llm_prune_layer), L − 1]; a ConfigError says which rule failed."""
    n_layers = adapter.num_llm_layers
    if not layers or not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
        raise ConfigError(f"{name} must be LLM layer indices (integers), got {layers!r}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"{name} must be strictly increasing, got {layers}")
    if layers[0] < adapter.min_llm_prune_layer:
        raise ConfigError(
            f"{name} {layers}: this {adapter.family} model can prune inside the LLM only from layer "
            f"{adapter.min_llm_prune_layer} on (earlier layers still add visual features at the image positions)"
        )
    if layers[0] < 1 or layers[-1] >= n_layers:
        raise ConfigError(
            f"{name} {layers} must lie in [1, {n_layers - 1}] for this model, whose LLM has {n_layers} decoder "
            "layers (layer 0 has no earlier layer to score with)"
        )
    return layers


def shift_defaults(layers: tuple[int, ...], first: int, n_layers: int) -> tuple[int, ...]:
    """Default layers moved up so they start at `first` or later and stay strictly increasing."""
    out: list[int] = []
    for k in layers:
        k = max(int(k), first, out[-1] + 1 if out else first)
        out.append(k)
    if out[-1] >= n_layers:
        raise ConfigError(
            f"this model's LLM has {n_layers} layers, too few for {len(layers)} pruning stage(s) starting at "
            f"layer {first}; pass fewer or explicit stage layers"
        )
    return tuple(out)


def resolve_stage_layers(given, defaults: tuple[int, ...], adapter: ModelAdapter) -> tuple[int, ...]:
    """Stage layers for this model: the given ones checked, or the defaults moved up past the first
    layer the family allows (Qwen3-VL's deepstack layers) and then checked."""
    n_layers = adapter.num_llm_layers
    if given is None:
        given = shift_defaults(defaults, max(1, adapter.min_llm_prune_layer), n_layers)
    return check_prune_layers("stage_layers", tuple(given), adapter)


def take_scores(store: dict[int, torch.Tensor], layer: int, current: torch.Tensor, method: str) -> torch.Tensor:
    scores = store.pop(layer, None)
    if scores is None or scores.shape != current.shape:
        raise PruningError(
            f"{method}: no attention scores were captured at LLM layer {layer - 1} for this prefill (the "
            "forward must run the decoder layers of the language model in order)"
        )
    return scores


def check_layer_int(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"{name} must be an integer LLM layer index, got {value!r}")


class LastTokenAttentionMethod(PruningMethod):
    """Base of methods that prune at `llm_layers`, ranking each image's visual tokens by the last
    prompt token's attention at the layer before (FastV, PDrop); subclasses set the layers and say
    which fraction of the original tokens each layer keeps (`fraction_at`)."""

    name = ""

    def __init__(self, config: PruneConfig, adapter: ModelAdapter, layers: tuple[int, ...]):
        super().__init__(config, adapter)
        self.llm_layers = tuple(layers)
        self.llm_attention_layers = tuple(k - 1 for k in layers)
        self._scores: dict[int, torch.Tensor] = {}

    def fraction_at(self, layer: int) -> float:
        raise NotImplementedError

    @property
    def prunes_before_llm(self) -> bool:
        return False

    def reset(self) -> None:
        self._scores = {}

    def on_llm_attention(self, ctx: PrefillContext, layer: int, query, key, value, mask, scaling) -> None:
        self._scores[layer + 1] = last_token_scores(query, key, ctx.visual_pos, ctx.seq_len, scaling, mask)

    def at_layer(self, ctx: PrefillContext, layer: int, current: torch.Tensor,
                 hidden_states: torch.Tensor) -> torch.Tensor:
        scores = take_scores(self._scores, layer, current, self.name)
        return keep_top_per_image(scores, ctx.layout.tokens, current, self.fraction_at(layer))


# -- methods that keep everything up to one LLM layer K, then a fraction (FastV, DART) --------------------
def single_cut_keep_ratio(name: str, budget: float, layer: int, num_layers: int) -> float:
    """r = (B·L − K)/(L − K): the fraction kept from layer K on that gives a mean retention B; a
    ConfigError when layers 0..K−1 alone already spend more than B."""
    r = (budget * num_layers - layer) / (num_layers - layer)
    if r < -1e-9:
        k_max = int(budget * num_layers + 1e-9)
        earlier = (f"or an earlier layer (K <= {k_max})" if k_max >= 1 else
                   f"(no layer K >= 1 reaches a budget below 1/{num_layers} = {1 / num_layers:.4f})")
        raise ConfigError(
            f"{name} keeps every visual token in layers 0..{layer - 1}, i.e. {layer}/{num_layers} = "
            f"{layer / num_layers:.4f} of the mean retention already; budget {budget} is below that. Use a "
            f"budget >= {layer / num_layers:.4f} {earlier}"
        )
    return min(1.0, max(0.0, r))


def single_cut_budget(keep_ratio: float, layer: int, num_layers: int) -> float:
    """The mean retention of keeping everything before layer K and `keep_ratio` from K on."""
    return (layer + keep_ratio * (num_layers - layer)) / num_layers


def single_cut_max_layer(name: str, budget: float, num_layers: int) -> int:
    """The latest K that can meet the budget, min(L − 1, ⌊B·L⌋); a ConfigError when none >= 1 can."""
    check_fraction("budget", budget, allow_zero=False)
    hi = min(num_layers - 1, int(budget * num_layers + 1e-9))
    if hi < 1:
        raise ConfigError(f"{name} cannot meet budget {budget} on {num_layers} layers with any K >= 1")
    return hi


def resolve_single_cut(name: str, config: PruneConfig, adapter: ModelAdapter,
                       default_layer: int) -> tuple[float, int, float]:
    """(budget, K, keep_ratio) of a single-cut config (fields `budget`, `layer`, `keep_ratio`) on this
    model: K defaults to `default_layer` (or the model's first allowed pruning layer if later); the one
    of budget and keep_ratio not given is solved from the other, and both given must agree."""
    n_layers = adapter.num_llm_layers
    layer = config.layer if config.layer is not None else max(default_layer, adapter.min_llm_prune_layer)
    check_prune_layers("layer (K)", (layer,), adapter)
    if config.keep_ratio is None:
        return config.budget, layer, single_cut_keep_ratio(name, config.budget, layer, n_layers)
    keep_ratio = float(config.keep_ratio)
    budget = single_cut_budget(keep_ratio, layer, n_layers)
    if config.budget is not None and abs(budget - config.budget) > 1e-3:
        raise ConfigError(
            f"keep_ratio {keep_ratio} at layer {layer} of {n_layers} gives a mean retention of "
            f"{budget:.4f}, not the budget {config.budget}; give one of budget and keep_ratio"
        )
    return (config.budget if config.budget is not None else budget), layer, keep_ratio
