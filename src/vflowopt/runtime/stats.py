"""What the last prefill kept, per stage and per layer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..budget import realised_mean


@dataclass
class KeptTokens:
    """Which visual tokens each stage of the last prefill kept, for pictures (`vflowopt.visualize`).

    Recorded only for a prefill of batch size 1. `layout` is the adapter's `TokenLayout` of that prefill
    (every visual token's image, grid, row, col and pixel region; `layout.pack` maps ViT-level maps onto
    the tokens). `stages` lists `(stage name, (Nv,) bool mask over the layout's tokens)` in order (the
    names of `PruneStats.stages`), each mask the tokens present after that stage; `merged` the same for
    the kept tokens that carry recycled/merged features after that stage (absent: none). `maps` holds the
    (Nv,) per-token tensors the method left in its prefill scratch space (e.g. VFlowOpt's "importance").
    """

    layout: Any
    stages: list[tuple[str, Any]] = field(default_factory=list)
    merged: dict[str, Any] = field(default_factory=dict)
    maps: dict[str, Any] = field(default_factory=dict)


@dataclass
class PruneStats:
    """Counts are per sample (every sample of a pruned batch keeps the same numbers).

    visual_tokens: prunable visual tokens produced (newline/CLS tokens excluded), images and videos;
    video_tokens: how many of them are video tokens;
    tokens_into_llm: sequence length entering the first LLM layer;
    visual_tokens_per_layer: prunable visual tokens present at each LLM layer (recycled ones count);
    kv_tokens_per_layer: tokens each layer attended over, i.e. its KV-cache length after prefill.
    """

    visual_tokens: int = 0
    video_tokens: int = 0
    prompt_tokens: int = 0
    tokens_into_llm: int = 0
    visual_tokens_per_layer: list[int] = field(default_factory=list)
    kv_tokens_per_layer: list[int] = field(default_factory=list)
    stages: list[tuple[str, int]] = field(default_factory=list)
    recycled_tokens: int = 0
    batch_size: int = 0
    pruning_ms: float = 0.0
    # What the method reports about its own signals for this prefill (PruningMethod.diagnostics), e.g.
    # VFlowOpt's calibration set: {"calibration_set_size": [...], "calibration_mass": [...], ...}.
    method_info: dict = field(default_factory=dict)
    # Per stage, the visual tokens kept (batch size 1 only, else None): see KeptTokens.
    kept: KeptTokens | None = field(default=None, repr=False, compare=False)

    @property
    def mean_retention(self) -> float:
        return realised_mean(self.visual_tokens_per_layer, self.visual_tokens)

    def summary(self) -> str:
        stages = ", ".join(f"{name}: {n}" for name, n in self.stages)
        video = f" ({self.video_tokens} video)" if self.video_tokens else ""
        return (
            f"visual tokens {self.visual_tokens}{video} -> [{stages}]; tokens into LLM "
            f"{self.tokens_into_llm}/{self.prompt_tokens}; mean retention {self.mean_retention:.3f}"
        )
