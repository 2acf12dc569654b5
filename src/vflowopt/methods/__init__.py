"""Pruning methods, one file each; importing this package registers them by name."""

from ..config import register_method
from .vflowopt import VFlowOptConfig, VFlowOptMethod

register_method("vflowopt", VFlowOptConfig, VFlowOptMethod)

__all__ = ["VFlowOptConfig", "VFlowOptMethod"]
