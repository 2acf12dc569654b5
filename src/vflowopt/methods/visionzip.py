"""VisionZip (Yang et al., CVPR 2025): dominant tokens by vision-encoder attention, contextual tokens
by merging the rest, before the LLM.

Scored layer: the vision layer whose output becomes the image features (LLaVA: CLIP layer −2, as the
official code; Qwen-VL: the last block, the last full-attention block for Qwen2.5-VL, as the official
Qwen2.5-VL fork). Per group of tokens (an anyres crop, or a whole image):

* dominant: the d tokens most attended by CLS at that layer (heads averaged; the official sum over
  heads ranks identically). Encoders without CLS (SigLIP in LLaVA-OneVision, the Qwen ViTs): the
  mean attention each token receives (column mean; for Qwen averaged over each 2×2 merge group, which
  is what `layout.pack` does), as the official Qwen2.5-VL fork does;
* contextual: the remaining tokens R, in their original order; c targets R[0::step][:c] with
  step = max(1, |R| // c); every other token of R goes to the target with the most similar key
  (cosine of the head-averaged keys of the scored layer, `signals.vision_keys`); a target becomes
  target + mean(assigned tokens) (`merge="add"`, the official formula) and stays at the target's
  position (`Selection.replaced`), so every kept position is an original one.

Budget: an image keeps k = round(B·n) of its n prunable tokens: d = k − c dominant and
c = round(k · contextual_share) contextual (the official 54:10 split, i.e. contextual_share = 10/64,
scaled to the budget). Anyres models (LLaVA-NeXT, LLaVA-OneVision): each crop (the base image and
every tile, found by packing a crop-index map through the adapter's own packing) is ranked and merged
within itself, as the official LLaVA-NeXT code does; k is shared between the image's crops in
proportion to their token counts (largest remainder). At budget 1.0 nothing is selected or merged.

Keys come from the same forward inputs as the attention probabilities: the method wraps its own
adapter instance's `vision_attention_probs` (created per `prune()` call) so that the runtime's one
vision-attention hook also yields the keys; the model itself is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..budget import keep_count
from ..config import check_fraction
from ..errors import ConfigError, PruningError
from ..models.base import ModelAdapter
from ..registry import register_method
from ..signals.vision_keys import pack_vectors, strip_prefix
from ..spaces import Candidate, Dim, SearchSpace
from .base import PrefillContext, PreLLMConfig, PruningMethod, Selection
from .common import apportion, image_groups

#: The official README setting: 54 dominant (CLS included) + 10 contextual = 64 tokens.
OFFICIAL_CONTEXTUAL_SHARE = 10 / 64


@dataclass
class VisionZipConfig(PreLLMConfig):
    """VisionZip.

    budget: fraction of every image's visual tokens kept (dominant + contextual).
    contextual_share: fraction of the kept tokens that are merged contextual tokens (official 10/64).
    similarity: "keys" (cosine of the scored layer's head-averaged keys, official) or "features"
    (cosine of the projected visual features, e.g. to skip the key recomputation).
    merge: "add" (target + mean of its assigned tokens, official) or "mean" (mean of the target and
    its assigned tokens, which keeps the feature scale).
    per_crop: rank and merge every anyres crop separately (official), or each image as a whole.
    vision_layer: the ViT layer scored (default: the one whose output becomes the features).
    positions: "keep" the original position ids, or "compact" them as official LLaVA code does.
    """

    contextual_share: float = OFFICIAL_CONTEXTUAL_SHARE
    similarity: str = "keys"
    merge: str = "add"
    per_crop: bool = True
    vision_layer: int | None = None

    def validate(self) -> None:
        super().validate()
        share = self.contextual_share
        if not 0.0 <= share < 1.0:
            raise ConfigError(f"contextual_share must be a number in [0, 1), got {share!r}")
        if self.similarity not in ("keys", "features"):
            raise ConfigError(f"similarity must be 'keys' or 'features', got {self.similarity!r}")
        if self.merge not in ("add", "mean"):
            raise ConfigError(f"merge must be 'add' (official) or 'mean', got {self.merge!r}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """contextual_share ∈ [0, 0.5]: from pure dominant selection to half of the kept tokens
        merged (the official 10/64 and the community 30/192, 20/128 splits lie inside)."""
        check_fraction("budget", budget, allow_zero=False)
        dims = (Dim("contextual_share", 0.0, 0.5, help="fraction of the kept tokens that are merged tokens"),)

        def build(p) -> Candidate:
            return Candidate(fields={"contextual_share": float(p["contextual_share"])})

        return SearchSpace(method=cls.method or "visionzip", budget=float(budget), dims=dims, build=build,
                           description="single pruning step before the LLM: mean retention = budget")

    def resolve(self, adapter: ModelAdapter) -> VisionZipConfig:
        layer = adapter.check_vision_layer(
            self.vision_layer if self.vision_layer is not None else adapter.feature_layer()
        )
        return replace(self, vision_layer=layer, model_family=adapter.family, num_layers=adapter.num_llm_layers)


def visionzip_select(scores: torch.Tensor, metric: torch.Tensor, features: torch.Tensor, k: int,
                     contextual_share: float, merge: str = "add"):
    """VisionZip on one group of n tokens: (keep, replaced, features), each over the n tokens.

    scores (n,): dominant score (higher = kept); metric (n, C): vectors compared by cosine for the
    merge; features (n, D): what is merged. Keeps min(k, n) tokens.
    """
    n = scores.numel()
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    replaced = torch.zeros_like(keep)
    k = max(0, min(k, n))
    if k == n:
        keep[:] = True
        return keep, replaced, features
    if k == 0:
        return keep, replaced, features
    c = min(k, int(round(k * contextual_share)))
    d = k - c
    order = torch.argsort(torch.nan_to_num(scores.float(), nan=float("-inf")), descending=True, stable=True)
    keep[order[:d]] = True
    if c == 0:
        return keep, replaced, features
    rest = (~keep).nonzero().squeeze(-1)  # original order
    step = max(1, rest.numel() // c)
    targets = rest[::step][:c]
    is_target = torch.zeros(n, dtype=torch.bool, device=scores.device)
    is_target[targets] = True
    others = rest[~is_target[rest]]
    keep[targets] = True
    if others.numel() == 0:
        return keep, replaced, features
    m = torch.nn.functional.normalize(metric.float(), dim=-1)
    assign = torch.argmax(m[others] @ m[targets].T, dim=-1)  # ties: the earlier target
    total = torch.zeros(c, features.shape[-1], dtype=torch.float32, device=features.device)
    total.index_add_(0, assign.to(features.device), features[others].float())
    count = torch.bincount(assign, minlength=c).to(features.device).float()
    base = features[targets].float()
    add = merge == "add"  # official: target + mean(assigned); "mean": mean of target and assigned
    merged = base + total / count.clamp_min(1.0)[:, None] if add else (base + total) / (1.0 + count)[:, None]
    hit = count > 0
    out = features.clone()
    out[targets[hit]] = merged[hit].to(features.dtype)
    replaced[targets[hit]] = True
    return keep, replaced, out


class VisionZipMethod(PruningMethod):
    config_cls = VisionZipConfig

    def __init__(self, config: VisionZipConfig, adapter: ModelAdapter):
        super().__init__(config, adapter)
        layer = config.vision_layer if config.vision_layer is not None else adapter.feature_layer()
        self.vision_attention_layer = adapter.check_vision_layer(layer)
        self._scores = None  # ViT-level dominant scores: (n_crops, n_patches) or one vector per image
        self._keys = None  # ViT-level keys, shaped like the scores plus a channel dimension
        self.needs_vision_keys = config.similarity == "keys"

    def reset(self) -> None:
        self._scores = self._keys = None

    def on_vision_keys(self, keys) -> None:
        self._keys = keys

    def on_vision_attention(self, probs) -> None:
        prefix = self.adapter.vit_prefix_tokens
        if torch.is_tensor(probs):
            # CLS row (rows are queries), or the mean attention each patch receives without CLS
            self._scores = probs[:, 0, prefix:] if prefix else probs.mean(dim=-2)
        else:
            self._scores = [p.mean(dim=0) for p in probs]
        if self._keys is not None:
            self._keys = strip_prefix(self._keys, prefix)

    def _crop_ids(self, ctx: PrefillContext) -> torch.Tensor:
        """(B, Nv) crop index of every visual token (-1 for non-prunable ones)."""
        tokens = ctx.layout.tokens
        if not self.config.per_crop or not torch.is_tensor(self._scores):
            return torch.where(tokens.prunable, tokens.image, torch.full_like(tokens.image, -1))
        n_crops, n_patches = self._scores.shape
        crop_map = torch.arange(n_crops, device=self._scores.device, dtype=torch.float32)
        packed = ctx.layout.pack(crop_map[:, None].expand(n_crops, n_patches))
        return torch.nan_to_num(packed, nan=-1.0).round().long().to(tokens.image.device)

    def before_llm(self, ctx: PrefillContext) -> Selection:
        tokens = ctx.layout.tokens
        budget = self.config.budget
        if budget >= 1.0:
            return Selection(keep=torch.ones_like(tokens.prunable))
        if self._scores is None:
            raise PruningError("visionzip: no vision-encoder attention was captured for this prefill")
        scores = ctx.layout.pack(self._scores).to(ctx.features.device)
        if self.config.similarity == "keys":
            if self._keys is None:
                raise PruningError("visionzip: no vision-encoder keys were captured for this prefill")
            metric = pack_vectors(ctx.layout, self._keys).to(ctx.features.device)
        else:
            metric = ctx.features
        crops = self._crop_ids(ctx)
        keep = ~tokens.prunable
        replaced = torch.zeros_like(keep)
        features = ctx.features.clone()
        for b, _, idx in image_groups(ctx):
            k = keep_count(idx.numel(), budget)
            crop = crops[b, idx]
            ids = crop.unique().tolist()
            sizes = [int((crop == g).sum()) for g in ids]
            for g, k_g in zip(ids, apportion(sizes, k)):
                sub = idx[crop == g]
                kp, rp, ft = visionzip_select(scores[b, sub], metric[b, sub], ctx.features[b, sub], k_g,
                                              self.config.contextual_share, self.config.merge)
                keep[b, sub] = kp
                replaced[b, sub] = rp
                features[b, sub] = ft
        return Selection(keep=keep, features=features, replaced=replaced)


register_method("visionzip", VisionZipConfig, VisionZipMethod)
