"""The config contract every method's config follows, and reading configs by method name.

Every method has one dataclass config, subclass of `PruneConfig`: validated when it is built (types from
the annotations, ranges in `validate()`), resolved against a model by `resolve(adapter)` (every field
explicit), and round-tripped through JSON so a strategy found by `optimize` (or tuned by hand) can be
saved, shared and re-applied with `prune()` or the CLI. The name -> class table is registry.py.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, ClassVar

from .errors import ConfigError, NoSearchSpace
from .files import atomic_write_text
from .registry import available_methods, method_entry, register_method

__all__ = ["ConfigError", "PruneConfig", "available_methods", "config_for", "load_config", "register_method",
           "method_entry"]

SCHEMA_VERSION = 1
VIDEO_SCOPES = ("video", "frame")


@dataclasses.dataclass
class PruneConfig(abc.ABC):
    """Base of every method config: the contract the runtime, the optimizer and the CLI rely on.

    `budget` is the average fraction of the prunable visual tokens present over all LLM layers
    (VFlowOpt eq. 5); it is the one unit every method is measured in. A subclass adds its fields, may
    extend `validate()` (model-independent checks, run at construction), and must implement
    `resolve(adapter)`. `positions` is "keep" unless the config declares it as a field.
    """

    method: ClassVar[str] = ""  # set by registry.register_method
    positions = "keep"  # "keep" the original position ids or "compact" them; a field where a method offers both

    budget: float | None = None
    # Recorded by `save()` when a config was resolved against a model, checked on `prune()`.
    model_family: str | None = None
    num_layers: int | None = None
    # Videos: "video" = the whole video competes for its share of the budget (every method's default),
    # "frame" = each frame (Qwen-VL: each temporal group of 2 frames) keeps its own share.
    video_scope: str = "video"

    def __post_init__(self) -> None:
        # An invalid config cannot exist: types first (so a JSON "no" is not a truthy bool), then ranges.
        check_field_types(self)
        self.validate()

    def validate(self) -> None:
        """Checks that do not need a model; run at construction, so every field is already type-checked."""
        if self.budget is not None:
            check_fraction("budget", self.budget, allow_zero=False)
        if self.video_scope not in VIDEO_SCOPES:
            raise ConfigError(f"video_scope must be one of {list(VIDEO_SCOPES)}, got {self.video_scope!r}")

    @abc.abstractmethod
    def resolve(self, adapter: Any) -> PruneConfig:
        """This config with every model-dependent field made explicit for the model behind `adapter`
        (a `models.base.ModelAdapter`); a ConfigError when the model cannot meet it."""

    @classmethod
    def search_space(cls, budget: float, num_layers: int, *, stage_layers: tuple[int, ...] | None = None,
                     grid_side: int | None = None) -> Any:
        """The box `optimize` searches (a `vflowopt.spaces.SearchSpace`); by default none."""
        raise NoSearchSpace(
            f"method '{cls.method}' declares no search space, so it cannot be optimized; give its config class "
            "a classmethod search_space(budget, num_layers, ...) returning a vflowopt.spaces.SearchSpace"
        )

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
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

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


def check_field_types(config: Any) -> None:
    """ConfigError unless every dataclass field of `config` matches its annotation.

    bool fields take only True/False; int fields only integers (not bools); float fields any finite real
    number; `tuple[...]` fields a list or tuple of the right length and element types (stored as a tuple,
    as after a JSON round trip). Fields annotated with other types are left to the config's validate().
    """
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = hints.get(f.name)
        if expected is None:
            continue
        ok, converted = _conforms(value, expected)
        if not ok:
            raise ConfigError(
                f"{type(config).__name__}.{f.name} must be {_describe(expected)}, got {value!r}"
            )
        if converted is not value:
            object.__setattr__(config, f.name, converted)


def _conforms(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, converted = _conforms(value, arg)
            if ok:
                return True, converted
        return False, value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        return ok, value
    if tp is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if len(args) != len(value):
            return False, value
        items = []
        for item, arg in zip(value, args):
            ok, converted = _conforms(item, arg)
            if not ok:
                return False, value
            items.append(converted)
        return True, tuple(items)
    return True, value  # other annotations: checked by the config's validate()


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null (None)"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return getattr(tp, "__name__", str(tp))


def config_for(name: str, **kwargs: Any) -> PruneConfig:
    """The config of method `name`, e.g. `config_for("vflowopt", budget=0.1)`."""
    config_cls, _ = method_entry(name)
    return config_cls(**kwargs)


def load_config(path: str | os.PathLike) -> PruneConfig:
    """Reads a config saved with `PruneConfig.save` (any registered method)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"strategy file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"strategy file {path} is a directory; pass the JSON file written by cfg.save()") from None
    except UnicodeDecodeError:
        raise ConfigError(f"strategy file {path} is not a text (UTF-8 JSON) file; pass the JSON written by "
                          "cfg.save()") from None
    except OSError as exc:
        raise ConfigError(f"cannot read strategy file {path}: {type(exc).__name__}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"strategy file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"strategy file {path} has no 'method' field; it was not written by vflowopt")
    if not isinstance(data["method"], str):
        raise ConfigError(f"strategy file {path}: 'method' must be a method name (a string), got {data['method']!r}")
    version = data.get("schema_version", SCHEMA_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ConfigError(f"strategy file {path}: 'schema_version' must be a whole number >= 1, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"strategy file {path} has schema_version {version}; this vflowopt reads up to {SCHEMA_VERSION}"
        )
    config_cls, _ = method_entry(data["method"])
    return config_cls.from_dict(data)
