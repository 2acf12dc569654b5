"""Finding the search space a method declares (the data types live in `vflowopt.spaces`)."""

from __future__ import annotations

from ..config import PruneConfig
from ..registry import method_entry
from ..spaces import Candidate, Dim, SearchSpace

__all__ = ["Candidate", "Dim", "SearchSpace", "space_for"]


def space_for(method: str, budget: float, num_layers: int, *, base: PruneConfig | None = None,
              grid_side: int | None = None) -> SearchSpace:
    """The declared search space of `method` for this budget and model, or a ConfigError."""
    config_cls, _ = method_entry(method)
    stage_layers = getattr(base, "stage_layers", None) if base is not None else None
    return config_cls.search_space(budget, num_layers, stage_layers=stage_layers, grid_side=grid_side)
