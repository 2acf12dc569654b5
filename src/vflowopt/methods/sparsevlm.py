"""SparseVLM (Zhang et al., ICML 2025; the v1/v1.5 algorithm of the official code).

1. Text raters, once per prefill, on the LLM's input embeddings: for the text tokens after the first
   image, relevance m_t = mean over the image's visual tokens v of softmax_t(x_v · x_t) (softmax over
   the text tokens); the raters are the text tokens with m_t above the mean of m.
2. At the input of each stage layer k (default: the official pruning points scaled to the model's
   depth; the official code scores with layers 2, 6, 15 of 32 and prunes their outputs, i.e. the
   inputs of 3, 7, 16) the visual tokens are ranked by the raters' attention at layer
   k−1 (heads averaged, then raters averaged), from the post-RoPE query/key of that layer's own
   attention call (tapped on the side; sdpa is kept).
3. Recycling: of the tokens pruned at a stage, the top `recycle_ratio` (+1) by score are clustered
   (density-peaks kNN, `cluster_ratio`·n + 1 clusters) and each cluster's mean hidden state replaces
   the hidden state of its centre token, which stays in the sequence at its own position.

Budget: every visual token is present before the first stage layer k_1; from stage s on each image
keeps round(f_s · N_image) tokens (merged tokens included), so R̄ = (k_1 + Σ_s f_s·(k_{s+1} − k_s))/L.
The default schedule f(B) follows the official per-budget keep lists (v1: 192 → 300/200/110,
128 → 303/110/36, 96 → 238/48/26, 64 → 66/30/17 of 576 tokens): their shapes are interpolated
linearly in the nominal budget (192/576, ...; (1, 1, 1) at 1.0; below 64/576 the 64 shape), then
scaled by the factor c (fractions capped at 1) that makes R̄ equal B on this model's stage layers,
found by bisection. A budget below k_1/L is refused. With a number of stages other than three, the
shape is PyramidDrop's geometric one. `retention` (one fraction of the original count per stage,
non-increasing) may be given instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..config import PruneConfig, check_fraction
from ..errors import ConfigError
from ..models.base import ModelAdapter
from ..registry import register_method
from ..signals.llm_attention import attention_rows
from ..spaces import Candidate, Dim, SearchSpace
from .base import PrefillContext, PruningMethod, Selection
from .common import image_counts, resolve_stage_layers, take_scores
from .pdrop import cumulative, ratios_from_shares, solve_uniform_ratio, staged_mean

#: the official scoring layers of a 32-layer LLM (`pruning_loc`); tokens leave at the next layer's input
OFFICIAL_SCORING_LAYERS = (2, 6, 15)
OFFICIAL_DEPTH = 32
#: official v1 keep lists (score.py) as (nominal budget, per-stage fractions of 576 tokens)
OFFICIAL_SCHEDULES = (
    (64 / 576, (66 / 576, 30 / 576, 17 / 576)),
    (96 / 576, (238 / 576, 48 / 576, 26 / 576)),
    (128 / 576, (303 / 576, 110 / 576, 36 / 576)),
    (192 / 576, (300 / 576, 200 / 576, 110 / 576)),
    (1.0, (1.0, 1.0, 1.0)),
)
DEFAULT_RECYCLE_RATIO = 0.3  # official: int(0.3·pruned) + 1 tokens recycled
DEFAULT_CLUSTER_RATIO = 0.1  # official: int(recycled / 10) + 1 clusters


def default_sparsevlm_layers(num_layers: int) -> tuple[int, ...]:
    """The official pruning points (the inputs of layers 3, 7, 16 of 32: the outputs of its scoring
    layers 2, 6, 15 are pruned) scaled to the depth, rounded, strictly increasing, at least 1.
    32 layers: (3, 7, 16); 24: (2, 5, 12); 28: (3, 6, 14); 36: (3, 8, 18); 6: (1, 2, 3)."""
    out: list[int] = []
    for s in OFFICIAL_SCORING_LAYERS:
        k = math.floor((s + 1) * num_layers / OFFICIAL_DEPTH + 0.5)
        out.append(max(k, out[-1] + 1 if out else 1))
    return tuple(out)


def official_shape(budget: float) -> tuple[float, ...]:
    """The official keep lists' shape at a nominal budget (linear interpolation between the tables)."""
    if budget <= OFFICIAL_SCHEDULES[0][0]:
        return OFFICIAL_SCHEDULES[0][1]
    for (b0, f0), (b1, f1) in zip(OFFICIAL_SCHEDULES, OFFICIAL_SCHEDULES[1:]):
        if budget <= b1:
            t = (budget - b0) / (b1 - b0)
            return tuple(a + t * (b - a) for a, b in zip(f0, f1))
    return OFFICIAL_SCHEDULES[-1][1]


