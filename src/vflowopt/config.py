"""Method configs and the registry that maps method names to them.

Every method has one dataclass config; configs round-trip through JSON so a strategy found by
`optimize` (or tuned by hand) can be saved, shared and re-applied with `prune()` or the CLI.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError

__all__ = ["ConfigError", "PruneConfig", "available_methods", "config_for", "load_config", "register_method"]

SCHEMA_VERSION = 1

_REGISTRY: dict[str, tuple[type[PruneConfig], type]] = {}


@dataclasses.dataclass
class PruneConfig:
    """Base of every method config.

    `budget` is the average fraction of the prunable visual tokens present over all LLM layers
    (VFlowOpt eq. 5); it is the one unit every method is measured in.
    """

    method: ClassVar[str] = ""

    budget: float | None = None
    # Recorded by `save()` when a config was resolved against a model, checked on `prune()`.
    model_family: str | None = None
    num_layers: int | None = None

    def validate(self) -> None:
        """Checks that do not need a model."""
        if self.budget is not None:
            check_fraction("budget", self.budget, allow_zero=False)

    # -- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method, "schema_version": SCHEMA_VERSION}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Writes the config as JSON atomically (a reader never sees a half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        data = dict(data)
        data.pop("method", None)
        data.pop("schema_version", None)
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown field(s) {unknown} for method '{cls.method}'; accepted: {sorted(names)}"
            )
        for key, value in list(data.items()):
            if isinstance(value, list):
                data[key] = tuple(value)
        return cls(**data)


def check_fraction(name: str, value: Any, *, allow_zero: bool = True) -> None:
    """Raises ConfigError unless `value` is a real number in [0, 1] ((0, 1] without zero)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        value = float(value)
        ok = not math.isnan(value) and (value > 0 if not allow_zero else value >= 0) and value <= 1
    if not ok:
        rng = "[0, 1]" if allow_zero else "(0, 1]"
        raise ConfigError(f"{name} must be a number in {rng}, got {value!r}")


def register_method(name: str, config_cls: type[PruneConfig], method_cls: type) -> None:
    """Adds a method to the registry; each file in methods/ calls it once for its own method."""
    config_cls.method = name
    _REGISTRY[name] = (config_cls, method_cls)


def available_methods() -> list[str]:
    """Names accepted by `config_for`, `load_config` and the CLI's --method."""
    _ensure_builtin_methods()
    return sorted(_REGISTRY)


def method_entry(name: str) -> tuple[type[PruneConfig], type]:
    _ensure_builtin_methods()
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method '{name}'; available methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def config_for(name: str, **kwargs: Any) -> PruneConfig:
    """The config of method `name`, e.g. `config_for("vflowopt", budget=0.1)`."""
    config_cls, _ = method_entry(name)
    return config_cls(**kwargs)


def load_config(path: str | os.PathLike) -> PruneConfig:
    """Reads a config saved with `PruneConfig.save` (any registered method)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"strategy file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"strategy file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"strategy file {path} has no 'method' field; it was not written by vflowopt")
    version = data.get("schema_version", SCHEMA_VERSION)
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"strategy file {path} has schema_version {version}; this vflowopt reads up to {SCHEMA_VERSION}"
        )
    config_cls, _ = method_entry(data["method"])
    return config_cls.from_dict(data)


def _ensure_builtin_methods() -> None:
    # Importing the methods package registers the built-in methods.
    from . import methods  # noqa: F401
