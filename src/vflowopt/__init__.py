"""VFlowOpt: visual-token pruning for multimodal models on stock Hugging Face transformers."""

from . import methods  # noqa: F401  (registers every built-in method)
from .api import PruneHandle, prune, pruned, unprune
from .config import ConfigError, PruneConfig, config_for, load_config
from .errors import CalibrationWarning, PruningError
from .methods.vflowopt import VFlowOptConfig
from .registry import available_methods
from .runtime.stats import PruneStats
from .search import optimize
from .version import __version__

__all__ = [
    "__version__",
    "CalibrationWarning",
    "ConfigError",
    "PruneConfig",
    "PruneHandle",
    "PruneStats",
    "PruningError",
    "VFlowOptConfig",
    "available_methods",
    "config_for",
    "load_config",
    "optimize",
    "prune",
    "pruned",
    "unprune",
]
