"""FlowCut (papers/flowcut.md, section 3 and appendix A.5): information-flow-aware pruning inside the
vision encoder, plus (for many-token models) a text-conditioned step at LLM layer 2.

Vision encoder (the V point). At every ViT layer before the feature layer the method reads the layer's
own q/k/v (an attention tap: the model keeps sdpa) and scores each patch
    S = (I_a/Σ I_a + I_s/Σ I_s) · ‖V‖₁,  I_a = mean_h softmax(q_g·Kᵀ/√d),  I_s = mean_h softmax(v_g·Vᵀ/√d)
with the global token g = CLS where the encoder has one (CLIP), else the mean token (SigLIP, Qwen ViTs);
the cumulative score is S_cum = w·S_cum + (1−w)·S (w = history_weight, 0.5). Every `prune_every` layers,
at the inputs of layers f, f−e, f−2e, ... ≥ 1 (f = the feature layer), it drops
    P = round((N − T)/√L · (1 − (H/ln N)²))
patches (H: entropy of the global token's attention; L = f − layer, the layers left to the last step);
the last step, at the input of f, lands exactly on the target T. Crops of one vision batch keep the same
count (the largest P of the crops). Qwen ViTs prune whole 2×2 merge groups (group score = mean).

Budget (R̄ = mean over LLM layers of the visual tokens present, counted by what enters the LLM):
* single phase (LLaVA-1.5): T = budget·N per crop, so R̄ = budget.
* two phase (LLaVA-NeXT, LLaVA-OneVision, Qwen-VL): the ViT keeps R_v = ρ·R_f (ρ = vision_ratio = 2,
  "twice the target"), and LLM layer k (= 2) keeps R_f, with R̄ = (k·R_v + (L−k)·R_f)/L = budget, i.e.
  R_f = budget·L/(L + k(ρ−1)) (R_v capped at 1). At layer k the count is solved again from the tokens
  that actually entered (anyres unpadding changes them), so R̄ equals the budget up to rounding. The
  layer-k score is the last prompt token's attention and value similarity times ‖V‖₁, read from the
  attention call of layer k−1 (appendix A.5 / official code: prune_layer = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..config import PruneConfig, check_fraction
from ..errors import ConfigError
from ..models.base import ModelAdapter
from ..registry import register_method
from ..spaces import Candidate, Dim, SearchSpace
from .base import PrefillContext, PruningMethod, VisionState, topk_per_group

# families whose LLM tokens do not map 1:1 onto ViT tokens (anyres unpadding, pooled video frames, merge groups):
# the vision-encoder phase cannot land on an exact count, the LLM phase fits it
TWO_PHASE_FAMILIES = ("llava_next", "llava_next_video", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
DEFAULT_LLM_LAYER = 2


# -- the formulas (pure functions, tested on hand-made attention) ------------------------------------
def entropy_ratio(attn: torch.Tensor) -> torch.Tensor:
    """H(p)/ln N of p = attn/Σattn over the last dim, in float32; 0·log 0 = 0, N <= 1 gives 1 (no
    pruning signal). Safe for one-hot or all-zero rows in half precision."""
    a = attn.float().clamp_min(0)
    n = a.shape[-1]
    if n <= 1:
        return torch.ones(a.shape[:-1], device=a.device)
    p = a / a.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    h = -torch.xlogy(p, p).sum(-1)
    return (h / math.log(n)).clamp(0.0, 1.0)


def prune_number(n: int, target: int, remaining: int, ratio: float) -> int:
    """P = round((N − T)/√L · (1 − r²)); the last step (L = 0) prunes down to exactly T."""
    if n <= target:
        return 0
    if remaining <= 0:
        return n - target
    r = float(ratio) if math.isfinite(float(ratio)) else 1.0
    p = (n - target) / math.sqrt(remaining) * (1.0 - r * r)
    return int(min(n - target, max(0, round(p))))


def importance(attn: torch.Tensor, sem: torch.Tensor, vnorm: torch.Tensor) -> torch.Tensor:
    """S = (a/Σa + s/Σs) · ‖V‖₁ over the last dim (float32, zero sums guarded)."""
    tiny = torch.finfo(torch.float32).tiny
    a, s = attn.float(), sem.float()
    return (a / a.sum(-1, keepdim=True).clamp_min(tiny) + s / s.sum(-1, keepdim=True).clamp_min(tiny)) * vnorm.float()


def cumulative(previous: torch.Tensor | None, current: torch.Tensor, history_weight: float) -> torch.Tensor:
    """S_cum = w·S_cum + (1 − w)·S (S_cum = S at the first layer)."""
    if previous is None:
        return current
    return history_weight * previous + (1.0 - history_weight) * current


def vit_signals(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_cls: bool):
    """From (H, n, d) q/k/v of one crop or image: (I_a, I_s, ‖V‖₁) over its patches and the entropy
    ratio of I_a. The global token is the first token (CLS) or the mean of all tokens."""
    q, k, v = q.float(), k.float(), v.float()
    d = q.shape[-1]
    if has_cls:
        # As the official code: each head's softmax runs over every token, CLS included; heads are
        # averaged, then the CLS column is dropped and the rest renormalised. A head that looks mostly
        # at CLS therefore weighs less (by 1 - its CLS self-weight) than under a patch-only softmax.
        attn = _patch_distribution(torch.einsum("hd,hnd->hn", q[:, 0], k) / math.sqrt(d))
        sem = _patch_distribution(torch.einsum("hd,hnd->hn", v[:, 0], v) / math.sqrt(d))
        vp = v[:, 1:]
    else:  # no CLS: the global token is the mean token and every token is a patch
        qg, vg, vp = q.mean(1), v.mean(1), v
        attn = torch.softmax(torch.einsum("hd,hnd->hn", qg, k) / math.sqrt(d), dim=-1).mean(0)
        sem = torch.softmax(torch.einsum("hd,hnd->hn", vg, vp) / math.sqrt(d), dim=-1).mean(0)
    vnorm = vp.abs().sum(-1).sum(0)
    return attn, sem, vnorm, entropy_ratio(attn)


def _patch_distribution(logits: torch.Tensor) -> torch.Tensor:
    """(H, n) logits over [CLS, patches] -> (n − 1,) head-averaged patch weights summing to 1."""
    patches = torch.softmax(logits, dim=-1).mean(0)[1:]
    return patches / patches.sum().clamp_min(torch.finfo(patches.dtype).tiny)


def vit_schedule(feature_layer: int, every: int) -> tuple[int, ...]:
    """ViT layers at whose input FlowCut prunes: f, f−e, f−2e, ... down to 1 (ascending)."""
    return tuple(sorted(j for j in range(feature_layer, 0, -every)))


def two_phase_ratios(budget: float, num_layers: int, llm_layer: int, vision_ratio: float) -> tuple[float, float]:
    """(R_v, R_f) with R_v = ρ·R_f (capped at 1) and (k·R_v + (L−k)·R_f)/L = budget."""
    big_l, k = num_layers, llm_layer
    r_f = budget * big_l / (big_l + k * (vision_ratio - 1.0))
    r_v = vision_ratio * r_f
    if r_v > 1.0:
        r_v, r_f = 1.0, (budget * big_l - k) / (big_l - k)
    return r_v, max(0.0, min(1.0, r_f))


# -- config ----------------------------------------------------------------------------------------
@dataclass
class FlowCutConfig(PruneConfig):
    """FlowCut. budget: R̄ (see the module docstring for the split between the ViT and LLM layer k).

    history_weight: w in S_cum = w·S_cum + (1−w)·S (paper 0.5). prune_every: e, ViT layers between
    pruning steps (paper 2). two_phase: prune to vision_ratio × the final count in the ViT and to the
    final count at LLM layer `llm_layer` (default: on for LLaVA-NeXT, LLaVA-OneVision and Qwen-VL, off for
    LLaVA-1.5). vision_layer: the ViT layer at whose input the last pruning step lands (default: the
    feature layer). llm_layer: default 2, or the first layer the family allows pruning at (Qwen3-VL).
    Resolved: retention = (R_v, R_f).
    """

    budget: float | None = None
    history_weight: float = 0.5
    prune_every: int = 2
    two_phase: bool | None = None
    vision_ratio: float = 2.0
    llm_layer: int | None = None
    vision_layer: int | None = None
    retention: tuple[float, float] | None = None

    def validate(self) -> None:
        super().validate()
        if self.budget is None:
            raise ConfigError("FlowCutConfig needs a budget in (0, 1]")
        check_fraction("history_weight", self.history_weight)
        if not isinstance(self.prune_every, int) or isinstance(self.prune_every, bool) or self.prune_every < 1:
            raise ConfigError(f"prune_every must be an integer >= 1, got {self.prune_every!r}")
        v = self.vision_ratio
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v < 1:
            raise ConfigError(f"vision_ratio must be a number >= 1, got {v!r}")
        if self.two_phase not in (None, True, False):
            raise ConfigError(f"two_phase must be true, false or null, got {self.two_phase!r}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """history_weight ∈ [0, 0.9] (paper table 10 spans 0-0.9), prune_every ∈ {1, ..., 4} (table 11)."""
        check_fraction("budget", budget, allow_zero=False)
        dims = (
            Dim("history_weight", 0.0, 0.9, help="weight of the history in the cumulative score"),
            Dim("prune_every", 1, 4, integer=True, help="ViT layers between pruning steps"),
        )

        def build(p) -> Candidate:
            return Candidate(fields={"history_weight": float(p["history_weight"]),
                                     "prune_every": int(p["prune_every"])})

        return SearchSpace(method=cls.method or "flowcut", budget=float(budget), dims=dims, build=build,
                           description="token counts fixed by the budget")

    def resolve(self, adapter: ModelAdapter) -> FlowCutConfig:
        self.validate()
        reason = adapter.vision_pruning_unsupported()
        if reason is not None:
            raise ConfigError(f"FlowCut prunes inside the vision encoder, which this {adapter.family} model "
                              f"does not allow: {reason}")
        two = self.two_phase if self.two_phase is not None else adapter.family in TWO_PHASE_FAMILIES
        n_layers = adapter.num_llm_layers
        vision_layer = adapter.check_vision_layer(
            self.vision_layer if self.vision_layer is not None else adapter.feature_layer())
        if vision_layer < 1:
            raise ConfigError("FlowCut needs at least one scored ViT layer before its last pruning layer")
        budget = float(self.budget)
        llm_layer = None
        if two:
            llm_layer = self.llm_layer if self.llm_layer is not None else max(DEFAULT_LLM_LAYER,
                                                                             adapter.min_llm_prune_layer)
            if not isinstance(llm_layer, int) or not max(1, adapter.min_llm_prune_layer) <= llm_layer < n_layers:
                raise ConfigError(
                    f"llm_layer must be an integer in [{max(1, adapter.min_llm_prune_layer)}, {n_layers - 1}] "
                    f"for this {adapter.family} model, got {llm_layer!r}")
            retention = two_phase_ratios(budget, n_layers, llm_layer, float(self.vision_ratio))
        else:
            retention = (budget, budget)
        return replace(self, two_phase=two, llm_layer=llm_layer, vision_layer=vision_layer,
                       history_weight=float(self.history_weight), retention=retention,
                       model_family=adapter.family, num_layers=n_layers)


# -- method ----------------------------------------------------------------------------------------
class FlowCutMethod(PruningMethod):
    config_cls = FlowCutConfig

    def __init__(self, config: FlowCutConfig, adapter: ModelAdapter):
        super().__init__(config, adapter)
        f = config.vision_layer
        self.vision_prune_layers = vit_schedule(f, config.prune_every)
        self.vision_tap_layers = tuple(range(f))
        if config.two_phase:
            self.llm_layers = (config.llm_layer,)
            self.llm_attention_layers = (config.llm_layer - 1,)
        self.reset()

    def reset(self) -> None:
        self._cum: torch.Tensor | None = None  # per original ViT token (batched: (n_crops, N); flat: (N,))
        self._ratio: list[float] | None = None  # entropy ratio per crop / image, of the last scored layer
        self._llm_scores: tuple | None = None

    # -- vision encoder --------------------------------------------------------------------------
    def _targets(self, state: VisionState) -> list[int]:
        r_v = self.config.retention[0]
        if state.flat:
            return [min(n // state.group, max(1, int(round(r_v * (n // state.group))))) for n in state.full]
        n_p = state.full[0] - state.prefix
        return [min(n_p, max(1, int(round(r_v * n_p))))] * len(state.full)

    def _done(self, state: VisionState) -> bool:
        targets = self._targets(state)
        if state.flat:
            return all(n // state.group <= t for n, t in zip(state.lengths, targets))
        return state.ids.shape[1] - state.prefix <= targets[0]

    def on_vision_qkv(self, layer, query, key, value, state: VisionState) -> None:
        if self._done(state):
            return
        w = self.config.history_weight
        if state.flat:
            total = sum(state.full)
            if self._cum is None:
                self._cum = torch.zeros(total, device=query.device)
            scores, ratios, start = torch.empty(state.ids.shape[0], device=query.device), [], 0
            for n in state.lengths:
                if n == 0:
                    ratios.append(1.0)
                    continue
                sl = slice(start, start + n)
                a, s, vn, r = vit_signals(query[0, :, sl], key[0, :, sl], value[0, :, sl], has_cls=False)
                scores[sl] = importance(a, s, vn)
                ratios.append(float(r))
                start += n
            ids = state.ids.to(query.device)
            self._cum[ids] = cumulative(None if layer == 0 else self._cum[ids], scores, w)
        else:
            p = state.prefix
            if self._cum is None:
                self._cum = torch.zeros(len(state.full), state.full[0], device=query.device)
            rows, ratios = [], []
            for c in range(query.shape[0]):
                a, s, vn, r = vit_signals(query[c], key[c], value[c], has_cls=p > 0)
                rows.append(importance(a, s, vn))
                ratios.append(float(r))
            cur = torch.stack(rows)
            ids = state.ids[:, p:].to(query.device)
            prev = None if layer == 0 else torch.gather(self._cum, 1, ids)
            self._cum.scatter_(1, ids, cumulative(prev, cur, w))
        self._ratio = ratios

    def at_vision_layer(self, layer: int, state: VisionState) -> torch.Tensor | None:
        if self._cum is None or self._done(state):
            return None
        remaining = self.config.vision_layer - layer
        targets = self._targets(state)
        ratios = self._ratio or [1.0] * len(targets)
        if state.flat:
            g = state.group
            keep = torch.ones(state.ids.shape[0], dtype=torch.bool, device=state.ids.device)
            cum = self._cum.to(state.ids.device)[state.ids]
            start = 0
            for n, t, r in zip(state.lengths, targets, ratios):
                groups = n // g
                n_keep = groups - prune_number(groups, t, remaining, r)
                if n_keep < groups:
                    score = cum[start : start + n].view(groups, g).mean(-1)
                    order = torch.argsort(score, descending=True, stable=True)
                    kept = torch.zeros(groups, dtype=torch.bool, device=keep.device)
                    kept[order[:n_keep]] = True
                    keep[start : start + n] = kept.repeat_interleave(g)
                start += n
            return keep
        p = state.prefix
        n_p = state.ids.shape[1] - p
        n_prune = max(prune_number(n_p, targets[0], remaining, r) for r in ratios)
        if n_prune == 0:
            return None
        score = torch.gather(self._cum.to(state.ids.device), 1, state.ids[:, p:])
        order = torch.argsort(score, dim=1, descending=True, stable=True)[:, : n_p - n_prune]
        keep = torch.zeros_like(state.ids, dtype=torch.bool)
        keep[:, :p] = True
        keep[:, p:].scatter_(1, order, True)
        return keep

    # -- LLM layer k (two phase) -------------------------------------------------------------------
    def on_llm_attention(self, ctx: PrefillContext, layer, query, key, value, mask, scaling) -> None:
        pos = ctx.visual_pos.to(key.device)  # (B, n)
        b, heads, _, d = query.shape
        last = ctx.seq_len - 1
        hk = key.shape[1]
        idx = pos[:, None, :, None].expand(b, hk, pos.shape[1], d)
        k_vis = torch.gather(key, 2, idx).float()
        v_vis = torch.gather(value, 2, idx).float()
        q_t = query[:, :, last].float()  # (B, H, d)
        k_rep = k_vis.repeat_interleave(heads // hk, dim=1)
        scale = scaling if scaling is not None else d**-0.5
        rel = torch.softmax(torch.einsum("bhd,bhnd->bhn", q_t, k_rep) * scale, dim=-1).mean(1)
        v_t = value[:, :, last].float()  # (B, Hkv, d)
        sem = torch.softmax(torch.einsum("bhd,bhnd->bhn", v_t, v_vis) / math.sqrt(d), dim=-1).mean(1)
        vnorm = v_vis.abs().sum(-1).sum(1)
        self._llm_scores = (ctx.visual_ids.clone(), importance(rel, sem, vnorm))

    def at_layer(self, ctx: PrefillContext, layer: int, current: torch.Tensor,
                 hidden_states: torch.Tensor) -> torch.Tensor:
        if self._llm_scores is None or not torch.equal(self._llm_scores[0].to(current.device), current):
            raise RuntimeError(f"flowcut: no attention scores of LLM layer {layer - 1} for this prefill")
        scores = self._llm_scores[1].to(current.device)
        tokens = ctx.layout.tokens
        prunable = torch.gather(tokens.prunable, 1, current)
        image = torch.gather(tokens.image, 1, current)
        big_l, k = self.adapter.num_llm_layers, layer
        budget = float(self.config.budget)
        counts = {}
        for bi in range(current.shape[0]):
            for g in image[bi].unique().tolist():
                n_full = int((tokens.prunable[bi] & (tokens.image[bi] == g)).sum())
                n_enter = int((prunable[bi] & (image[bi] == g)).sum())
                # (k·n_enter + (L−k)·n_final) / (L·n_full) = budget
                n_final = round((budget * big_l * n_full - k * n_enter) / (big_l - k))
                counts[(bi, g)] = min(n_enter, max(1, n_final))  # a stage never empties an image
        return topk_per_group(scores, image, prunable, counts)


register_method("flowcut", FlowCutConfig, FlowCutMethod)
