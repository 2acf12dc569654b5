"""ToMe, Token Merging (Bolya et al., ICLR 2023, arXiv 2210.09461): bipartite soft matching inside the
vision encoder, the merged tokens averaged by size.

At the inputs of ViT layers s..f (s = `start_layer`, default 1; f = the feature layer), each crop (batched
towers) or image (flat Qwen towers) merges r tokens:

1. metric: the keys of the layer before (its own attention call, tapped), averaged over heads;
2. the tokens present alternate, in sequence order, into A (even positions) and B (odd); CLS tokens are in
   neither. Each A token's match is the B token of highest cosine similarity; the r A tokens with the
   highest match similarity merge into their match (ties: the earliest), which keeps its position;
3. a merged token is the size-weighted mean of its members (sizes start at 1 and add up); with
   `proportional_attention`, every later layer adds log(size) to the attention logits of its key.

One bipartite round removes at most the A tokens: when a layer's r is larger (few ViT layers, low budgets),
the layer runs several rounds, the merged tokens' metric being the size-weighted mean of their members'.

Schedule: the budget's count T = keep_count(n, budget) of the n patches of a crop (Qwen: of its 2×2 merge
groups, merged whole, row by row) is reached at the input of f; the n − T merges are spread over the
f − s + 1 layers, constant r with the remainder on the first layers (`inflect` = 0), or trending down (< 0)
or up (> 0) linearly as ToMe's `(r, inflect)` schedules.

Anyres (LLaVA-NeXT, LLaVA-OneVision): unpadding drops ViT tokens on their way to the LLM, so the ViT
survivors of an image do not map to exactly its share of LLM tokens. Each crop keeps its share rounded up
(⌈budget·n⌉) in the ViT, and before the LLM each image keeps exactly keep_count(n_image, budget): the
surplus is merged by the same matching on the projected features, weighted by the tokens' sizes. An image
left with fewer survivors than its share keeps them all (the realised budget is then lower; the V point
does not know the image sizes, so it cannot tell which ViT tokens unpadding will drop).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..budget import keep_count
from ..config import PruneConfig, check_fraction
from ..errors import ConfigError, PruningError
from ..models.base import ModelAdapter, TokenLayout
from ..registry import register_method
from ..spaces import Candidate, Dim, SearchSpace
from .base import PrefillContext, PruningMethod, Selection, VisionMerge, VisionState, image_counts, merged_rows

# anyres families (unpadding drops ViT tokens on their way to the LLM) and pooled video frames: each image or
# video is fitted to its exact share before the LLM
ANYRES_FAMILIES = ("llava_next", "llava_next_video", "llava_onevision")
# attention implementations that add a float attention mask to the logits (proportional attention)
MASKED_ATTENTION = ("eager", "sdpa")


# -- the matching (pure functions, tested on hand-made tensors) ----------------------------------------
def bipartite_match(metric: torch.Tensor, r: int,
                    protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of bipartite soft matching over the n tokens of `metric` (n, d), in sequence order.

    Tokens at even positions form A, odd positions B; `protected` (n,) bool tokens (CLS) are in neither.
    Each A token's match is its B token of highest cosine similarity (ties: the earliest); the `r` A tokens
    whose match is most similar (ties: the earliest) merge. Returns (src, dst): the positions of those A
    tokens, most similar first, and of their matches. r is capped at the A tokens there are (0 without B).
    """
    n = metric.shape[0]
    pos = torch.arange(n, device=metric.device)
    free = torch.ones(n, dtype=torch.bool, device=metric.device) if protected is None else ~protected.to(metric.device)
    a, b = pos[(pos % 2 == 0) & free], pos[(pos % 2 == 1) & free]
    r = min(int(r), a.numel()) if b.numel() else 0
    if r <= 0:
        return pos[:0], pos[:0]
    x = torch.nn.functional.normalize(metric.float(), dim=-1)
    scores = x[a] @ x[b].T
    match = scores.argmax(-1)  # the first of equal maxima
    best = scores.gather(1, match[:, None]).squeeze(1)
    order = torch.argsort(best, descending=True, stable=True)[:r]
    return a[order], b[match[order]]


