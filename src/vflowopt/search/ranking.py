"""Choosing the method with VFlowOpt's objective: `optimize(model, samples, budget, method=[...] | "auto")`.

The paper's label-free objective (the last prompt token's final state kept close to the unpruned
model's) ranks whole methods, not only strategies within VFlowOpt: on the shipped VQA model it orders
11 (method, strategy) cells as their accuracy does (Spearman 0.96 at budget 0.25). So a run over
several methods searches each one's strategy space and returns the best strategy overall.

Design. One study per method, in one storage, named like a single-method study ("<method>-budget<B>",
or "<study_name>-<method>"): each keeps the single-method machinery unchanged (its own search box, GP,
Sobol start-up, resume, the checks that refuse to mix models, budgets or samples), a single-method
study of the same storage is reused as it is, and a method added later costs only its own trials. One
study with the method as a categorical dimension would make GPSampler fit one GP across unrelated
boxes (a method's dimensions are meaningless to another) and would have to be thrown away whenever
the method list changes. The unpruned references are computed once (one `Objective` is shared).

Trial budget split. `trials` is the total of COMPLETE trials over the methods that have a search space:
each gets ⌊trials / M⌋, the first (trials mod M) in list order one more, and at least one. Each of
them starts with min(n_startup_trials, ⌈its share / 2⌉) Sobol points, so the GP proposes the other
half. Methods with nothing to tune (random, pool, divprune, vtw) cost no trial: their default strategy
is evaluated once. Every method's default strategy is evaluated and competes too, so a method's row is
max(best trial, default) (see `OptimizeResult.written`; with keep_best the best trial's).

A method that cannot meet the budget on this model (its config or its `prune()` refuses) is listed as
refused with the reason; when every method refuses, the ConfigError lists each reason.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..config import ConfigError, PruneConfig, check_fraction, config_for
from ..errors import NoSearchSpace, PruningError
from ..registry import available_methods
from .objective import Objective
from .space import space_for
from .study import (
    DEFAULT_STARTUP_TRIALS,
    DEFAULT_TRIALS,
    _grid_side,
    _resolve,
    check_trials,
    default_storage,
    default_study_name,
    open_storage,
    run_optimization,
)

__all__ = ["AUTO", "MethodRank", "MethodSearchResult", "resolve_methods", "run_method_search", "split_trials"]

AUTO = ("auto", "all")  # every registered method that can meet the budget on the model


@dataclass
class MethodRank:
    """One method's row of the ranking."""

    method: str
    status: str  # "ok" or "refused"
    value: float | None = None  # objective of `config`: Σ cos over the samples
    n_samples: int = 0
    source: str | None = None  # "trial N" (best trial), "default" (its default strategy scored best), "untuned"
    trials: int = 0  # COMPLETE trials in its study
    mean_retention: float | None = None  # measured on the samples
    config: PruneConfig | None = None
    reason: str | None = None  # why it was refused, or why it was not tuned
    study_name: str | None = None

    @property
    def mean_cosine(self) -> float | None:
        return None if self.value is None or not self.n_samples else self.value / self.n_samples

    def to_dict(self) -> dict[str, Any]:
        strategy = None
        if self.config is not None:
            strategy = {k: v for k, v in self.config.to_dict().items() if k != "schema_version"}
        return {"method": self.method, "status": self.status, "objective": self.value,
                "mean_cosine": self.mean_cosine, "source": self.source, "trials": self.trials,
                "mean_retention": self.mean_retention, "strategy": strategy, "reason": self.reason,
                "study": self.study_name}


@dataclass
class MethodSearchResult:
    """A run over several methods: the best strategy overall and every method's row."""

    config: PruneConfig  # the best strategy overall (written to `out`), resolved against the model
    value: float
    budget: float
    n_samples: int
    storage: str
    ranking: list[MethodRank]  # feasible rows by objective (best first), then refused ones
    trials_split: dict[str, int] = field(default_factory=dict)  # trials asked of each tuned method
    reference_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def method(self) -> str:
        return self.config.method


def resolve_methods(methods: str | Sequence[str]) -> list[str]:
    """"auto"/"all" → every registered method; a name or a list of names → checked against the registry."""
    known = available_methods()
    if isinstance(methods, str):
        if methods.strip().lower() in AUTO:
            return list(known)
        methods = [methods]
    if not isinstance(methods, Sequence) or not methods:
        raise ConfigError("methods must be 'auto', 'all' or a non-empty list of method names; known: "
                          + ", ".join(known))
    names: list[str] = []
    for name in methods:
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"method names must be non-empty strings, got {name!r}")
        name = name.strip()
        if name not in known:
            raise ConfigError(f"unknown method '{name}'; known: {', '.join(known)} (or 'all')")
        if name not in names:
            names.append(name)
    return names


