"""VFlowOpt inference (paper sections 3.1-3.2).

Importance: calibrated vision-encoder attention plus patch entropy,
    K = {j : Σ_i A_ij > t·(1/N)·Σ_i Σ_j A_ij},   I_i = Σ_{k∈K} A_ki + α·softmax(H)_i,
taken (heads averaged) at the vision layer whose output becomes the features, then packed like the
features so it aligns 1:1 with the visual tokens. Pruning is progressive and text-agnostic: keep R1
before the LLM (recycling the pruned tokens cell by cell), R2 of those at stage_layers[0] and R3 of
those at stage_layers[1]. Every image is ranked on its own and keeps its share of the budget.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch

from ..budget import check_stage_layers, default_stage_layers, keep_count, solve_r3, three_stage_mean
from ..config import PruneConfig, check_fraction
from ..errors import CalibrationWarning, ConfigError
from ..models.base import ModelAdapter
from ..ops.recycle import grid_cells, select_with_recycling
from ..registry import register_method
from ..spaces import Candidate, Dim, SearchSpace
from .base import PrefillContext, PruningMethod, Selection, keep_top_per_image

#: Default-strategy rule (documented in the README): keep R1 = min(1, 1.2·budget) before the LLM,
#: R2 = 1, and solve R3 from the budget. The official LLaVA-OV-7B strategies keep R1 between
#: 1.06 and 1.45 times the budget and R2 near 1 (reference/seeds.md §1.7).
DEFAULT_R1_FACTOR = 1.2
DEFAULT_THRESHOLD = 35.0  # official strategies: t in 28.7-39.3
DEFAULT_GRID = 16.0  # official strategies: a in 11.8-17.4 on 27×27 grids
#: Accepted ranges beyond which a value is a mistake, not a strategy: |α| this large already ranks by
#: entropy alone (softmax(H) sums to 1 over the image); a cell wider than any grid is one cell per grid.
MAX_ENTROPY_WEIGHT = 100.0
MAX_GRID = 1024.0


@dataclass
class VFlowOptConfig(PruneConfig):
    """VFlowOpt strategy. `budget` alone gives the default strategy; explicit fields override it.

    retention: (R1, R2, R3) or (R1, R2) with R3 solved from the budget; R2, R3 are relative to the
    previous stage. threshold: t. entropy_weight: α. grid_size: a (cell side, in tokens of each grid).
    stage_layers: the two in-LLM pruning layers (default floor(L/3), floor(2L/3)). vision_layer: the
    ViT layer scored (default: the one whose output becomes the features). calibration: "sum" over K
    as in the paper's eq. 4, or "mean" as the official code does. positions: "keep" the original
    position ids, or "compact" renumbering after the pre-LLM stage as the official code does.
    """

    budget: float | None = None
    retention: tuple[float, ...] | None = None
    threshold: float = DEFAULT_THRESHOLD
    entropy_weight: float = 0.0
    grid_size: float = DEFAULT_GRID
    recycle: bool = True
    stage_layers: tuple[int, int] | None = None
    vision_layer: int | None = None
    calibration: str = "sum"
    positions: str = "keep"
    image_mean: tuple[float, float, float] | None = None
    image_std: tuple[float, float, float] | None = None
    # Videos: frames per recycling cell (1: a × a cells within each frame; n: a × a × n spatio-temporal
    # cells; 0: one a × a column through all the video's frames).
    cell_frames: int = 1

    def validate(self) -> None:
        super().validate()
        if self.cell_frames < 0:
            raise ConfigError(f"cell_frames must be >= 0 (0 = all frames of a video in one cell), "
                              f"got {self.cell_frames}")
        if self.budget is None and (self.retention is None or len(self.retention) != 3 or None in self.retention):
            raise ConfigError("VFlowOptConfig needs a budget in (0, 1], or a full retention=(R1, R2, R3)")
        if self.retention is not None:
            if len(self.retention) not in (2, 3):
                raise ConfigError(f"retention must be (R1, R2) or (R1, R2, R3), got {self.retention!r}")
            for name, r in zip(("R1", "R2", "R3"), self.retention):
                if r is not None:
                    check_fraction(f"retention {name}", r)
        for name in ("threshold", "entropy_weight", "grid_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        if self.threshold < 0:
            raise ConfigError(f"threshold (t) must be >= 0, got {self.threshold}")
        if not -MAX_ENTROPY_WEIGHT <= self.entropy_weight <= MAX_ENTROPY_WEIGHT:
            raise ConfigError(f"entropy_weight (α) must lie in [-{MAX_ENTROPY_WEIGHT:g}, {MAX_ENTROPY_WEIGHT:g}] "
                              f"(the search space uses [-1, 1]), got {self.entropy_weight}")
        if not 1 <= self.grid_size <= MAX_GRID:
            raise ConfigError(f"grid_size (a) must lie in [1, {MAX_GRID:g}] tokens, got {self.grid_size}")
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if value is not None and name == "image_std" and not all(v > 0 for v in value):
                raise ConfigError(f"image_std must be three numbers > 0 (one per RGB channel), got {list(value)}")
        if self.calibration not in ("sum", "mean"):
            raise ConfigError(f"calibration must be 'sum' (paper) or 'mean' (official code), got {self.calibration!r}")
        if self.positions not in ("keep", "compact"):
            raise ConfigError(f"positions must be 'keep' or 'compact', got {self.positions!r}")
        if self.stage_layers is not None and len(self.stage_layers) != 2:
            raise ConfigError(f"stage_layers must be two LLM layer indices, got {self.stage_layers!r}")

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers: tuple[int, int] | None = None,
                     grid_side: int | None = None):
        """The box `vflowopt.optimize` searches (paper 3.3 / Algorithm 1), derived from the budget B
        and the model; R3 is not searched but solved from the budget constraint.

        R1 ∈ [B, min(1, 1.5B)] (the official pattern). R2 ∈ [R2_lo, 1], where R2_lo is the smallest
        R2 that meets the budget with R3 <= 1 at the midpoint of the R1 range,
        R2_lo = (B·L/R1_mid − L1)/(L2 + L3) (0.705 for the official 9/9/10 split, vs the official
        fixed 0.533): about 76% of the (R1, R2) box is then feasible instead of about 60%, and every
        shipped official strategy lies inside it. t ∈ [0, min(50, N)] with N the ViT tokens of one
        grid (t >= N would leave the calibration set K empty). a ∈ [s/9, 8s/9] (at least 1) for a
        token grid of side s, i.e. the official [3, 24] on SigLIP's 27×27 grid. α ∈ [−1, 1].
        A point whose solved R3 falls outside [0, 1] is infeasible (violation = distance outside).
        """
        check_fraction("budget", budget, allow_zero=False)
        stages = check_stage_layers(stage_layers or default_stage_layers(num_layers), num_layers)
        if len(stages) != 2:
            raise ConfigError(f"VFlowOpt needs two in-LLM stage layers, got {stages}")
        k1, k2 = stages
        l1, l23 = k1, num_layers - k1
        r1_lo, r1_hi = float(budget), min(1.0, 1.5 * budget)

        def r2_min(r1: float) -> float:  # smallest R2 with R3 <= 1 at this R1
            return (budget * num_layers / r1 - l1) / l23

        r2_lo = min(1.0, max(0.0, r2_min(r1_hi), r2_min(0.5 * (r1_lo + r1_hi))))
        t_hi = 50.0 if grid_side is None else float(min(50, grid_side * grid_side))
        a_lo, a_hi = (3.0, 24.0) if grid_side is None else (max(1.0, grid_side / 9), max(1.0, 8 * grid_side / 9))
        dims = (
            Dim("R1", r1_lo, r1_hi, help="fraction of the visual tokens kept before the LLM"),
            Dim("R2", r2_lo, 1.0, help=f"fraction of those kept from LLM layer {k1}"),
            Dim("t", 0.0, t_hi, help="threshold sensitivity of the calibration set K"),
            Dim("alpha", -1.0, 1.0, help="entropy weight α"),
            Dim("a", a_lo, a_hi, help="recycling grid cell side, in tokens"),
        )

        def build(p) -> Candidate:
            r1, r2 = float(p["R1"]), float(p["R2"])
            r3 = solve_r3(budget, r1, r2, stages, num_layers)
            violation = max(r3 - 1.0, -r3) if math.isfinite(r3) else 1e3
            fields = {"retention": (r1, r2, r3), "threshold": float(p["t"]), "entropy_weight": float(p["alpha"]),
                      "grid_size": float(p["a"]), "stage_layers": stages}
            return Candidate(fields=fields, violation=violation, info={"R3": r3})

        return SearchSpace(
            method=cls.method or "vflowopt", budget=float(budget), dims=dims, build=build,
            description=f"R3 solved from the budget over stage layers {stages} of {num_layers}",
        )

    def resolve(self, adapter: ModelAdapter) -> VFlowOptConfig:
        """The full strategy for this model: every field explicit, budget constraint checked."""
        self.validate()
        n_layers = adapter.num_llm_layers
        stages = check_stage_layers(self.stage_layers or default_stage_layers(n_layers), n_layers)
        if stages and stages[0] < adapter.min_llm_prune_layer:
            # Qwen3-VL adds deepstack features in its first layers: in-LLM stages must come after them.
            raise ConfigError(
                f"stage_layers {stages}: this {adapter.family} model can prune inside the LLM only from layer "
                f"{adapter.min_llm_prune_layer} on (earlier layers still add visual features at the image positions)"
            )
        if len(stages) != 2:
            raise ConfigError(f"VFlowOpt needs two in-LLM stage layers, got {stages}")
        vision_layer = adapter.check_vision_layer(
            self.vision_layer if self.vision_layer is not None else adapter.feature_layer()
        )
        budget = self.budget
        if self.retention is None:
            r1, r2 = min(1.0, DEFAULT_R1_FACTOR * budget), 1.0
            r3 = solve_r3(budget, r1, r2, stages, n_layers)
            if not 0.0 <= r3 <= 1.0:  # stage layers too late for the rule: one uniform stage
                r1, r3 = budget, 1.0
        else:
            r1, r2 = float(self.retention[0]), float(self.retention[1])
            r3 = self.retention[2] if len(self.retention) == 3 else None
            if r3 is None:
                r3 = solve_r3(budget, r1, r2, stages, n_layers)
                if not 0.0 <= r3 <= 1.0:
                    raise ConfigError(
                        f"retention R1={r1:.4f}, R2={r2:.4f} cannot meet budget {budget} with stage layers "
                        f"{stages} of {n_layers}: R3 would be {r3:.4f}, outside [0, 1]"
                    )
            elif budget is not None:
                mean = three_stage_mean((r1, r2, r3), stages, n_layers)
                if abs(mean - budget) > 1e-3:
                    raise ConfigError(
                        f"retention {tuple(self.retention)} gives a mean retention of {mean:.4f} over "
                        f"{n_layers} layers with stage layers {stages}, not the budget {budget}; "
                        "give R1 and R2 only to have R3 solved, or drop the budget"
                    )
        r3 = float(r3)
        return replace(
            self,
            budget=three_stage_mean((r1, r2, r3), stages, n_layers) if budget is None else budget,
            retention=(r1, r2, r3),
            stage_layers=stages,
            vision_layer=vision_layer,
            image_mean=tuple(self.image_mean or adapter.image_mean),
            image_std=tuple(self.image_std or adapter.image_std),
            model_family=adapter.family,
            num_layers=n_layers,
        )


def calibration_set(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, N, N) head-averaged attention (rows = queries) -> ((n, N) bool K before any fallback,
    (n, N) attention received Σ_i A_ij). K holds the tokens whose received attention exceeds
    t·(1/N)·Σ_ij A_ij, i.e. t times the mean."""
    n_tok = probs.shape[-1]
    received = probs.sum(dim=-2)  # (n, N)
    tau = threshold * probs.sum(dim=(-2, -1), keepdim=False).unsqueeze(-1) / n_tok
    return received > tau, received


