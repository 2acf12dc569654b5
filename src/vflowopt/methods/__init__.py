"""Pruning methods, one file each. Every module here registers its method at import (a
`register_method(name, ConfigClass, MethodClass)` call at its end); this package imports them all, so
adding a method is adding one file. `base` (the contract) and `common` (shared helpers) are not methods."""

import importlib
import pkgutil

from .vflowopt import VFlowOptConfig, VFlowOptMethod

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "common"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["VFlowOptConfig", "VFlowOptMethod"]
