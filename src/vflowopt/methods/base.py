"""The contract between the runtime and a pruning method.

A method scores and selects; the runtime owns every hook and all the mechanics of removing tokens
(hidden states, positions, masks, caches). A method never touches a model class.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..budget import keep_count
from ..config import PruneConfig
from ..errors import ConfigError
from ..models.base import ModelAdapter, TokenLayout, VisualTokens
from ..registry import method_entry


@dataclass
class PrefillContext:
    """What a method may look at during one prefill."""

    layout: TokenLayout
    # (B, Nv, D) projected visual features as they enter the LLM (before any pruning).
    features: torch.Tensor
    # (B, L) bool, image placeholders of the full prompt.
    image_mask: torch.Tensor
    # (B, L, D) the full prompt's input embeddings as they enter the LLM (text tokens included).
    embeds: torch.Tensor | None = None
    # (B, L) the prompt's 2-D attention mask (1 = real token, 0 = padding), or None when none was given.
    attention_mask: torch.Tensor | None = None
    # Method-owned scratch space for this prefill (e.g. the importance map).
    scratch: dict = field(default_factory=dict)
    # Kept up to date by the runtime as stages prune: the visual tokens still present, as indices into
    # Nv (B, n), and their positions in the current sequence (B, n); the current sequence length.
    visual_ids: torch.Tensor | None = None
    visual_pos: torch.Tensor | None = None
    seq_len: int = 0
    # (B, Nv) bool: the visual tokens that survived pruning inside the vision encoder (None: no V point).
    vision_kept: torch.Tensor | None = None


@dataclass
class VisionState:
    """The vision-encoder tokens still present during one vision pass (the V pruning point).

    Batched towers (CLIP, SigLIP: one row per crop): `ids` (n_crops, n) indexes each crop's original
    ViT sequence (prefix/CLS tokens included, at the front). Flat towers (Qwen-VL: all images in one
    sequence): `ids` (n,) indexes the original running sequence and `lengths` gives the tokens of each
    image still present, in order; pruning must keep or drop whole runs of `group` consecutive tokens
    (one 2×2 merge group = one LLM token). `full` is the original count per crop (batched) or per image.
    """

    ids: torch.Tensor
    flat: bool
    prefix: int = 0
    group: int = 1
    lengths: list[int] | None = None
    full: list[int] | None = None


@dataclass
class VisionMerge:
    """`at_vision_layer`'s answer when the tokens it removes are merged into kept ones (ToMe) instead of
    discarded. `keep`, `into` and `weight` are shaped like `state.ids`: `keep` as a plain keep mask;
    `into[i]`, for a removed row i, the kept row it is averaged into (the same crop for batched towers; an
    index into the whole running sequence for flat ones), or -1 to discard it; `weight[i]` the row's
    weight in the average (ToMe: its size). A kept row that receives rows becomes Σ w·x / Σ w over itself
    and them (in float32); a kept row that receives none is left bit-identical.

    `key_bias` (optional; batched towers only), shaped like the kept rows: from now on until the pass ends,
    added to the attention logits of every query for that key (ToMe's proportional attention: log size),
    through the layers' additive attention mask. Without it, a bias set earlier follows the kept rows."""

    keep: torch.Tensor
    into: torch.Tensor
    weight: torch.Tensor
    key_bias: torch.Tensor | None = None


def merged_rows(x: torch.Tensor, weight: torch.Tensor, into: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted merging of the rows of `x` (n, D): `into` (n,) names for every row the row it is averaged
    into (itself when it is not merged). Returns (rows, means): the rows that receive others, and over
    each of them and its members the weighted mean Σ w·x / Σ w (float32)."""
    w = weight.to(x.device).float()
    into = into.to(x.device)
    total = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    mass = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    total.index_add_(0, into, x.float() * w[:, None])
    mass.index_add_(0, into, w)
    rows = torch.unique(into[into != torch.arange(into.numel(), device=x.device)])
    return rows, total[rows] / mass[rows, None]


@dataclass
class Selection:
    """A method's pre-LLM decision: which visual tokens stay, and new features for some of them."""

    keep: torch.Tensor  # (B, Nv) bool; non-prunable tokens must be kept
    features: torch.Tensor | None = None  # (B, Nv, D) replacement features, read only where `replaced`
    replaced: torch.Tensor | None = None  # (B, Nv) bool, a subset of `keep`


class PruningMethod:
    """Base class; subclasses implement the hooks they need."""

    config_cls: type[PruneConfig] = PruneConfig

    def __init__(self, config: PruneConfig, adapter: ModelAdapter):
        self.config = config
        self.adapter = adapter

    # Declarations read by the runtime once, at prune() time.
    vision_attention_layer: int | None = None  # ViT layer whose attention rows the method needs
    needs_pixels: bool = False  # receive the vision tower's pixel_values
    needs_vision_keys: bool = False  # receive the head-averaged keys of `vision_attention_layer` too
    llm_layers: tuple[int, ...] = ()  # LLM layers at whose input the method prunes
    llm_attention_layers: tuple[int, ...] = ()  # LLM layers whose attention call the method reads
    vision_tap_layers: tuple[int, ...] = ()  # ViT layers whose attention call (q, k, v) the method reads
    vision_prune_layers: tuple[int, ...] = ()  # ViT layers at whose input the method may drop tokens

    @property
    def prunes_before_llm(self) -> bool:
        return True

    def on_pixels(self, pixel_values: torch.Tensor) -> None:
        """Called with (n_crops, 3, H, W) when the vision tower runs."""

    def on_vision_attention(self, probs: torch.Tensor) -> None:
        """Called with head-averaged (n_crops, N, N) attention of `vision_attention_layer`."""

    def on_vision_keys(self, keys) -> None:
        """With `needs_vision_keys`, called just before `on_vision_attention` with that layer's
        head-averaged keys (`signals.vision_keys.vision_keys`: one row of vectors per crop or image)."""

    def on_llm_attention(self, ctx: PrefillContext, layer: int, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, mask: torch.Tensor | None, scaling: float | None) -> None:
        """Called at prefill inside the attention of each layer in `llm_attention_layers`, with the
        post-RoPE query (B, H, S, d), key and value (B, Hkv, S, d) and the mask the layer uses; see
        `signals.llm_attention.attention_rows` to turn them into attention rows."""

    def on_vision_qkv(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      state: VisionState) -> None:
        """Called in each image pass for every layer in `vision_tap_layers` with the query, key and value
        (n_crops or 1, H, n, d) the layer's attention receives (post-RoPE for Qwen; flat towers give all
        images concatenated along n, see `state.lengths`)."""

    def at_vision_layer(self, layer: int, state: VisionState) -> torch.Tensor | VisionMerge | None:
        """At the input of each layer in `vision_prune_layers`: a keep mask shaped like `state.ids`
        (batched: the same count in every row, prefix tokens kept; flat: whole groups), or a VisionMerge
        (the same mask, the removed rows averaged into kept ones), or None to keep all. Removed tokens never
        reach the LLM (the runtime drops them before it, see `vision_kept`)."""
        return None

    def before_llm(self, ctx: PrefillContext) -> Selection:
        """Selection on the projected features; the default keeps everything."""
        return Selection(keep=torch.ones_like(ctx.layout.tokens.prunable))

    def at_layer(self, ctx: PrefillContext, layer: int, current: torch.Tensor,
                 hidden_states: torch.Tensor) -> torch.Tensor | Selection:
        """Keep mask (B, n) over the visual tokens still present (`current` indexes Nv, ctx.visual_pos
        gives their rows in `hidden_states`); or a Selection over those n tokens whose `features`
        (B, n, D) replace the hidden states of the `replaced` ones (merged tokens, e.g. SparseVLM)."""
        return torch.ones_like(current, dtype=torch.bool)

    def vision_pass_state(self) -> object:
        """Methods that prune inside the vision encoder: what `before_llm` needs of the vision pass that just
        ended (ToMe: the tokens' sizes). A prompt with images and videos has two passes (the method is reset
        at the start of each); the runtime hands both states back through `join_vision_passes`."""
        return None

    def join_vision_passes(self, states: list) -> None:
        """Restore the vision-pass state of this prompt's passes, in order (images, then videos), as one."""

    def diagnostics(self) -> dict:
        """What this prefill's signals looked like, for `handle.stats.method_info` (read right after
        `before_llm`); empty by default."""
        return {}

    def reset(self) -> None:
        """Drop per-forward signals (called after each prefill, used or not)."""


def topk_per_group(scores: torch.Tensor, group: torch.Tensor, candidates: torch.Tensor,
                   counts: dict[tuple[int, int], int]) -> torch.Tensor:
    """Per sample and group (e.g. image), keep the `counts[(b, g)]` highest-scoring candidates.

    scores, group, candidates: (B, n). Ties break by position (stable sort), so selection is
    deterministic. NaN scores rank last.
    """
    keep = torch.zeros_like(candidates, dtype=torch.bool)
    safe = torch.nan_to_num(scores.float(), nan=float("-inf"))
    for b in range(scores.shape[0]):
        for g in group[b].unique().tolist():
            idx = (candidates[b] & (group[b] == g)).nonzero().squeeze(-1)
            n_keep = counts.get((b, g), 0)
            if n_keep <= 0 or idx.numel() == 0:
                continue
            order = torch.argsort(safe[b, idx], descending=True, stable=True)
            keep[b, idx[order[:n_keep]]] = True
    return keep


def image_counts(tokens: VisualTokens, current: torch.Tensor, fraction: float, *,
                 of_present: bool = False) -> dict[tuple[int, int], int]:
    """{(sample, image): tokens to keep} = keep_count(n, fraction) for the images present in `current`
    (B, n), with n = that image's prunable visual tokens as produced (default: counting from the
    original count at every stage keeps the realised mean within one token per stage of the schedule)
    or, with `of_present`, the ones still present in `current` (a ratio relative to the previous stage)."""
    image = torch.gather(tokens.image, 1, current)
    present = torch.gather(tokens.prunable, 1, current)
    counts = {}
    for b in range(current.shape[0]):
        for g in image[b].unique().tolist():
            if of_present:
                n = int((present[b] & (image[b] == g)).sum())
            else:
                n = int((tokens.prunable[b] & (tokens.image[b] == g)).sum())
            counts[(b, g)] = keep_count(n, fraction)
    return counts


def keep_top_per_image(scores: torch.Tensor, tokens: VisualTokens, current: torch.Tensor,
                       fraction: float, *, of_present: bool = False) -> torch.Tensor:
    """Keep mask (B, n) over the tokens `current`: each image keeps its `fraction` of its own visual
    tokens (see `image_counts` for `of_present`), the highest `scores` first; non-prunable tokens
    (newline, CLS) are never candidates."""
    prunable = torch.gather(tokens.prunable, 1, current)
    image = torch.gather(tokens.image, 1, current)
    return topk_per_group(scores, image, prunable, image_counts(tokens, current, fraction, of_present=of_present))


# -- configs of methods that prune once, before the LLM -------------------------------------------------
@dataclass
class PreLLMConfig(PruneConfig):
    """Base of the configs of methods that prune once, before the LLM: `budget` (required) is then the
    fraction of every image's visual tokens kept; `positions` "keep" the original position ids, or
    "compact" them as the official LLaVA-based codes effectively do. Nothing depends on the model."""

    positions: str = "keep"

    def validate(self) -> None:
        if self.budget is None:
            raise ConfigError(f"{type(self).__name__} needs a budget in (0, 1]")
        super().validate()
        if self.positions not in ("keep", "compact"):
            raise ConfigError(f"positions must be 'keep' or 'compact', got {self.positions!r}")

    def resolve(self, adapter: ModelAdapter) -> PreLLMConfig:
        return self


# -- methods that score every token, then keep the top share of each image ----------------------------
class ScorerMethod(PruningMethod, abc.ABC):
    """A pre-LLM method that only scores (like kvpress's ScorerPress): the base keeps, per image, the
    `keep_count(n, budget)` highest-scoring prunable tokens (ties: the earliest), and never touches
    newline or CLS tokens. A subclass writes `score()` and nothing else."""

    @abc.abstractmethod
    def score(self, ctx: PrefillContext) -> torch.Tensor:
        """(B, Nv) scores of the visual tokens of this prefill; higher = more worth keeping."""

    def before_llm(self, ctx: PrefillContext) -> Selection:
        tokens = ctx.layout.tokens
        every = torch.arange(tokens.prunable.shape[1], device=tokens.prunable.device).expand_as(tokens.prunable)
        keep = keep_top_per_image(self.score(ctx), tokens, every, float(self.config.budget))
        return Selection(keep=keep | ~tokens.prunable)


# -- the pre-LLM selection, without the transformers runtime ----------------------------------------
def select_before_llm(config: PruneConfig, adapter: ModelAdapter, layout: TokenLayout, features: torch.Tensor, *,
                      signals: Mapping[str, Any] | None = None, image_mask: torch.Tensor | None = None,
                      embeds: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> Selection:
    """What `config`'s method keeps before the LLM, computed from tensors alone (no hooks, no forward):
    the entry point for runtimes other than transformers' generate() (e.g. a serving engine).

    layout: the visual tokens (`adapter.layout(...)`); features: (B, Nv, D) projected features. The
    signals the method declares: `signals["pixel_values"]` when `needs_pixels` (the vision tower's
    input), `signals["vision_attention"]` when `vision_attention_layer` is set (head-averaged attention
    probabilities of that ViT layer, as `adapter.vision_attention_probs` returns them) and
    `signals["vision_keys"]` when `needs_vision_keys` (`signals.vision_keys.vision_keys`). Methods that
    prune inside the vision encoder are refused; for methods with in-LLM stages this is their first
    stage only. Returns the Selection (keep mask, and replacement features where tokens were merged).
    """
    _, method_cls = method_entry(config.method)
    method = method_cls(config.resolve(adapter), adapter)
    if method.vision_prune_layers or method.vision_tap_layers:
        raise ConfigError(f"method '{config.method}' selects inside the vision encoder; its selection needs the "
                          "transformers runtime (vflowopt.prune)")
    signals = dict(signals or {})
    missing = [name for name, needed in (("pixel_values", method.needs_pixels),
                                         ("vision_attention", method.vision_attention_layer is not None),
                                         ("vision_keys", method.needs_vision_keys))
               if needed and signals.get(name) is None]
    if missing:
        raise ConfigError(f"method '{config.method}' needs the signal(s) {missing} to select")
    try:
        if method.needs_pixels:
            method.on_pixels(signals["pixel_values"])
        if method.needs_vision_keys:
            method.on_vision_keys(signals["vision_keys"])
        if method.vision_attention_layer is not None:
            method.on_vision_attention(signals["vision_attention"])
        tokens = layout.tokens
        if image_mask is None:
            length = int(tokens.seq_index.max()) + 1 if tokens.seq_index.numel() else 0
            image_mask = torch.zeros(tokens.batch_size, length, dtype=torch.bool, device=features.device)
            image_mask.scatter_(1, tokens.seq_index.to(features.device), True)
        ctx = PrefillContext(layout=layout, features=features, image_mask=image_mask, embeds=embeds,
                             attention_mask=attention_mask)
        return method.before_llm(ctx)
    finally:
        method.reset()