def merge_plan(metric: torch.Tensor, size: torch.Tensor, r: int,
               protected: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r of the n tokens of `metric` (n, d) with sizes `size` (n,): rounds of `bipartite_match` over
    the tokens still present (in sequence order) until r are merged or no round can merge; between rounds a
    merged token's metric is the size-weighted mean of its members'. Returns (into, size): for every token
    the token it ends up in (itself if it stays), and the sizes after merging (0 for merged tokens)."""
    n = metric.shape[0]
    dev = metric.device
    into = torch.arange(n, device=dev)
    alive = torch.arange(n, device=dev)
    size = size.to(dev).float().clone()
    acc = metric.float() * size[:, None]  # size-weighted sums: their direction is the members' mean metric
    left = int(r)
    while left > 0:
        src, dst = bipartite_match(acc[alive], left, None if protected is None else protected.to(dev)[alive])
        if src.numel() == 0:
            break
        gs, gd = alive[src], alive[dst]
        acc.index_add_(0, gd, acc[gs])
        size.index_add_(0, gd, size[gs])
        size[gs] = 0.0
        redirect = torch.arange(n, device=dev)
        redirect[gs] = gd
        into = redirect[into]
        gone = torch.zeros(n, dtype=torch.bool, device=dev)
        gone[gs] = True
        alive = alive[~gone[alive]]
        left -= src.numel()
    return into, size


def merge_schedule(total: int, steps: int, inflect: float = 0.0) -> list[int]:
    """`total` merges over `steps` layers: weights 1 − inflect ... 1 + inflect, linear over the layers (ToMe's
    `(r, inflect)`: 0 constant, −1 decreasing to none, +1 increasing from none), rounded by largest
    remainder, ties to the earlier layer (a constant r puts the remainder on the first layers)."""
    if steps <= 0:
        return []
    if steps == 1:
        return [int(total)]
    weights = [1.0 - inflect + 2.0 * inflect * i / (steps - 1) for i in range(steps)]
    raw = [total * w / sum(weights) for w in weights]
    counts = [math.floor(v) for v in raw]
    order = sorted(range(steps), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: int(total) - sum(counts)]:
        counts[i] += 1
    return counts


# -- config ----------------------------------------------------------------------------------------
@dataclass
class ToMeConfig(PruneConfig):
    """ToMe. budget: the fraction of each image's visual tokens that enter the LLM (reached at the input of
    `vision_layer`). start_layer: the first ViT layer at whose input tokens merge, with the keys of the
    layer before (default 1). vision_layer: the last one (default: the feature layer). inflect: the
    schedule's trend in [−1, 1] (0: constant r per layer). proportional_attention: add log(size) to the
    attention logits of merged keys; None (default) = on where the vision tower allows it (CLIP / SigLIP
    with eager or sdpa attention), off on Qwen ViTs; True where it cannot is refused."""

    budget: float | None = None
    start_layer: int | None = None
    vision_layer: int | None = None
    inflect: float = 0.0
    proportional_attention: bool | None = None

    def validate(self) -> None:
        super().validate()
        if self.budget is None:
            raise ConfigError("ToMeConfig needs a budget in (0, 1]")
        if self.start_layer is not None and self.start_layer < 1:
            raise ConfigError(f"start_layer must be an integer >= 1 (merging uses the keys of the layer before), "
                              f"got {self.start_layer}")
        if not -1.0 <= float(self.inflect) <= 1.0:
            raise ConfigError(f"inflect must be a number in [-1, 1], got {self.inflect!r}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """inflect ∈ [−1, 1] (the schedule's trend) and proportional_attention ∈ {0: off, 1: on where the
        tower allows it}. The token counts are fixed by the budget; the merging layers depend on the vision
        tower, which the space does not know (set `start_layer` by hand)."""
        check_fraction("budget", budget, allow_zero=False)
        dims = (Dim("inflect", -1.0, 1.0, help="trend of the merges per ViT layer (-1 front-loaded, 1 back-loaded)"),
                Dim("proportional_attention", 0, 1, integer=True, help="add log(size) to merged keys' logits"))

        def build(p) -> Candidate:
            return Candidate(fields={"inflect": float(p["inflect"]),
                                     "proportional_attention": None if int(round(p["proportional_attention"]))
                                     else False})

        return SearchSpace(method=cls.method or "tome", budget=float(budget), dims=dims, build=build,
                           description="token counts fixed by the budget")

    def resolve(self, adapter: ModelAdapter) -> ToMeConfig:
        self.validate()
        reason = adapter.vision_pruning_unsupported()
        if reason is not None:
            raise ConfigError(f"ToMe merges inside the vision encoder, which this {adapter.family} model does not "
                              f"allow: {reason}")
        vision_layer = adapter.check_vision_layer(
            self.vision_layer if self.vision_layer is not None else adapter.feature_layer())
        start = self.start_layer if self.start_layer is not None else 1
        if not 1 <= start <= vision_layer:
            raise ConfigError(f"ToMe merges at the inputs of ViT layers start_layer..vision_layer ({vision_layer} "
                              f"here) with the keys of the layer before, so start_layer must lie in "
                              f"[1, {vision_layer}], got {start}" if vision_layer >= 1 else
                              "ToMe needs a ViT layer before its vision_layer (the keys of the merge come from it); "
                              "vision_layer 0 has none")
        why_not = proportional_attention_unsupported(adapter)
        prop = self.proportional_attention
        if prop and why_not is not None:
            raise ConfigError(f"proportional_attention=True is not available on this {adapter.family} model: "
                              f"{why_not}; use proportional_attention=False")
        if prop is None:
            prop = why_not is None
        return replace(self, start_layer=start, vision_layer=vision_layer, inflect=float(self.inflect),
                       proportional_attention=prop, model_family=adapter.family, num_layers=adapter.num_llm_layers)


def proportional_attention_unsupported(adapter: ModelAdapter) -> str | None:
    """Why this vision tower cannot take ToMe's log(size) bias on its attention logits, or None."""
    if adapter.vit_flat:
        return ("its vision attention runs all images as one flat sequence split by cu_seqlens and takes no "
                "attention mask to carry the bias")
    impl = getattr(adapter.vision_attention(0).config, "_attn_implementation", None)
    if impl not in MASKED_ATTENTION:
        return f"its vision attention implementation {impl!r} takes no additive float mask (eager or sdpa do)"
    return None