def calibrated_attention(probs: torch.Tensor, threshold: float, reduce: str = "sum") -> torch.Tensor:
    """(n, N, N) head-averaged attention (rows = queries) -> (n, N) attention from the set K.

    An empty K falls back to all tokens, so the result is always finite.
    """
    in_k, _ = calibration_set(probs, threshold)
    in_k = torch.where(in_k.any(-1, keepdim=True), in_k, torch.ones_like(in_k))
    score = (probs * in_k.unsqueeze(-1).to(probs.dtype)).sum(dim=-2)
    if reduce == "mean":
        score = score / in_k.sum(-1, keepdim=True).to(probs.dtype)
    return score


class VFlowOptMethod(PruningMethod):
    config_cls = VFlowOptConfig

    def __init__(self, config: VFlowOptConfig, adapter: ModelAdapter):
        super().__init__(config, adapter)
        self.vision_attention_layer = config.vision_layer
        self.needs_pixels = config.entropy_weight != 0.0
        self.llm_layers = tuple(config.stage_layers)
        self._attention: torch.Tensor | None = None
        self._entropy: torch.Tensor | None = None
        self._calibration: dict = {}
        self._warned_empty = False

    def reset(self) -> None:
        self._attention = self._entropy = None
        self._calibration = {}

    def diagnostics(self) -> dict:
        return dict(self._calibration)

    def _record_calibration(self, probs_rows: list[torch.Tensor]) -> None:
        """|K| and the share of all received attention that K holds, per crop (or image), and a one-time
        warning when K was empty (the fallback, every token, was used): see README "VFlowOpt's calibration"."""
        sizes, mass, empty = [], [], 0
        for p in probs_rows:
            in_k, received = calibration_set(p, self.config.threshold)
            for row_k, row_r in zip(in_k, received):
                n = int(row_k.sum())
                sizes.append(n)
                mass.append(round(float(row_r[row_k].sum() / row_r.sum().clamp_min(1e-30)), 4) if n else 0.0)
                empty += n == 0
        self._calibration = {"calibration_set_size": sizes, "calibration_mass": mass, "calibration_empty": empty,
                             "threshold": float(self.config.threshold)}
        if empty and not self._warned_empty:
            self._warned_empty = True
            warnings.warn(
                f"vflowopt: the calibration set K was empty in {empty} of {len(sizes)} crops/images (no token "
                f"received more than t = {self.config.threshold:g} times the mean attention), so every token's "
                "attention was used instead; this vision encoder may have no sink tokens at this layer (see "
                "stats.method_info and the README's 'VFlowOpt's calibration set')", CalibrationWarning, stacklevel=2)

    def on_pixels(self, pixel_values: torch.Tensor) -> None:
        h = self.adapter.patch_entropy(pixel_values, self.config.image_mean, self.config.image_std)
        # softmax over each image's (or crop's) own tokens
        self._entropy = torch.softmax(h, dim=-1) if torch.is_tensor(h) else [torch.softmax(x, -1) for x in h]

    def on_vision_attention(self, probs) -> None:
        skip = self.adapter.vit_prefix_tokens
        self._record_calibration([probs] if torch.is_tensor(probs) else [p[None] for p in probs])
        if torch.is_tensor(probs):
            self._attention = calibrated_attention(probs, self.config.threshold, self.config.calibration)[:, skip:]
        else:
            self._attention = [
                calibrated_attention(p[None], self.config.threshold, self.config.calibration)[0, skip:] for p in probs
            ]

    def importance_map(self):
        """ViT-level importance I of the last vision pass: (n_crops, n_patches) or one vector per image."""
        if self._attention is None:
            raise RuntimeError("vflowopt: no vision-encoder attention was captured for this prefill")
        if not self.config.entropy_weight:
            return self._attention
        alpha = self.config.entropy_weight
        if torch.is_tensor(self._attention):
            return self._attention + alpha * self._entropy.to(self._attention.device)
        return [a + alpha * e.to(a.device) for a, e in zip(self._attention, self._entropy)]

    def before_llm(self, ctx: PrefillContext) -> Selection:
        tokens = ctx.layout.tokens
        importance = torch.nan_to_num(ctx.layout.pack(self.importance_map()), nan=0.0)
        ctx.scratch["importance"] = importance
        r1 = self.config.retention[0]
        keep = ~tokens.prunable
        replaced = torch.zeros_like(keep)
        features = ctx.features
        new_features = features.clone() if self.config.recycle else None
        for b in range(tokens.batch_size):
            for img in tokens.image[b].unique().tolist():
                idx = ((tokens.image[b] == img) & tokens.prunable[b]).nonzero().squeeze(-1)
                n_keep = keep_count(idx.numel(), r1)
                if self.config.recycle:
                    cells = grid_cells(tokens.grid[b, idx], tokens.row[b, idx], tokens.col[b, idx],
                                       self.config.grid_size, tokens.frame[b, idx], self.config.cell_frames)
                    rec = select_with_recycling(importance[b, idx], cells, n_keep, features[b, idx])
                    keep[b, idx] = rec.keep
                    replaced[b, idx] = rec.replaced
                    new_features[b, idx] = rec.features
                else:
                    order = torch.argsort(importance[b, idx], descending=True, stable=True)
                    keep[b, idx[order[:n_keep]]] = True
        return Selection(keep=keep, features=new_features, replaced=replaced)

    def at_layer(self, ctx: PrefillContext, layer: int, current: torch.Tensor,
                 hidden_states: torch.Tensor) -> torch.Tensor:
        ratio = self.config.retention[1] if layer == self.llm_layers[0] else self.config.retention[2]
        scores = torch.gather(ctx.scratch["importance"], 1, current)
        # R2 and R3 are relative to the previous stage: counted from the tokens still present
        return keep_top_per_image(scores, ctx.layout.tokens, current, ratio, of_present=True)


register_method("vflowopt", VFlowOptConfig, VFlowOptMethod)
