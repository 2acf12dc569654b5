"""PyramidDrop (Xing et al., CVPR 2025): visual tokens dropped in stages, a fixed ratio λ each time.

The LLM is split into stages at `stage_layers` (default ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋, i.e. 8/16/24 of 32);
at the input of each stage layer k every image keeps λ of the visual tokens it had in the previous
stage, ranked by the attention of the last instruction token (the prefill's last position) recomputed
at that stage, heads averaged. The scores come from the post-RoPE query/key of layer k−1's own
attention call (tapped on the side; sdpa is kept).

Budget: with stage layers k_1 < ... < k_S and λ_s the ratio of stage s (relative to stage s−1),

    R̄(λ) = (k_1 + λ_1·(k_2 − k_1) + λ_1·λ_2·(k_3 − k_2) + ... + λ_1···λ_S·(L − k_S)) / L.

With one λ for every stage (the paper) R̄ is a polynomial in λ that grows monotonically from k_1/L at
λ = 0 to 1 at λ = 1, so λ is solved from the budget by bisection on [0, 1]; a budget below k_1/L
cannot be met with these stage layers and is refused. Each image keeps round(λ_1···λ_s · N_image)
tokens in stage s (counted from its original N, so the realised mean stays within one token per
stage of the schedule). `ratio` may be given instead of the budget: one λ, or one per stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..budget import schedule_mean
from ..config import PruneConfig, check_fraction
from ..errors import ConfigError
from ..models.base import ModelAdapter
from ..registry import register_method
from ..spaces import Candidate, Dim, SearchSpace
from .common import LastTokenAttentionMethod, resolve_stage_layers


def default_pdrop_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's stage boundaries L/4, L/2, 3L/4 (8, 16, 24 for 32 layers), rounded down."""
    return num_layers // 4, num_layers // 2, (3 * num_layers) // 4


def cumulative(ratios: Sequence[float]) -> tuple[float, ...]:
    """Per-stage ratios (each relative to the previous stage) -> fractions of the original count."""
    out, f = [], 1.0
    for r in ratios:
        f *= float(r)
        out.append(f)
    return tuple(out)


def staged_mean(fractions: Sequence[float], stage_layers: Sequence[int], num_layers: int) -> float:
    """Mean retention over the layers: all tokens before the first stage, `fractions[s]` of the
    original count from stage layer s on."""
    return schedule_mean([(0, 1.0), *zip(stage_layers, fractions)], num_layers)


def solve_uniform_ratio(budget: float, stage_layers: Sequence[int], num_layers: int) -> float:
    """The λ in [0, 1] with R̄(λ, λ, ...) = budget (bisection: R̄ is non-decreasing in λ)."""
    floor = stage_layers[0] / num_layers
    if budget < floor - 1e-12:
        raise ConfigError(
            f"budget {budget} cannot be met with stage layers {tuple(stage_layers)} of {num_layers}: every "
            f"visual token is present in the first {stage_layers[0]} layers, a mean retention of {floor:.4f} "
            f"already. Use a budget >= {floor:.4f} or an earlier first stage (stage_layers[0] <= "
            f"{max(1, int(budget * num_layers))})"
        )
    n = len(stage_layers)

    def mean(lam: float) -> float:
        return staged_mean(cumulative([lam] * n), stage_layers, num_layers)

    lo, hi = 0.0, 1.0
    if mean(hi) <= budget:
        return 1.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mean(mid) < budget:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def ratios_from_shares(budget: float, shares: Sequence[float], stage_layers: Sequence[int],
                       num_layers: int) -> tuple[float, ...]:
    """Per-stage ratios meeting the budget, from one share in [0, 1] per stage but the last.

    Stage j's ratio is placed at `shares[j]` of its feasible interval given the earlier ratios: from
    the value that meets the budget with every later stage keeping all (share 0) to the one that
    meets it with the next stage keeping nothing (share 1). The last ratio is solved, so every point
    of the unit box is a schedule with exactly the budget (a box without infeasible corners).
    """
    n = len(stage_layers)
    bounds = [*stage_layers, num_layers]
    excess = budget * num_layers - stage_layers[0]
    if excess < -1e-9:
        raise ConfigError(
            f"budget {budget} is below {stage_layers[0]}/{num_layers}, the retention of the layers before the "
            f"first stage layer {stage_layers[0]}; use an earlier first stage"
        )
    ratios: list[float] = []
    prefix = 1.0  # fraction of the original count present before stage j
    for j in range(n):
        rest = num_layers - bounds[j]
        span = bounds[j + 1] - bounds[j]
        if prefix <= 0 or rest <= 0:
            x = 0.0 if j < n - 1 else 1.0
        elif j == n - 1:
            x = excess / (prefix * rest)
        else:
            lo = max(0.0, excess / (prefix * rest))
            hi = min(1.0, excess / (prefix * span)) if span > 0 else 1.0
            x = lo + float(shares[j]) * (max(lo, hi) - lo)
        x = min(1.0, max(0.0, x))
        ratios.append(x)
        prefix *= x
        excess -= prefix * span
    return tuple(ratios)


