"""Search-space data: which numeric hyper-parameters of a method the optimizer tunes, over what ranges.

Plain data declared by the configs (below methods in the dependency order, so a method file imports it
at the top); search/ reads it and runs the study.

A method opts in by giving its config class a classmethod

    search_space(budget, num_layers, *, stage_layers=None, grid_side=None) -> SearchSpace

(see `VFlowOptConfig.search_space`; the base class declares none). The space is a box of named
dimensions plus a `build` function that turns one point of the box into config fields. Points the
method cannot realise under the budget (e.g. VFlowOpt's R3 solved outside [0, 1]) come back with a
positive `violation`: the study reports them to the sampler as infeasible and never returns them as the
best strategy; nothing is clipped.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

__all__ = ["Candidate", "Dim", "SearchSpace"]


@dataclass(frozen=True)
class Dim:
    """One searched hyper-parameter: a real (or integer) interval [low, high], optionally log-scaled."""

    name: str
    low: float
    high: float
    log: bool = False
    integer: bool = False
    help: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ConfigError(f"search dimension {self.name}: bad range [{self.low}, {self.high}]")
        if self.log and self.low <= 0:
            raise ConfigError(f"search dimension {self.name}: a log scale needs low > 0, got {self.low}")

    def distribution(self):
        import optuna

        if self.integer:
            return optuna.distributions.IntDistribution(int(self.low), int(self.high), log=self.log)
        return optuna.distributions.FloatDistribution(float(self.low), float(self.high), log=self.log)

    def from_unit(self, u: float) -> float:
        """Maps u in [0, 1) to the dimension (uniform, or log-uniform)."""
        if self.log:
            value = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            value = self.low + u * (self.high - self.low)
        value = min(max(value, self.low), self.high)
        return int(round(value)) if self.integer else value


@dataclass
class Candidate:
    """A point of the box turned into config fields.

    `violation` <= 0: feasible (its magnitude is the margin); > 0: infeasible, by how much. `info`
    holds derived values worth recording with the trial (e.g. the solved R3).
    """

    fields: dict[str, Any]
    violation: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def feasible(self) -> bool:
        return self.violation <= 0.0


@dataclass
class SearchSpace:
    """The box the sampler explores for one method at one budget on one model."""

    method: str
    budget: float
    dims: tuple[Dim, ...]
    build: Callable[[Mapping[str, float]], Candidate]
    description: str = ""

    def __post_init__(self) -> None:
        names = [d.name for d in self.dims]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"a search space needs distinct dimension names, got {names}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d.name for d in self.dims)

    def distributions(self) -> dict[str, Any]:
        return {d.name: d.distribution() for d in self.dims}

    def suggest(self, trial) -> dict[str, float]:
        """Asks an Optuna trial for one value per dimension, in declaration order."""
        out = {}
        for d in self.dims:
            if d.integer:
                out[d.name] = trial.suggest_int(d.name, int(d.low), int(d.high), log=d.log)
            else:
                out[d.name] = trial.suggest_float(d.name, float(d.low), float(d.high), log=d.log)
        return out

    def candidate(self, params: Mapping[str, float]) -> Candidate:
        missing = [n for n in self.names if n not in params]
        if missing:
            raise ConfigError(f"search point lacks {missing}; the space has {list(self.names)}")
        cand = self.build({n: params[n] for n in self.names})
        v = float(cand.violation)
        cand.violation = 1e3 if math.isnan(v) else max(-1e3, min(1e3, v))  # finite, for the sampler
        return cand

    def with_bounds(self, **bounds: tuple[float, float]) -> SearchSpace:
        """A copy with some ranges replaced, e.g. `space.with_bounds(R1=(0.1, 1.0))`."""
        unknown = sorted(set(bounds) - set(self.names))
        if unknown:
            raise ConfigError(f"unknown search dimension(s) {unknown}; the space has {list(self.names)}")
        dims = tuple(
            dataclasses.replace(d, low=float(bounds[d.name][0]), high=float(bounds[d.name][1]))
            if d.name in bounds else d
            for d in self.dims
        )
        return dataclasses.replace(self, dims=dims)

    def summary(self) -> dict[str, list[float]]:
        """{name: [low, high]}: recorded with a study so that a resumed run explores the same box."""
        return {d.name: [round(float(d.low), 10), round(float(d.high), 10)] for d in self.dims}

    def describe(self) -> str:
        parts = [f"{d.name} ∈ [{d.low:.4g}, {d.high:.4g}]" + (" (log)" if d.log else "") for d in self.dims]
        return "; ".join(parts) + (f". {self.description}" if self.description else "")

    def feasible_fraction(self, points_per_dim: int = 41) -> float:
        """Share of a regular grid over the first two dimensions (the others at their midpoints) that
        is feasible: a cheap look at how much of the box the budget constraint cuts away."""
        mids = {d.name: d.from_unit(0.5) for d in self.dims}
        grid_dims = self.dims[:2]
        total = ok = 0
        steps = [i / (points_per_dim - 1) for i in range(points_per_dim)]
        for u in steps:
            for w in steps if len(grid_dims) > 1 else [0.0]:
                point = dict(mids)
                point[grid_dims[0].name] = grid_dims[0].from_unit(u)
                if len(grid_dims) > 1:
                    point[grid_dims[1].name] = grid_dims[1].from_unit(w)
                total += 1
                ok += self.candidate(point).feasible
        return ok / total
