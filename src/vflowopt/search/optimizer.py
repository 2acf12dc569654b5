"""`vflowopt.optimize`: the public entry point, over one method's strategies or over several methods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from ..config import ConfigError, PruneConfig
from .ranking import AUTO, run_method_search
from .study import DEFAULT_TRIALS, run_optimization

__all__ = ["optimize"]

_SINGLE_ONLY = ("base", "space")  # a base config or a custom box belongs to one method


def optimize(
    model: nn.Module,
    samples: Sequence[Mapping],
    budget: float,
    trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    storage=None,
    method: str | Sequence[str] = "vflowopt",
    **kwargs,
) -> PruneConfig:
    """Search the pruning strategy for `model` at `budget` (VFlowOpt paper 3.3), within one method or
    across several.

    samples: processor outputs, one dict of tensors per sample as given to `model(**x)` (the paper
        uses 30 unlabeled samples). The objective is Σ over samples of the cosine similarity of the
        last prompt token's final-normed last-layer state with and without pruning (prefill only;
        unpruned references computed once, shared by every method).
    trials: total COMPLETE trials wanted (default 50, as in the paper): a re-run with the same storage
        continues where the last one stopped. Over several methods it is split between the methods
        that have something to tune (see `vflowopt.search.ranking`).
    seed: makes the search reproducible (startup Sobol points and the GP's acquisition optimizer).
    storage: an Optuna storage URL (e.g. ``sqlite:///study.db``, ``postgresql://...``), a file path
        (SQLite), or an Optuna storage object; default ``vflowopt-study.db`` next to `out`, else in
        the current directory.
    method: a registered method whose config declares `search_space` (see vflowopt.search.space); or
        a list of methods, or ``"auto"`` (every registered method that can meet the budget on this
        model): each one's strategy is searched (a method with nothing to tune is evaluated once) and
        the best strategy overall by the objective is returned. `search.run_method_search` returns
        the ranking of every method as well.

    Keyword arguments: study_name (default "<method>-budget<B>"; over several methods a prefix, each
    method's study being "<study_name>-<method>"), out (write the strategy JSON there, atomically),
    keep_best (default False: when the best trial scores below the method's default strategy, the
    default is returned and written instead, and `run_optimization(...).written` says so), base (a
    config whose unsearched fields the candidates keep, e.g. ``VFlowOptConfig(positions="compact")``;
    one method only), space (a custom `SearchSpace`; one method only), n_startup_trials (default 10),
    progress (rich progress bar on stderr, default True), callbacks (Optuna callbacks
    ``f(study, frozen_trial)``).

    Returns the best feasible strategy, resolved against the model (`model_family` and `num_layers`
    recorded), ready for `prune(model, config)` or `config.save(path)`. Raises ConfigError on bad
    input: a budget the model cannot meet (over several methods: when every one refuses, each reason
    listed), an unknown method, empty or image-less samples, a storage that cannot be opened, or a
    study created for another model, budget, method or sample set.
    """
    several = not isinstance(method, str) or method.strip().lower() in AUTO
    if several:
        given = [k for k in _SINGLE_ONLY if kwargs.get(k) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to one method; give method='<name>' to use them")
        kwargs = {k: v for k, v in kwargs.items() if k not in _SINGLE_ONLY}
        return run_method_search(model, samples, budget, method, trials=trials, seed=seed, storage=storage,
                                 **kwargs).config
    return run_optimization(model, samples, budget, trials=trials, seed=seed, storage=storage, method=method,
                            **kwargs).config