# -- method ----------------------------------------------------------------------------------------
class ToMeMethod(PruningMethod):
    config_cls = ToMeConfig

    def __init__(self, config: ToMeConfig, adapter: ModelAdapter):
        super().__init__(config, adapter)
        s, f = config.start_layer, config.vision_layer
        self.vision_prune_layers = tuple(range(s, f + 1))
        self.vision_tap_layers = tuple(range(s - 1, f))
        self.reset()

    def reset(self) -> None:
        self._keys: torch.Tensor | None = None  # head-averaged keys of the last tapped layer, rows as state.ids
        self._size: torch.Tensor | None = None  # size per original ViT token (batched (n_crops, N), flat (N,))

    def on_vision_qkv(self, layer, query, key, value, state: VisionState) -> None:
        self._keys = key.detach().float().mean(1)  # (n_crops or 1, n, d)

    def vision_pass_state(self) -> torch.Tensor | None:
        return self._size

    def join_vision_passes(self, states: list) -> None:
        sizes = [s for s in states if s is not None]
        if len(sizes) != len(states) or not sizes:
            self._size = None
        elif len(sizes) == 1:
            self._size = sizes[0]
        elif len({tuple(s.shape[1:]) for s in sizes}) > 1:
            raise PruningError("tome: the image and video passes ran different ViT sequence lengths; prune images "
                               "and videos in separate prompts")
        else:
            self._size = torch.cat(sizes, 0)

    def _target(self, units: int, step: int) -> int:
        """Tokens (or merge groups) of a crop of `units` left after merging step `step`."""
        cfg = self.config
        budget = float(cfg.budget)
        # anyres: each crop keeps its share rounded up, the image is fitted to its exact share before the LLM
        final = min(units, math.ceil(budget * units - 1e-9)) if self.adapter.family in ANYRES_FAMILIES else None
        final = keep_count(units, budget) if final is None else max(1, final)
        merges = merge_schedule(units - final, cfg.vision_layer - cfg.start_layer + 1, float(cfg.inflect))
        return units - sum(merges[: step + 1])

    def at_vision_layer(self, layer: int, state: VisionState) -> VisionMerge | None:
        keys, self._keys = self._keys, None
        step = layer - self.config.start_layer
        if self._size is None:
            self._size = torch.ones(sum(state.full) if state.flat else (len(state.full), state.full[0]),
                                    device=state.ids.device)
        if state.flat:
            return self._merge_flat(layer, step, keys, state)
        return self._merge_batched(layer, step, keys, state)

    def _missing_keys(self, layer: int, keys: torch.Tensor | None, rows: int) -> None:
        if keys is None or keys.shape[-2] != rows:
            raise PruningError(f"tome: no keys of ViT layer {layer - 1} for the {rows} tokens present at the input of "
                               f"layer {layer} (the vision tower must run its layers in order)")

    def _merge_batched(self, layer: int, step: int, keys, state: VisionState) -> VisionMerge | None:
        p = state.prefix
        n_crops, n = state.ids.shape
        r = (n - p) - self._target(state.full[0] - p, step)
        if r <= 0:
            return None
        self._missing_keys(layer, keys, n)
        ids = state.ids.to(self._size.device)
        size = torch.gather(self._size, 1, ids)
        protected = torch.arange(n, device=size.device) < p
        into = torch.empty_like(ids)
        for c in range(n_crops):
            into[c], new = merge_plan(keys[c], size[c], r, protected)
            self._size[c, ids[c]] = new
        keep = into == torch.arange(n, device=into.device)
        bias = None
        if self.config.proportional_attention:
            kept_ids = ids[keep].view(n_crops, -1)
            bias = torch.gather(self._size, 1, kept_ids).log()
        return VisionMerge(keep=keep, into=torch.where(keep, -1, into), weight=size, key_bias=bias)

    def _merge_flat(self, layer: int, step: int, keys, state: VisionState) -> VisionMerge | None:
        g = state.group
        ids = state.ids.to(self._size.device)
        size = self._size[ids]
        into = torch.arange(ids.numel(), device=ids.device)
        start, merged = 0, False
        for n, full in zip(state.lengths, state.full):
            groups = n // g
            r = groups - self._target(full // g, step)
            if r > 0:
                if not merged:
                    self._missing_keys(layer, None if keys is None else keys[0], ids.numel())
                    merged = True
                metric = keys[0, start : start + n].reshape(groups, -1)  # a group's rows side by side
                dest, new = merge_plan(metric, size[start : start + n : g], r)
                rows = (dest[:, None] * g + torch.arange(g, device=dest.device)).reshape(-1)
                into[start : start + n] = start + rows  # row j of a merged group goes into row j of its match
                self._size[ids[start : start + n]] = new.repeat_interleave(g)
            start += n
        if not merged:
            return None
        keep = into == torch.arange(ids.numel(), device=into.device)
        return VisionMerge(keep=keep, into=torch.where(keep, -1, into), weight=size)

    # -- before the LLM: each image's exact share (anyres unpadding) -------------------------------------
    def _llm_sizes(self, layout: TokenLayout) -> torch.Tensor:
        """(B, Nv) sizes of the visual tokens (the ViT tokens' sizes through the adapter's packing)."""
        if self.adapter.vit_flat:
            maps = self.adapter.vit_running_maps(self._size)
        else:
            maps = self._size[:, self.adapter.vit_prefix_tokens :]
        return torch.nan_to_num(layout.pack(maps), nan=1.0).clamp_min(1e-6)

    def before_llm(self, ctx: PrefillContext) -> Selection:
        tokens = ctx.layout.tokens
        keep = torch.ones_like(tokens.prunable)
        if ctx.vision_kept is None or self._size is None:
            return Selection(keep=keep)
        alive = ctx.vision_kept & tokens.prunable
        every = torch.arange(tokens.count, device=keep.device).expand_as(keep)
        counts = image_counts(tokens, every, float(self.config.budget))
        features = replaced = sizes = None
        for (b, g), target in counts.items():
            idx = (alive[b] & (tokens.image[b] == g)).nonzero().squeeze(-1)
            if idx.numel() <= target:
                continue
            if features is None:
                sizes = self._llm_sizes(ctx.layout).to(keep.device)
                features, replaced = ctx.features.clone(), torch.zeros_like(keep)
            x = ctx.features[b, idx.to(ctx.features.device)]
            into, _ = merge_plan(x, sizes[b, idx], idx.numel() - target)
            rows, means = merged_rows(x, sizes[b, idx], into)
            keep[b, idx[into != torch.arange(idx.numel(), device=into.device)]] = False
            features[b, idx[rows].to(features.device)] = means.to(features.dtype)
            replaced[b, idx[rows]] = True
        return Selection(keep=keep, features=features, replaced=replaced)


register_method("tome", ToMeConfig, ToMeMethod)