def default_schedule(budget: float, stage_layers: Sequence[int], num_layers: int) -> tuple[float, ...]:
    """Per-stage fractions of the original visual tokens meeting `budget` exactly (see module doc)."""
    if len(stage_layers) != 3:
        return cumulative([solve_uniform_ratio(budget, stage_layers, num_layers)] * len(stage_layers))
    floor = stage_layers[0] / num_layers
    if budget < floor - 1e-12:
        raise ConfigError(
            f"budget {budget} cannot be met with stage layers {tuple(stage_layers)} of {num_layers}: every "
            f"visual token is present in the first {stage_layers[0]} layers, a mean retention of {floor:.4f} "
            f"already. Use a budget >= {floor:.4f} or an earlier first stage (stage_layers[0] <= "
            f"{max(1, int(budget * num_layers))})"
        )
    shape = official_shape(budget)

    def scaled(c: float) -> tuple[float, ...]:
        return tuple(min(1.0, c * f) for f in shape)

    lo, hi = 0.0, 1.0 / min(shape)
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if staged_mean(scaled(mid), stage_layers, num_layers) < budget:
            lo = mid
        else:
            hi = mid
    return scaled(0.5 * (lo + hi))


# -- the three steps, as plain functions on tensors (tested directly) ------------------------------------
def text_raters(visual: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """(n_text,) bool: text tokens whose relevance to the visual tokens is above the mean.

    visual (n_v, D), text (n_t, D): LLM input embeddings. relevance_t = mean_v softmax_t(visual·textᵀ).
    If no token is above the mean (all equal, e.g. a single text token) every text token rates.
    """
    if text.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=text.device)
    rel = torch.softmax(visual.float() @ text.float().T, dim=-1).mean(0)
    raters = rel > rel.mean()
    return raters if bool(raters.any()) else torch.ones_like(raters)


def rater_scores(probs: torch.Tensor, valid: torch.Tensor, visual_pos: torch.Tensor) -> torch.Tensor:
    """Mean over the valid raters of their (head-averaged) attention to the visual tokens.

    probs (B, R, K) attention rows of the raters, valid (B, R) bool, visual_pos (B, n) -> (B, n)."""
    idx = visual_pos.to(probs.device)[:, None, :].expand(-1, probs.shape[1], -1)
    vis = torch.gather(probs, 2, idx)  # (B, R, n)
    vis = torch.where(valid.unsqueeze(-1), vis, torch.zeros((), dtype=vis.dtype, device=vis.device))
    return vis.sum(1) / valid.sum(1, keepdim=True).clamp_min(1).to(vis.dtype)


