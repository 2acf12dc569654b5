"""prune / pruned / PruneHandle: the one-call API."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .config import PruneConfig
from .errors import ConfigError
from .methods.base import PruningMethod
from .models.base import adapter_for
from .registry import method_entry
from .runtime.engine import PruningEngine
from .runtime.stats import PruneStats

# The active handle lives on the model instance itself (not in a module-level table), so that
# copy.deepcopy(model) yields a copy with its own, independent and working pruning that unprune()
# and handle.remove() clean like the original's.
_HANDLE_ATTR = "_vflowopt_handle"


def active_handle(model: nn.Module) -> PruneHandle | None:
    """The handle of the pruning attached to `model`, or None."""
    handle = model.__dict__.get(_HANDLE_ATTR)
    return handle if isinstance(handle, PruneHandle) and handle.model is model else None


class PruneHandle:
    """Returned by `prune()`: what the last prefill kept (`stats`) and how to undo it (`remove`)."""

    def __init__(self, model: nn.Module, config: PruneConfig, engine: PruningEngine):
        self.model = model
        self.config = config  # resolved against the model: every field explicit
        self._engine = engine

    @property
    def stats(self) -> PruneStats:
        return self._engine.stats

    @property
    def method(self) -> PruningMethod:
        """The method instance doing the selection (its declarations: layers scored, signals used)."""
        return self._engine.method

    @property
    def active(self) -> bool:
        return active_handle(self.model) is self

    def remove(self) -> None:
        """Detach every hook; the model is exactly as loaded. Safe to call twice."""
        if self.active:
            self._engine.detach()
            self.model.__dict__.pop(_HANDLE_ATTR, None)

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PruneHandle({self.config.method}, budget={self.config.budget}, {state})"


def prune(model: nn.Module, config: PruneConfig) -> PruneHandle:
    """Attach pruning to `model` in place (this instance only); `model.generate()` stays unchanged.

    Everything is validated before any hook is installed, so a failed call leaves the model as it was.
    """
    if not isinstance(config, PruneConfig):
        raise ConfigError(f"prune() needs a vflowopt config (e.g. VFlowOptConfig), got {type(config).__name__}")
    if active_handle(model) is not None:
        raise ConfigError(
            "this model is already pruned; call handle.remove() (or vflowopt.unprune(model)) before pruning again"
        )
    adapter = adapter_for(model)
    if config.model_family is not None and config.model_family != adapter.family:
        raise ConfigError(
            f"this strategy was made for a '{config.model_family}' model, not '{adapter.family}'; "
            "optimize a strategy for this model or use a plain config"
        )
    if config.num_layers is not None and config.num_layers != adapter.num_llm_layers:
        raise ConfigError(
            f"this strategy was made for an LLM with {config.num_layers} layers; this model has "
            f"{adapter.num_llm_layers}"
        )
    config_cls, method_cls = method_entry(config.method)
    if not isinstance(config, config_cls):
        raise ConfigError(f"a {type(config).__name__} is not a config of method '{config.method}' "
                          f"(that is {config_cls.__name__})")
    resolved = config.resolve(adapter)
    method = method_cls(resolved, adapter)
    engine = PruningEngine(model, adapter, method, positions=resolved.positions)
    engine.attach()
    handle = PruneHandle(model, resolved, engine)
    model.__dict__[_HANDLE_ATTR] = handle  # plain attribute: not a submodule, parameter or buffer
    return handle


def unprune(model: nn.Module) -> None:
    """Remove whatever pruning is attached to `model` (no-op if none)."""
    handle = active_handle(model)
    if handle is not None:
        handle.remove()


@contextlib.contextmanager
def pruned(model: nn.Module, config: PruneConfig) -> Iterator[PruneHandle]:
    """`with pruned(model, cfg) as h:` prunes inside the block and restores the model after it."""
    handle = prune(model, config)
    try:
        yield handle
    finally:
        handle.remove()