def _check_ratio(value) -> None:
    if isinstance(value, (tuple, list)):
        if not value:
            raise ConfigError("ratio must be one number or one per stage, got an empty list")
        for i, r in enumerate(value):
            check_fraction(f"ratio[{i}]", r)
    else:
        check_fraction("ratio (λ)", value)


@dataclass
class PDropConfig(PruneConfig):
    """PyramidDrop. `budget`: mean visual retention over the LLM layers (λ solved from it), or
    `ratio`: λ (one number: each stage keeps λ of the previous one) or one ratio per stage;
    `stage_layers`: the LLM layers at whose input tokens are dropped (default ⌊L/4⌋, ⌊L/2⌋, ⌊3L/4⌋,
    moved up to the model's first allowed pruning layer where needed)."""

    budget: float | None = None
    stage_layers: tuple[int, ...] | None = None
    ratio: float | tuple[float, ...] | None = None

    def validate(self) -> None:
        super().validate()
        if self.budget is None and self.ratio is None:
            raise ConfigError("PDropConfig needs a budget in (0, 1] or an explicit ratio λ")
        if self.ratio is not None:
            _check_ratio(self.ratio)
        if self.stage_layers is not None:
            if not isinstance(self.stage_layers, (tuple, list)) or not self.stage_layers:
                raise ConfigError(f"stage_layers must be a non-empty list of LLM layers, got {self.stage_layers!r}")
            if isinstance(self.ratio, (tuple, list)) and len(self.ratio) != len(self.stage_layers):
                raise ConfigError(
                    f"ratio has {len(self.ratio)} entries but there are {len(self.stage_layers)} stage layers"
                )

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers=None, grid_side=None):
        """Per-stage ratios λ_1..λ_S (the paper's uniform λ is one point of the box), searched as
        shares s_1..s_{S−1} ∈ [0, 1]: λ_j sits at s_j of its feasible interval given the earlier
        ratios and λ_S is solved, so every point meets the budget (`ratios_from_shares`)."""
        check_fraction("budget", budget, allow_zero=False)
        stages = tuple(stage_layers) if stage_layers is not None else default_pdrop_layers(num_layers)
        if len(stages) < 2:
            raise ConfigError("PDrop with one stage has no free ratio to search (it is solved from the budget)")
        ratios_from_shares(budget, [0.0] * len(stages), stages, num_layers)  # refuses an unreachable budget
        dims = tuple(
            Dim(f"s{i + 1}", 0.0, 1.0, help=f"where the ratio at layer {stages[i]} sits in its feasible range "
                f"(0: later stages keep all, 1: the next stage keeps none)")
            for i in range(len(stages) - 1)
        )

        def build(p) -> Candidate:
            ratios = ratios_from_shares(budget, [p[d.name] for d in dims], stages, num_layers)
            mean = staged_mean(cumulative(ratios), stages, num_layers)
            return Candidate(fields={"ratio": ratios, "stage_layers": stages}, violation=abs(mean - budget) - 1e-6,
                             info={f"lambda{i + 1}": r for i, r in enumerate(ratios)})

        return SearchSpace(method=cls.method or "pdrop", budget=float(budget), dims=dims, build=build,
                           description=f"last stage's ratio solved from the budget; stage layers {stages}")

    def resolve(self, adapter: ModelAdapter) -> PDropConfig:
        self.validate()
        n_layers = adapter.num_llm_layers
        stages = resolve_stage_layers(self.stage_layers, default_pdrop_layers(n_layers), adapter)
        if isinstance(self.ratio, (tuple, list)) and len(self.ratio) != len(stages):
            raise ConfigError(f"ratio has {len(self.ratio)} entries but there are {len(stages)} stage layers {stages}")
        budget = self.budget
        if self.ratio is None:
            ratio: float | tuple[float, ...] = solve_uniform_ratio(budget, stages, n_layers)
        else:
            ratio = tuple(float(r) for r in self.ratio) if isinstance(self.ratio, (tuple, list)) else float(self.ratio)
            mean = staged_mean(cumulative(_per_stage(ratio, len(stages))), stages, n_layers)
            if budget is not None and abs(mean - budget) > 1e-3:
                raise ConfigError(
                    f"ratio {self.ratio} with stage layers {stages} of {n_layers} gives a mean retention of "
                    f"{mean:.4f}, not the budget {budget}; give the budget alone to have λ solved"
                )
            budget = budget if budget is not None else mean
        return replace(self, budget=budget, stage_layers=stages, ratio=ratio, model_family=adapter.family,
                       num_layers=n_layers)


def _per_stage(ratio, n: int) -> tuple[float, ...]:
    return tuple(ratio) if isinstance(ratio, (tuple, list)) else (float(ratio),) * n


class PDropMethod(LastTokenAttentionMethod):
    config_cls = PDropConfig
    name = "pdrop"

    def __init__(self, config: PDropConfig, adapter: ModelAdapter):
        super().__init__(config, adapter, tuple(config.stage_layers))
        fractions = cumulative(_per_stage(config.ratio, len(self.llm_layers)))
        self.fractions = dict(zip(self.llm_layers, fractions))  # layer -> fraction of the original kept

    def fraction_at(self, layer: int) -> float:
        return self.fractions[layer]


register_method("pdrop", PDropConfig, PDropMethod)
