"""VFlowOpt: visual-token pruning for multimodal models on stock Hugging Face transformers."""

from .api import PruneHandle, prune, pruned, unprune
from .config import ConfigError, PruneConfig, available_methods, config_for, load_config
from .errors import PruningError
from .methods.vflowopt import VFlowOptConfig
from .runtime.stats import PruneStats
from .search import optimize

__version__ = "0.1.0"

__all__ = [
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
