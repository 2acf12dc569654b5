"""The method registry: name -> (config class, method class). Imports no method.

Each file in methods/ registers its own method when imported (`register_method(...)` at its end) and the
`vflowopt` package imports the methods package, so the table is full once `vflowopt` is imported; this
module never imports a method itself (the dependencies point one way: methods -> registry).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import PruneConfig
    from .methods.base import PruningMethod

__all__ = ["available_methods", "method_entry", "register_method"]

_REGISTRY: dict[str, tuple[type[PruneConfig], type[PruningMethod]]] = {}


def register_method(name: str, config_cls: type[PruneConfig], method_cls: type[PruningMethod]) -> None:
    """Adds a method under `name`; a name already taken is refused (unregister nothing silently).

    Binds the pair both ways: `config_cls.method = name` (written into saved strategies) and
    `method_cls.config_cls = config_cls` (what `prune()` checks a config against)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"a method name must be a Python identifier, got {name!r}")
    if name in _REGISTRY:
        have = _REGISTRY[name]
        raise ConfigError(
            f"method name '{name}' is already registered ({have[0].__name__}, {have[1].__name__}); "
            "choose another name"
        )
    taken = [n for n, (c, _) in _REGISTRY.items() if c is config_cls]
    if taken:
        raise ConfigError(f"{config_cls.__name__} is already the config of method '{taken[0]}'")
    config_cls.method = name
    method_cls.config_cls = config_cls
    _REGISTRY[name] = (config_cls, method_cls)


def available_methods() -> list[str]:
    """Names accepted by `config_for`, `load_config` and the CLI's --method."""
    return sorted(_REGISTRY)


def method_entry(name: str) -> tuple[type[PruneConfig], type[PruningMethod]]:
    """(config class, method class) of a registered method, or a ConfigError listing the names."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}; available methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]
