"""Budget arithmetic shared by every method.

The budget unit is the average fraction of the prunable visual tokens present over the LLM's layers
(VFlowOpt eq. 5 / Algorithm 1). A schedule is a list of (first layer, fraction of the original visual
tokens present from that layer on); layer 0 means "before the LLM".
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import ConfigError


def default_stage_layers(num_layers: int) -> tuple[int, int]:
    """The paper's even three-way split: pruning at layers floor(L/3) and floor(2L/3)."""
    return num_layers // 3, (2 * num_layers) // 3


def check_stage_layers(stage_layers: Sequence[int], num_layers: int, *, first: int = 1) -> tuple[int, ...]:
    """In-LLM pruning layers must be increasing and inside (first-1, num_layers)."""
    layers = tuple(stage_layers)
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in layers):
        raise ConfigError(f"stage_layers must be integers, got {stage_layers!r}")
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"stage_layers must be strictly increasing, got {layers}")
    if layers and (layers[0] < first or layers[-1] >= num_layers):
        raise ConfigError(
            f"stage_layers {layers} must lie in [{first}, {num_layers - 1}] for this model, "
            f"whose LLM has {num_layers} decoder layers"
        )
    return layers


def schedule_mean(schedule: Sequence[tuple[int, float]], num_layers: int) -> float:
    """Mean over layers of the fraction present; `schedule` is [(start_layer, fraction), ...]."""
    total = 0.0
    for i, (start, frac) in enumerate(schedule):
        end = schedule[i + 1][0] if i + 1 < len(schedule) else num_layers
        total += frac * (end - start)
    return total / num_layers


def three_stage_mean(ratios: Sequence[float], stage_layers: Sequence[int], num_layers: int) -> float:
    """R̄ = (R1·L1 + R1·R2·L2 + R1·R2·R3·L3) / L, R2 and R3 relative to the previous stage."""
    r1, r2, r3 = ratios
    k1, k2 = stage_layers
    return schedule_mean([(0, r1), (k1, r1 * r2), (k2, r1 * r2 * r3)], num_layers)


def solve_r3(budget: float, r1: float, r2: float, stage_layers: Sequence[int], num_layers: int) -> float:
    """R3 from the budget constraint; may fall outside [0, 1] (the caller refuses such strategies)."""
    k1, k2 = stage_layers
    l1, l2, l3 = k1, k2 - k1, num_layers - k2
    if r1 * r2 == 0:
        return 0.0 if abs(budget * num_layers - r1 * l1) < 1e-12 else float("inf")
    return (budget * num_layers - r1 * l1 - r1 * r2 * l2) / (r1 * r2 * l3)


def keep_count(n: int, ratio: float) -> int:
    """Tokens kept out of n at a ratio: round(ratio·n), but at least one of an image that has any.

    Rounding is per stage, so the realised mean stays within one token per stage of the requested
    budget; the floor of one token means a stage never empties an image (round(0.5·1) would be 0),
    so a budget below 1/n is realised as one token per image and stage (stats.mean_retention tells)."""
    if n <= 0:
        return 0
    return min(n, max(1, int(round(ratio * n))))


def realised_mean(per_layer_counts: Sequence[int], n_visual: int) -> float:
    """The budget actually spent: mean over layers of visual tokens present / visual tokens produced."""
    if n_visual == 0 or not per_layer_counts:
        return 1.0
    return sum(per_layer_counts) / (len(per_layer_counts) * n_visual)