def density_peak_clusters(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of x (m, D) into `n_clusters`: (centres (c,) indices into x, assignment (m,)
    cluster number of each token; a centre is in its own cluster).

    Distances are Euclidean / √D; density ρ_i = exp(−mean of the squared distances to the k =
    n_clusters nearest tokens, itself included); δ_i = distance to the nearest denser token (the
    largest distance for the densest); centres = the n_clusters largest ρ·δ. Ties are broken by
    index (deterministic), where the official code adds random noise.
    """
    m, d = x.shape
    c = max(1, min(n_clusters, m))
    xf = x.float()
    dist = torch.cdist(xf, xf) / math.sqrt(d)
    knn = torch.topk(dist, k=c, dim=-1, largest=False).values
    density = torch.exp(-(knn**2).mean(-1))
    # a strict order: rank 0 is the densest; equal densities rank the earlier (better-scored) token first
    rank = torch.empty(m, dtype=torch.long, device=x.device)
    rank[torch.argsort(density, descending=True, stable=True)] = torch.arange(m, device=x.device)
    denser = rank[None, :] < rank[:, None]  # [i, j]: j is denser than i
    far = dist.max()
    delta = torch.where(denser, dist, far).min(-1).values
    score = delta * density
    centres = torch.argsort(score, descending=True, stable=True)[:c]
    assign = dist[:, centres].argmin(-1)
    assign[centres] = torch.arange(c, device=x.device)
    return centres, assign


def recycle_counts(n_current: int, n_keep: int, recycle_ratio: float, cluster_ratio: float) -> tuple[int, int]:
    """(tokens recycled, merged tokens made) at a stage that keeps `n_keep` of `n_current` tokens; the
    merged tokens are part of the `n_keep`. Official: int(0.3·pruned) + 1 recycled into
    int(recycled/10) + 1 clusters."""
    pruned = n_current - n_keep
    if pruned <= 0 or n_keep <= 0 or recycle_ratio <= 0:
        return 0, 0
    n_rec = min(pruned, int(recycle_ratio * pruned) + 1)
    n_merge = min(n_keep, int(cluster_ratio * n_rec) + 1)
    return n_rec, n_merge


def select_and_recycle(scores: torch.Tensor, features: torch.Tensor, n_keep: int, recycle_ratio: float,
                       cluster_ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's stage: (keep (n,), replaced (n,), merged features (n, D), read where replaced).

    The n_keep − n_merge best-scored tokens are kept; the best `n_rec` of the rest are clustered and
    each cluster's mean replaces its centre's features (the centre is kept). Without recycling the
    n_keep best are kept."""
    n = scores.shape[0]
    order = torch.argsort(torch.nan_to_num(scores.float(), nan=float("-inf")), descending=True, stable=True)
    keep = torch.zeros(n, dtype=torch.bool, device=scores.device)
    replaced = torch.zeros_like(keep)
    merged = features.new_zeros(features.shape)
    n_rec, n_merge = recycle_counts(n, n_keep, recycle_ratio, cluster_ratio)
    n_top = min(n, n_keep) - n_merge
    keep[order[:n_top]] = True
    if n_merge:
        rec = order[n_top : n_top + n_rec]
        centres, assign = density_peak_clusters(features[rec], n_merge)
        sums = torch.zeros(n_merge, features.shape[-1], dtype=torch.float32, device=features.device)
        sums.index_add_(0, assign, features[rec].float())
        size = torch.bincount(assign, minlength=n_merge).clamp_min(1).unsqueeze(-1)
        slots = rec[centres]
        keep[slots] = True
        replaced[slots] = True
        merged[slots] = (sums / size).to(features.dtype)
    return keep, replaced, merged


# -- config ----------------------------------------------------------------------------------------------
@dataclass
class SparseVLMConfig(PruneConfig):
    """SparseVLM. `budget`: mean visual retention over the LLM layers (default schedule from the
    official keep lists, see the module doc), or `retention`: the fraction of each image's visual
    tokens present from each stage layer on (of the original count, non-increasing). `stage_layers`:
    LLM layers at whose input tokens leave, scored with the attention of the layer before (default:
    the official 2, 6, 15 of 32 scaled to the depth, + 1). `recycle`: merge the best pruned tokens
    (`recycle_ratio` of them, + 1) into `cluster_ratio`·n + 1 tokens placed at the cluster centres."""

    budget: float | None = None
    stage_layers: tuple[int, ...] | None = None
    retention: tuple[float, ...] | None = None
    recycle: bool = True
    recycle_ratio: float = DEFAULT_RECYCLE_RATIO
    cluster_ratio: float = DEFAULT_CLUSTER_RATIO

    def validate(self) -> None:
        super().validate()
        if self.budget is None and self.retention is None:
            raise ConfigError("SparseVLMConfig needs a budget in (0, 1] or an explicit retention schedule")
        if self.retention is not None:
            if not isinstance(self.retention, (tuple, list)) or not self.retention:
                raise ConfigError(f"retention must be one fraction per stage layer, got {self.retention!r}")
            for i, f in enumerate(self.retention):
                check_fraction(f"retention[{i}]", f)
            if any(b > a for a, b in zip(self.retention, self.retention[1:])):
                raise ConfigError(
                    f"retention {tuple(self.retention)} must be non-increasing (fractions of the original count)"
                )
            if self.stage_layers is not None and len(self.retention) != len(self.stage_layers):
                raise ConfigError(
                    f"retention has {len(self.retention)} entries but there are {len(self.stage_layers)} stage layers"
                )
        stages = self.stage_layers
        if stages is not None and (not isinstance(stages, (tuple, list)) or not stages):
            raise ConfigError(f"stage_layers must be a non-empty list of LLM layers, got {self.stage_layers!r}")
        if not isinstance(self.recycle, bool):
            raise ConfigError(f"recycle must be true or false, got {self.recycle!r}")
        check_fraction("recycle_ratio", self.recycle_ratio)
        check_fraction("cluster_ratio", self.cluster_ratio)

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """The schedule as shares s_1..s_{S−1} ∈ [0, 1] (each stage's ratio to the previous one placed
        in its feasible interval, the last solved: every point meets the budget, see
        `pdrop.ratios_from_shares`), plus recycle_ratio ∈ [0, 0.6] and cluster_ratio ∈ [0.05, 0.5]."""
        check_fraction("budget", budget, allow_zero=False)
        stages = tuple(stage_layers) if stage_layers is not None else default_sparsevlm_layers(num_layers)
        ratios_from_shares(budget, [0.0] * len(stages), stages, num_layers)  # refuses an unreachable budget
        shares = [Dim(f"s{i + 1}", 0.0, 1.0, help=f"where the ratio at layer {stages[i]} sits in its feasible "
                      "range (0: later stages keep all, 1: the next stage keeps none)")
                  for i in range(len(stages) - 1)]
        dims = (*shares,
                Dim("recycle_ratio", 0.0, 0.6, help="share of the pruned tokens recycled into merged tokens"),
                Dim("cluster_ratio", 0.05, 0.5, help="merged tokens per recycled token"))

        def build(p) -> Candidate:
            ratios = ratios_from_shares(budget, [p[d.name] for d in shares], stages, num_layers)
            fractions = cumulative(ratios)
            mean = staged_mean(fractions, stages, num_layers)
            fields = {"stage_layers": stages, "retention": fractions, "recycle_ratio": float(p["recycle_ratio"]),
                      "cluster_ratio": float(p["cluster_ratio"]), "recycle": True}
            return Candidate(fields=fields, violation=abs(mean - budget) - 1e-6,
                             info={f"R{i + 1}": r for i, r in enumerate(ratios)})

        return SearchSpace(method=cls.method or "sparsevlm", budget=float(budget), dims=dims, build=build,
                           description=f"last stage's ratio solved from the budget; stage layers {stages}")

    def resolve(self, adapter: ModelAdapter) -> SparseVLMConfig:
        self.validate()
        n_layers = adapter.num_llm_layers
        stages = resolve_stage_layers(self.stage_layers, default_sparsevlm_layers(n_layers), adapter)
        budget = self.budget
        if self.retention is None:
            retention = default_schedule(budget, stages, n_layers)
        else:
            retention = tuple(float(f) for f in self.retention)
            if len(retention) != len(stages):
                raise ConfigError(
                    f"retention has {len(retention)} entries but there are {len(stages)} stage layers {stages}"
                )
            mean = staged_mean(retention, stages, n_layers)
            if budget is not None and abs(mean - budget) > 1e-3:
                raise ConfigError(
                    f"retention {retention} with stage layers {stages} of {n_layers} gives a mean retention of "
                    f"{mean:.4f}, not the budget {budget}; give the budget alone to use the default schedule"
                )
            budget = budget if budget is not None else mean
        return replace(self, budget=budget, stage_layers=stages, retention=retention, model_family=adapter.family,
                       num_layers=n_layers)


# -- method ----------------------------------------------------------------------------------------------
@dataclass
class _Raters:
    index: torch.Tensor  # (B, R) indices into each sample's text tokens (in order)
    valid: torch.Tensor  # (B, R) bool
    use_last: torch.Tensor  # (B,) bool: no text after the image; rate with the last position instead


def find_raters(ctx: PrefillContext) -> _Raters:
    """The text raters of each sample from the LLM input embeddings (ctx.embeds)."""
    tokens = ctx.layout.tokens
    text_mask = ~ctx.image_mask
    padding = getattr(ctx, "attention_mask", None)  # (B, L) 1 = real token, when the runtime provides it
    found: list[torch.Tensor] = []
    for b in range(tokens.batch_size):
        text_pos = text_mask[b].nonzero().squeeze(-1)
        first_image = int(tokens.seq_index[b].min())
        after = text_pos > first_image  # a suffix of the text order
        if padding is not None:  # padding tokens never rate (left padding puts none after the image anyway)
            after &= padding[b, text_pos].bool()
        after = after.nonzero().squeeze(-1)
        visual = ctx.embeds[b, tokens.seq_index[b, tokens.prunable[b]]]
        raters = text_raters(visual, ctx.embeds[b, text_pos[after]])
        found.append(after[raters])
    width = max(1, max(int(r.numel()) for r in found))
    device = ctx.image_mask.device
    index = torch.zeros(len(found), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(found), width, dtype=torch.bool, device=device)
    for b, r in enumerate(found):
        index[b, : r.numel()] = r
        valid[b, : r.numel()] = True
    return _Raters(index=index, valid=valid, use_last=~valid.any(-1))


def current_text_positions(visual_pos: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, T) positions of the text tokens in the current sequence, in order (text is never pruned, so
    the t-th text token of the prompt is the t-th non-visual row)."""
    b = visual_pos.shape[0]
    is_text = torch.ones(b, seq_len, dtype=torch.bool, device=visual_pos.device)
    is_text.scatter_(1, visual_pos, False)
    return is_text.nonzero()[:, 1].view(b, -1)


class SparseVLMMethod(PruningMethod):
    config_cls = SparseVLMConfig

    def __init__(self, config: SparseVLMConfig, adapter: ModelAdapter):
        super().__init__(config, adapter)
        self.llm_layers = tuple(config.stage_layers)
        self.llm_attention_layers = tuple(k - 1 for k in config.stage_layers)
        self.fractions = dict(zip(self.llm_layers, config.retention))
        self._raters: _Raters | None = None
        self._scores: dict[int, torch.Tensor] = {}

    @property
    def prunes_before_llm(self) -> bool:
        return False

    def reset(self) -> None:
        self._raters = None
        self._scores = {}

    def on_llm_attention(self, ctx: PrefillContext, layer: int, query, key, value, mask, scaling) -> None:
        if self._raters is None:
            self._raters = find_raters(ctx)
        r = self._raters
        text_pos = current_text_positions(ctx.visual_pos, ctx.seq_len)
        if text_pos.shape[1]:
            rows = torch.gather(text_pos, 1, r.index.clamp_max(text_pos.shape[1] - 1))
        else:
            rows = torch.zeros_like(r.index)
        # padding slots (and samples without text after the image) read the last position, which is a
        # real token under left padding: a fully masked row (a pad) would give NaN probabilities
        rows = torch.where(r.valid, rows, torch.full_like(rows, ctx.seq_len - 1))
        valid = r.valid.clone()
        valid[r.use_last, 0] = True
        probs = attention_rows(query, key, rows.to(query.device), scaling, mask)
        self._scores[layer + 1] = rater_scores(probs, valid.to(probs.device), ctx.visual_pos)

    def at_layer(self, ctx: PrefillContext, layer: int, current: torch.Tensor,
                 hidden_states: torch.Tensor) -> Selection:
        scores = take_scores(self._scores, layer, current, "sparsevlm")
        tokens = ctx.layout.tokens
        counts = image_counts(tokens, current, self.fractions[layer])
        prunable = torch.gather(tokens.prunable, 1, current)
        image = torch.gather(tokens.image, 1, current)
        b_all, n = current.shape
        keep = torch.zeros(b_all, n, dtype=torch.bool, device=current.device)
        replaced = torch.zeros_like(keep)
        features = None
        cfg = self.config
        recycle_ratio = cfg.recycle_ratio if cfg.recycle else 0.0
        for (b, g), n_keep in counts.items():
            idx = ((image[b] == g) & prunable[b]).nonzero().squeeze(-1)
            if idx.numel() == 0:
                continue
            feats = hidden_states[b, ctx.visual_pos[b, idx]]
            k, rep, merged = select_and_recycle(scores[b, idx], feats, n_keep, recycle_ratio, cfg.cluster_ratio)
            keep[b, idx] = k
            if bool(rep.any()):
                if features is None:
                    features = hidden_states.new_zeros(b_all, n, hidden_states.shape[-1])
                replaced[b, idx] = rep
                features[b, idx] = merged
        return Selection(keep=keep, features=features, replaced=replaced if features is not None else None)


register_method("sparsevlm", SparseVLMConfig, SparseVLMMethod)