def split_trials(trials: int, tuned: Sequence[str]) -> dict[str, int]:
    """The documented split: ⌊trials/M⌋ each, the remainder to the first, at least one each."""
    m = len(tuned)
    if m == 0:
        return {}
    return {name: max(1, trials // m + (1 if i < trials % m else 0)) for i, name in enumerate(tuned)}


def _study_name(prefix: str | None, method: str, budget: float) -> str:
    return f"{prefix}-{method}" if prefix else default_study_name(method, budget)


def _one_line(exc: BaseException) -> str:
    lines = [s.strip() for s in str(exc).splitlines() if s.strip()]
    return lines[0] if lines else type(exc).__name__


def run_method_search(
    model: nn.Module,
    samples: Sequence[Mapping],
    budget: float,
    methods: str | Sequence[str] = "auto",
    *,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    storage=None,
    study_name: str | None = None,
    n_startup_trials: int = DEFAULT_STARTUP_TRIALS,
    progress: bool = True,
    out: str | os.PathLike | None = None,
    callbacks: Sequence[Callable] = (),
    cache_references: bool = True,
    keep_best: bool = False,
    on_method: Callable[[MethodRank], None] | None = None,
) -> MethodSearchResult:
    """Search every method's strategy on the same samples and return the best overall (see the module
    docstring for the study layout and the trial split). `study_name` is a prefix here; `on_method` is
    called with each method's row as soon as it is known (the CLI prints progress with it)."""
    from ..models.base import adapter_for

    t0 = time.perf_counter()
    check_trials(trials, n_startup_trials)
    check_fraction("budget", budget, allow_zero=False)
    names = resolve_methods(methods)
    adapter = adapter_for(model)
    n_layers = adapter.num_llm_layers
    objective = Objective(model, samples, cache_references=cache_references)
    storage_obj, storage_name = open_storage(storage if storage is not None else default_storage(out))

    rows: dict[str, MethodRank] = {}
    plan: dict[str, str | None] = {}  # method -> None (tune) or why it is not tuned
    for name in names:
        try:
            space_for(name, budget, n_layers, grid_side=_grid_side(adapter))
            plan[name] = None
            continue
        except NoSearchSpace:
            why = "nothing to tune"
        except ConfigError as exc:  # a box this model cannot realise: the default strategy may still run
            why = f"not tuned: {_one_line(exc)}"
        try:
            _resolve(config_for(name, budget=budget), adapter)
            plan[name] = why
        except (ConfigError, PruningError, TypeError) as exc:
            rows[name] = MethodRank(name, "refused", reason=_one_line(exc))
    split = split_trials(trials, [n for n, why in plan.items() if why is None])

    for name, why in plan.items():
        share = split.get(name, 0)
        try:
            result = run_optimization(
                model, samples, budget, trials=max(1, share), seed=seed, storage=storage_obj, method=name,
                study_name=_study_name(study_name, name, budget),
                n_startup_trials=min(n_startup_trials, math.ceil(share / 2)), progress=progress, out=None,
                callbacks=callbacks, keep_best=keep_best, objective=objective, tune=why is None,
                progress_label=name,
            )
        except (ConfigError, PruningError) as exc:
            rows[name] = MethodRank(name, "refused", reason=_one_line(exc))
        else:
            tuned = result.space is not None
            value = result.value if result.written == "best" else result.default_value
            rows[name] = MethodRank(
                name, "ok", value=float(value), n_samples=result.n_samples,
                source=("untuned" if not tuned else "default" if result.written == "default"
                        else f"trial {result.best_trial}"),
                trials=result.trials_complete, mean_retention=result.mean_retention, config=result.config,
                reason=why, study_name=result.study_name,
            )
        if on_method is not None:
            on_method(rows[name])

    ok = [r for n in names if (r := rows[n]).status == "ok"]
    if not ok:
        reasons = "; ".join(f"{n}: {rows[n].reason}" for n in names)
        raise ConfigError(f"no method can meet budget {budget:g} on this model ({reasons})")
    order = {n: i for i, n in enumerate(names)}
    ok.sort(key=lambda r: (-r.value, order[r.method]))
    ranking = ok + [rows[n] for n in names if rows[n].status != "ok"]
    best = ok[0]
    if out is not None:
        best.config.save(out)
    return MethodSearchResult(
        config=best.config, value=float(best.value), budget=float(budget), n_samples=len(objective),
        storage=storage_name, ranking=ranking, trials_split=split, reference_seconds=objective.reference_seconds,
        seconds=time.perf_counter() - t0,
    )

