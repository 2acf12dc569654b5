"""Strategy optimization (VFlowOpt paper 3.3): objective, search spaces, the Optuna study, data.

`vflowopt.optimize(model, samples, budget)` is the entry point; `run_optimization` returns the whole
run (best and default objectives, trial counts, history) for reports such as the CLI's.
"""

from .objective import Evaluation, Objective
from .space import Candidate, Dim, SearchSpace, space_for
from .study import (
    DEFAULT_SAMPLES,
    DEFAULT_STARTUP_TRIALS,
    DEFAULT_STORAGE_FILE,
    DEFAULT_TRIALS,
    OptimizeResult,
    default_study_name,
    open_storage,
    optimize,
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
    "Objective",
    "OptimizeResult",
    "SearchSpace",
    "default_study_name",
    "open_storage",
    "optimize",
    "run_optimization",
    "space_for",
]
