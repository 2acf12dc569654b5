"""Strategy optimization (VFlowOpt paper 3.3): objective, search spaces, the Optuna study, data.

`vflowopt.optimize(model, samples, budget, method=...)` is the entry point; `run_optimization` (one
method) and `run_method_search` (several, ranked) return the whole run for reports such as the CLI's.
"""

from .objective import Evaluation, Objective
from .optimizer import optimize
from .ranking import MethodRank, MethodSearchResult, run_method_search
from .space import Candidate, Dim, SearchSpace, space_for
from .study import (
    DEFAULT_SAMPLES,
    DEFAULT_STARTUP_TRIALS,
    DEFAULT_STORAGE_FILE,
    DEFAULT_TRIALS,
    OptimizeResult,
    default_study_name,
    open_storage,
    run_optimization,
)

__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_STARTUP_TRIALS",
    "DEFAULT_STORAGE_FILE",
    "DEFAULT_TRIALS",
    "Candidate",
    "Dim",
    "Evaluation",
    "MethodRank",
    "MethodSearchResult",
    "Objective",
    "OptimizeResult",
    "SearchSpace",
    "default_study_name",
    "open_storage",
    "optimize",
    "run_method_search",
    "run_optimization",
    "space_for",
]
