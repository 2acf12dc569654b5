"""lmms-eval plugin: vflowopt pruning inside lmms-eval's own model wrappers (lmms-eval 0.7.3).

Installed with vflowopt (entry-point group ``lmms_eval.models``, payload :func:`manifests`), it adds models
to ``lmms-eval --model``, each a subclass of an lmms-eval wrapper, for the checkpoints (``config.json``
``model_type``) vflowopt prunes:

- ``vflowopt_llava_hf``: chat ``llava_hf``; llava, llava_next, llava_onevision;
- ``vflowopt_qwen2_vl``: ``qwen2_vl`` (lmms-eval has no chat wrapper for it); qwen2_vl;
- ``vflowopt_qwen2_5_vl``: chat ``qwen2_5_vl``; qwen2_5_vl;
- ``vflowopt_qwen3_vl``: chat ``qwen3_vl``; qwen3_vl.

Each takes its lmms-eval wrapper's own ``--model_args`` plus ``method=NAME``, ``budget=B``,
``strategy=FILE`` (a config saved by ``vflowopt optimize`` / ``PruneConfig.save``) and the method's config
fields (``threshold=30``, ``seed=1``, ``retention=[0.3,1,0.5]``, ``recycle=false``, ``vision_layer=none``).
Strings are converted to the types of the method's config dataclass, and the config is built by
``vflowopt.config_for`` / ``vflowopt.load_config`` (fields given with ``strategy=`` override the file's), so
every check is the library's. Without ``method``, ``budget`` and ``strategy`` (or with ``method=none``) the
model is evaluated unpruned; ``budget`` alone means ``method=vflowopt``.

Everything a user can get wrong fails before the model is loaded (or, for what needs the model, right after
it, before any evaluation): an unknown method or model arg (the message lists the accepted ones), a budget
outside (0, 1], a strategy made for another model family, a model type the wrapper does not cover, a batch
size the wrapper cannot run. A pruning failure during ``generate()`` stops the run with that error instead
of being scored as an empty answer (lmms-eval's ``llava_hf`` catches every exception from ``generate()``).
lmms-eval's CLI catches every exception of a run, prints it and exits 0; when the plugin stops a run inside
that CLI it logs the traceback and exits with status 1. Through the Python API
(``lmms_eval.evaluator.simple_evaluate``) the ``vflowopt.ConfigError`` / ``vflowopt.PruningError`` is raised.

Requests scored by likelihood (``loglikelihood``: some multiple-choice tasks) are refused while pruning: a
pruned forward returns logits for fewer positions than the prompt has, so the scores would not align.

Statistics: every sample's ``token_counts`` (in ``--log_samples`` output) gets ``input_tokens`` = the tokens
that entered the LLM (after pruning), ``prompt_tokens`` (before), and, when pruned, ``visual_tokens``
(produced by the vision tower), ``visual_tokens_into_llm`` and ``mean_retention`` (the budget actually
spent over the LLM layers); lmms-eval's ``efficiency`` summary adds up ``input_tokens``. The run's means go
to the results' ``throughput`` block (``avg_vflowopt_...``), and one summary line is logged per run.

This module imports lmms-eval only when a wrapper class is used (module ``__getattr__``), so it imports,
and its argument handling works, without lmms-eval installed.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import importlib
import inspect
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import vflowopt
from vflowopt.config import PruneConfig
from vflowopt.errors import ConfigError, PruningError
from vflowopt.registry import method_entry

__all__ = [
    "LMMS_EVAL_VERSION", "PRUNE_ARGS", "WRAPPERS", "WrapperSpec", "build_config", "manifests",
    "resolve_wrapper_args", "split_model_args",
]

LMMS_EVAL_VERSION = "0.7.3"
#: model_args that select the pruning; the method's config fields come beside them.
PRUNE_ARGS = ("method", "budget", "strategy")
#: `method=none`: evaluate the model unpruned (the same as giving no pruning argument).
NO_PRUNING = "none"
#: Config fields that only a saved, resolved strategy carries (checked by prune()); not model_args.
_SAVED_ONLY_FIELDS = ("model_family", "num_layers")


@dataclasses.dataclass(frozen=True)
class WrapperSpec:
    """One plugin model: the lmms-eval wrapper it subclasses and what it accepts."""

    model_id: str  # the `--model` name
    class_name: str  # our subclass, in this module
    base: str  # "module.Class" of the lmms-eval wrapper
    kind: str  # "chat" or "simple" (which ModelManifest path)
    model_types: tuple[str, ...]  # config.json model_type values it covers (= vflowopt families)
    default_device_map: str  # with CUDA and one process: "device" (the device itself) or "auto"
    max_batch_size: int | None  # None: any
    moves_inputs_to_cuda_on_auto: bool  # the wrapper sends inputs to "cuda" when device_map == "auto"
    attn_flag: bool = False  # the wrapper takes use_flash_attention_2 instead of attn_implementation


WRAPPERS: dict[str, WrapperSpec] = {
    spec.model_id: spec
    for spec in (
        WrapperSpec("vflowopt_llava_hf", "VFlowOptLlavaHf", "lmms_eval.models.chat.llava_hf.LlavaHf", "chat",
                    ("llava", "llava_next", "llava_onevision"), "device", 1, False),
        WrapperSpec("vflowopt_qwen2_vl", "VFlowOptQwen2VL", "lmms_eval.models.simple.qwen2_vl.Qwen2_VL", "simple",
                    ("qwen2_vl",), "device", None, True, attn_flag=True),
        WrapperSpec("vflowopt_qwen2_5_vl", "VFlowOptQwen2_5_VL", "lmms_eval.models.chat.qwen2_5_vl.Qwen2_5_VL",
                    "chat", ("qwen2_5_vl",), "auto", None, True),
        WrapperSpec("vflowopt_qwen3_vl", "VFlowOptQwen3_VL", "lmms_eval.models.chat.qwen3_vl.Qwen3_VL", "chat",
                    ("qwen3_vl",), "auto", None, True),
    )
}
_BY_CLASS_NAME = {spec.class_name: spec for spec in WRAPPERS.values()}


def manifests() -> list:
    """The entry-point payload: one lmms-eval ``ModelManifest`` per plugin model (imports no wrapper)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    out = []
    for spec in WRAPPERS.values():
        path = f"{__name__}.{spec.class_name}"
        out.append(ModelManifest(model_id=spec.model_id, **{f"{spec.kind}_class_path": path}))
    return out


# -- model_args -> a vflowopt config (no lmms-eval needed) ---------------------------------------------------


def method_fields(method: str) -> dict[str, Any]:
    """{field name: annotation} of a method's config that model_args may set (ConfigError: unknown method)."""
    config_cls, _ = method_entry(method)
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(config_cls) if f.name not in _SAVED_ONLY_FIELDS}


def split_model_args(kwargs: Mapping[str, Any],
                     wrapper_params: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pruning args, the wrapper's own args): every key the lmms-eval wrapper's ``__init__`` does not take is
    a pruning arg (``method``, ``budget``, ``strategy`` or a config field, checked by :func:`build_config`)."""
    prune = {k: v for k, v in kwargs.items() if k not in wrapper_params}
    own = {k: v for k, v in kwargs.items() if k in wrapper_params}
    return prune, own


def build_config(prune_args: Mapping[str, Any], *, wrapper: str = "this model",
                 wrapper_params: tuple[str, ...] = ()) -> PruneConfig | None:
    """The vflowopt config the pruning model_args ask for, or None for an unpruned run (ConfigError if wrong)."""
    args = dict(prune_args)
    method = args.pop("method", None)
    strategy = args.pop("strategy", None)
    if isinstance(method, str) and method.strip().lower() == NO_PRUNING:
        if strategy is not None or args:
            raise ConfigError(f"method={NO_PRUNING} evaluates the model unpruned; drop "
                              f"{', '.join(sorted([*args] + (['strategy'] if strategy is not None else [])))}")
        return None
    if method is None and strategy is None and not args:
        return None
    if strategy is not None:
        base = vflowopt.load_config(str(strategy))
        if method is not None and method != base.method:
            raise ConfigError(f"method={method} but the strategy file {strategy} is a '{base.method}' config; "
                              "drop method= or give a strategy of that method")
        method = base.method
    elif method is None:
        method = "vflowopt"  # budget (or fields) alone: the library's own method, as in the CLI
    fields = method_fields(method)
    unknown = sorted(set(args) - set(fields))
    if unknown:
        accepted = ", ".join([*PRUNE_ARGS, *sorted(f for f in fields if f not in PRUNE_ARGS)])
        own = f"; {wrapper}'s own model_args: {', '.join(sorted(wrapper_params))}" if wrapper_params else ""
        raise ConfigError(
            f"unknown model_args {unknown} for method '{method}' (vflowopt accepts: {accepted}{own}); methods: "
            f"{', '.join(vflowopt.available_methods())}, or method={NO_PRUNING}"
        )
    values = {name: _from_text(value, fields[name]) for name, value in args.items()}
    if strategy is not None:
        return dataclasses.replace(base, **values) if values else base
    return vflowopt.config_for(method, **values)


def _from_text(value: Any, annotation: Any) -> Any:
    """A model_args string converted to the field's annotated type when it reads as one; anything else is
    left as it is, for the config's own validation to report."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    options = list(typing.get_args(annotation)) if typing.get_origin(annotation) in (
        typing.Union, types.UnionType) else [annotation]
    if type(None) in options and text.lower() in ("none", "null"):
        return None
    for tp in options:
        if tp is bool and text.lower() in ("true", "false"):
            return text.lower() == "true"
        if tp is int:
            try:
                return int(text)
            except ValueError:
                pass
        if tp is float:
            try:
                return float(text)
            except ValueError:
                pass
        if typing.get_origin(tp) is tuple:
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            if isinstance(parsed, list):
                return tuple(parsed)
        if tp is str:
            return text
    return value


# -- the wrapper's runtime args: device, batch size, attention --------------------------------------------


def resolve_wrapper_args(spec: WrapperSpec, kwargs: Mapping[str, Any], *, cuda: bool, world_size: int,
                         pruned: bool) -> tuple[dict[str, Any], str | None, list[str]]:
    """(wrapper kwargs with working defaults, attn_implementation to set after loading or None, warnings).

    Device: lmms-eval's defaults are CUDA-only (and ``llava_hf``'s ``device_map=""`` is refused by
    transformers 5 in a single process), so a missing ``device`` is ``cuda`` when there is CUDA, else
    ``cpu``; a missing ``device_map`` is the device itself (``llava_hf``, ``qwen2_vl``) or ``auto`` (the
    Qwen2.5 / Qwen3 wrappers' own default) with CUDA, ``cpu`` without. Under ``accelerate launch`` /
    ``torchrun`` (``WORLD_SIZE`` > 1) ``device_map`` is left to the wrapper (one GPU per process).
    """
    out = dict(kwargs)
    notes: list[str] = []
    if out.get("device") in (None, ""):
        out["device"] = "cuda" if cuda else "cpu"
    if world_size <= 1 and out.get("device_map") in (None, ""):
        if not cuda or str(out["device"]).startswith("cpu"):
            out["device_map"] = "cpu"
        else:
            out["device_map"] = str(out["device"]) if spec.default_device_map == "device" else "auto"
    if spec.moves_inputs_to_cuda_on_auto and out.get("device_map") == "auto" and not cuda:
        raise ConfigError(f"{spec.model_id}: device_map=auto sends the inputs to 'cuda' in lmms-eval's wrapper, "
                          "and there is no CUDA here; use device_map=cpu (or leave it out)")
    raw = out.get("batch_size", 1)
    try:
        batch = int(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{spec.model_id}: batch_size must be a whole number, got {raw!r} "
                          "(lmms-eval's wrapper does not size batches itself)") from None
    if batch < 1 or (spec.max_batch_size is not None and batch > spec.max_batch_size):
        most = f"at most {spec.max_batch_size}" if spec.max_batch_size else "at least 1"
        raise ConfigError(f"{spec.model_id}: batch_size must be {most} (lmms-eval's wrapper), got {batch}")
    out["batch_size"] = batch
    if pruned and batch > 1:
        notes.append(f"batch_size {batch}: a pruned batch needs the same number of visual tokens in every "
                     "sample (images of one size); a batch that mixes sizes stops the run with a PruningError")
    attn = None
    if spec.attn_flag and "attn_implementation" in out:
        attn = out.pop("attn_implementation")
        if attn == "flash_attention_2":
            out["use_flash_attention_2"] = True
            attn = None
    return out, attn, notes


#: passed through by every plugin model (the qwen2_vl wrapper takes a flag instead: set after loading)
WRAPPERS_ATTN_PARAM = "attn_implementation"


def wrapper_params(base: type) -> tuple[str, ...]:
    """Names the lmms-eval wrapper's ``__init__`` takes (its ``**kwargs`` excluded), plus ``attn_implementation``
    for a wrapper that only has a flash-attention flag (resolve_wrapper_args turns it into the flag or a
    setting applied after loading)."""
    params = inspect.signature(base.__init__).parameters.values()
    names = [p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"]
    if WRAPPERS_ATTN_PARAM not in names:
        names.append(WRAPPERS_ATTN_PARAM)
    return tuple(names)


def read_model_type(pretrained: str, **kwargs: Any) -> str:
    """``model_type`` of the checkpoint's config.json (what the wrapper will load)."""
    from transformers import AutoConfig

    return str(getattr(AutoConfig.from_pretrained(pretrained, **kwargs), "model_type", ""))


def check_model_type(spec: WrapperSpec, model_type: str, config: PruneConfig | None) -> None:
    """ConfigError unless the plugin model covers this checkpoint (and a saved strategy was made for it)."""
    if model_type not in spec.model_types:
        others = [s.model_id for s in WRAPPERS.values() if model_type in s.model_types]
        hint = f"; use --model {others[0]}" if others else ""
        raise ConfigError(f"{spec.model_id} covers model types {', '.join(spec.model_types)}; this checkpoint is "
                          f"'{model_type}'{hint} (vflowopt prunes: "
                          f"{', '.join(t for s in WRAPPERS.values() for t in s.model_types)})")
    if config is not None and config.model_family is not None and config.model_family != model_type:
        raise ConfigError(f"the strategy was made for a '{config.model_family}' model, this checkpoint is "
                          f"'{model_type}'; optimize a strategy for this model or use method= and budget=")


# -- failing a run ----------------------------------------------------------------------------------------


def _inside_lmms_eval_cli() -> bool:
    """True when called under lmms-eval's CLI loop (``lmms_eval.__main__.cli_evaluate``), which catches every
    exception of a run, prints it and exits 0."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "cli_evaluate" and frame.f_globals.get("__name__") == "lmms_eval.__main__":
            return True
        frame = frame.f_back
    return False


def stop_run(exc: BaseException, what: str) -> typing.NoReturn:
    """Raise ``exc`` (the Python API sees the vflowopt error); inside lmms-eval's CLI, log it (with its
    traceback, unless it is a ConfigError: bad input) and exit with status 1 instead of letting the CLI
    report success."""
    if _inside_lmms_eval_cli():
        message = f"vflowopt: {what}: {type(exc).__name__}: {exc}"
        log = _logger()
        if isinstance(exc, ConfigError) or not hasattr(log, "opt"):
            log.error(message)
        else:
            log.opt(exception=exc).error(message)
        raise SystemExit(message) from exc
    raise exc.with_traceback(exc.__traceback__) from None


def _logger():
    try:
        from loguru import logger
    except ImportError:  # pragma: no cover - loguru comes with lmms-eval
        import logging

        return logging.getLogger(__name__)
    return logger


# -- statistics -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class SampleStats:
    """What one sample's prefill sent into the LLM."""

    prompt_tokens: int
    input_tokens: int  # tokens entering the LLM (after pruning)
    visual_tokens: int | None = None
    visual_tokens_into_llm: int | None = None
    mean_retention: float | None = None

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens}
        if self.visual_tokens is not None:
            out["visual_tokens"] = self.visual_tokens
            out["visual_tokens_into_llm"] = self.visual_tokens_into_llm
            out["mean_retention"] = self.mean_retention
        return out


def sample_stats(input_ids, attention_mask, stats, fresh: bool) -> list[SampleStats]:
    """One SampleStats per row of a generate() call; `stats` is the handle's PruneStats (None: unpruned),
    `fresh` whether this call ran a prefill the engine recorded."""
    rows = int(input_ids.shape[0])
    lengths = ([int(x) for x in attention_mask.sum(dim=1).tolist()] if attention_mask is not None
               else [int(input_ids.shape[1])] * rows)
    out = []
    for n in lengths:
        if stats is None or not fresh:
            out.append(SampleStats(prompt_tokens=n, input_tokens=n))
            continue
        dropped = stats.prompt_tokens - stats.tokens_into_llm
        visual = stats.visual_tokens
        into = stats.visual_tokens_per_layer[0] if stats.visual_tokens_per_layer else None
        retention = stats.mean_retention if visual else None
        out.append(SampleStats(prompt_tokens=n, input_tokens=n - dropped,
                               visual_tokens=visual if visual else None,
                               visual_tokens_into_llm=into if visual else None,
                               mean_retention=None if retention is None or math.isnan(retention) else retention))
    return out


def run_summary(samples: list[SampleStats]) -> dict[str, float]:
    """Means over a run's samples: ``prompt_tokens``, ``input_tokens`` and, over the pruned samples,
    ``visual_tokens``, ``visual_tokens_into_llm``, ``mean_retention`` (min and max too), with counts."""
    out: dict[str, float] = {"samples": len(samples), "pruned_samples": 0}
    if not samples:
        return out
    out["prompt_tokens"] = sum(s.prompt_tokens for s in samples) / len(samples)
    out["input_tokens"] = sum(s.input_tokens for s in samples) / len(samples)
    pruned = [s for s in samples if s.visual_tokens is not None]
    out["pruned_samples"] = len(pruned)
    if pruned:
        out["visual_tokens"] = sum(s.visual_tokens for s in pruned) / len(pruned)
        out["visual_tokens_into_llm"] = sum(s.visual_tokens_into_llm or 0 for s in pruned) / len(pruned)
        kept = [s.mean_retention for s in pruned if s.mean_retention is not None]
        if kept:
            out["mean_retention"] = sum(kept) / len(kept)
            out["min_retention"] = min(kept)
            out["max_retention"] = max(kept)
    return out


#: The means that go to lmms-eval's throughput block (printed as ``avg_vflowopt_<key>``).
THROUGHPUT_KEYS = ("prompt_tokens", "input_tokens", "visual_tokens", "visual_tokens_into_llm", "mean_retention")


def describe_run(model_id: str, config: PruneConfig | None, summary: Mapping[str, float], last: str | None) -> str:
    """The one line logged at the end of a run."""
    n = int(summary.get("samples", 0))
    what = "unpruned" if config is None else f"{config.method} budget={config.budget}"
    line = f"vflowopt: {model_id} {what}: {n} samples"
    if n:
        line += f"; tokens into the LLM {summary['input_tokens']:.1f} of {summary['prompt_tokens']:.1f} (mean)"
    if "visual_tokens" in summary:
        line += (f"; {int(summary['pruned_samples'])} samples pruned, visual tokens {summary['visual_tokens']:.1f} "
                 f"-> {summary['visual_tokens_into_llm']:.1f} into the LLM (mean)")
    if "mean_retention" in summary:
        line += (f", mean retention {summary['mean_retention']:.3f} (min {summary['min_retention']:.3f}, "
                 f"max {summary['max_retention']:.3f})")
    if last:
        line += f"; last prefill: {last}"
    return line


class _Abort(BaseException):
    """Carries an exception raised inside generate() while pruning past the wrapper's `except Exception`."""

    def __init__(self, error: BaseException):
        super().__init__(str(error))
        self.error = error


class _GenerateRun:
    """One generate_until call: wraps model.generate (stats, loud failures) and the wrapper module's
    ``TokenCounts`` (each sample's counts get its pruning stats), and restores both after."""

    def __init__(self, wrapper):
        self.wrapper = wrapper
        self.handle = wrapper.vflowopt_handle
        self.samples: list[SampleStats] = []
        self.pending: collections.deque[SampleStats] = collections.deque()
        self.last_summary: str | None = None

    def generate(self, original: Callable) -> Callable:
        def generate(*args, **kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            before = self.handle.stats if self.handle is not None else None
            try:
                out = original(*args, **kwargs)
            except Exception as exc:
                if self.handle is not None:
                    raise _Abort(exc) from exc
                raise
            if input_ids is not None:
                stats = self.handle.stats if self.handle is not None else None
                fresh = stats is not None and stats is not before
                rows = sample_stats(input_ids, kwargs.get("attention_mask"), stats, fresh)
                if fresh and stats.visual_tokens:
                    self.last_summary = stats.summary()
                self.samples += rows
                self.pending.extend(rows)
            return out

        return generate

    def token_counts(self, base_cls: type) -> Callable:
        counts_cls = _pruned_token_counts_class(base_cls)

        def make(**kwargs):
            if not self.pending:
                return base_cls(**kwargs)
            sample = self.pending.popleft()
            if kwargs.get("input_tokens") is None:
                kwargs["input_tokens"] = sample.input_tokens
            return counts_cls(**kwargs, extra=sample.extra())

        return make


@functools.cache
def _pruned_token_counts_class(base_cls: type) -> type:
    """lmms-eval's TokenCounts plus the vflowopt fields, written by ``to_dict()`` into each logged sample."""

    @dataclasses.dataclass
    class PrunedTokenCounts(base_cls):
        extra: dict = dataclasses.field(default_factory=dict)

        def to_dict(self):
            out = super().to_dict()
            out.update({k: v for k, v in self.extra.items() if v is not None})
            return out

    PrunedTokenCounts.__module__ = __name__
    return PrunedTokenCounts


# -- the wrappers -----------------------------------------------------------------------------------------


class _PruningWrapper:
    """Mixed in before an lmms-eval wrapper: pops the pruning model_args, loads with working device defaults,
    prunes ``self.model`` (unwrapped) and reports per-sample statistics from ``generate_until``."""

    vflowopt_spec: WrapperSpec
    vflowopt_config: PruneConfig | None = None
    vflowopt_handle = None

    def __init__(self, **kwargs):
        spec = self.vflowopt_spec
        base = _lmms_base(type(self))
        params = wrapper_params(base)
        log = _logger()
        try:
            prune_args, own = split_model_args(kwargs, params)
            config = build_config(prune_args, wrapper=spec.model_id, wrapper_params=params)
            own, attn, notes = resolve_wrapper_args(spec, own, cuda=_cuda_available(), world_size=_world_size(),
                                                    pruned=config is not None)
            pretrained = own.get("pretrained", inspect.signature(base.__init__).parameters["pretrained"].default)
            type_kwargs = {k: own[k] for k in ("revision", "trust_remote_code") if own.get(k) is not None}
            check_model_type(spec, read_model_type(str(pretrained), **type_kwargs), config)
        except ConfigError as exc:
            stop_run(exc, f"{spec.model_id} model_args")
        for note in notes:
            log.warning(f"vflowopt: {note}")
        _check_wrapper_module(type(self))
        super().__init__(**own)
        if attn is not None:
            self.model.set_attn_implementation(attn)
        self.vflowopt_config = config
        if config is None:
            log.info(f"vflowopt: {spec.model_id} evaluates {pretrained} unpruned")
            return
        try:
            self.vflowopt_handle = vflowopt.prune(self.model, config)
        except (ConfigError, PruningError) as exc:
            stop_run(exc, f"{spec.model_id} cannot prune {pretrained}")
        resolved = self.vflowopt_handle.config.to_dict()
        log.info(f"vflowopt: pruning {pretrained} ({type(self.model).__name__}) with "
                 f"{json.dumps(resolved, sort_keys=True)}")

    def generate_until(self, requests):
        run = _GenerateRun(self)
        model = self.model
        had_own = "generate" in model.__dict__
        previous = model.__dict__.get("generate")
        model.generate = run.generate(model.generate)
        module, name, original_counts = _token_counts_binding(type(self))
        if module is not None:
            setattr(module, name, run.token_counts(original_counts))
        try:
            results = super().generate_until(requests)
        except _Abort as abort:
            stop_run(abort.error, f"generate() failed while pruning with {self.vflowopt_handle!r}; the run stops "
                                  "instead of scoring an empty answer")
        finally:
            if module is not None:
                setattr(module, name, original_counts)
            if had_own:
                model.generate = previous
            else:
                del model.generate
        summary = run_summary(run.samples)
        _logger().info(describe_run(self.vflowopt_spec.model_id, self.vflowopt_config, summary, run.last_summary))
        _record_throughput(summary)
        return results

    def loglikelihood(self, requests):
        if self.vflowopt_handle is not None:
            stop_run(PruningError(
                "loglikelihood requests (tasks scored by the likelihood of an answer) cannot be pruned: a pruned "
                "forward returns logits for fewer positions than the prompt has; run such tasks unpruned "
                "(no method=) or a generate_until variant of the task"), "loglikelihood while pruning")
        return super().loglikelihood(requests)


def _lmms_base(cls: type) -> type:
    for klass in cls.__mro__:
        if klass.__module__.startswith("lmms_eval."):
            return klass
    raise TypeError(f"{cls.__name__} has no lmms-eval base class")  # pragma: no cover


def _check_wrapper_module(cls: type) -> None:
    """The Qwen wrappers only warn at import when qwen-vl-utils is missing, then fail at the first sample:
    refuse before loading the model instead."""
    for klass in cls.__mro__:
        if klass.__module__.startswith("lmms_eval.") and "generate_until" in klass.__dict__:
            if getattr(sys.modules[klass.__module__], "_has_qwen_vl", True) is False:
                stop_run(ConfigError(f"lmms-eval's {klass.__name__} wrapper needs the package qwen-vl-utils "
                                     "(pip install qwen-vl-utils)"), "missing dependency")
            return


def _token_counts_binding(cls: type):
    """(module, "TokenCounts", the class) where the wrapper's generate_until builds its per-sample counts."""
    from lmms_eval.api.instance import TokenCounts

    for klass in cls.__mro__:
        if klass.__module__.startswith("lmms_eval.") and "generate_until" in klass.__dict__:
            module = sys.modules[klass.__module__]
            if getattr(module, "TokenCounts", None) is TokenCounts:
                return module, "TokenCounts", TokenCounts
            return None, None, TokenCounts  # this wrapper reports no per-sample counts (simple qwen2_vl)
    return None, None, TokenCounts


def _record_throughput(summary: Mapping[str, float]) -> None:
    """Add the run's means to lmms-eval's throughput history, which its results (and the printed Throughput
    Summary) report as ``avg_vflowopt_<key>``. Recorded without a log line of its own (``log_metrics`` would
    log zero generated tokens and time beside them); the summary line is logged by generate_until."""
    from lmms_eval.models.model_utils import gen_metrics

    metrics = {f"vflowopt_{k}": float(summary[k]) for k in THROUGHPUT_KEYS if k in summary}
    if not metrics:
        return
    record = getattr(gen_metrics, "_record_metrics", None)
    if record is not None:
        record(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=metrics)
    else:  # pragma: no cover - other lmms-eval releases
        gen_metrics.log_metrics(0.0, 0, 0.0, additional_metrics=metrics)


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


@functools.cache
def _warn_on_other_lmms_eval() -> None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("lmms-eval")
    except PackageNotFoundError:  # pragma: no cover - a source checkout
        return
    if found != LMMS_EVAL_VERSION:
        _logger().warning(f"vflowopt: the lmms-eval plugin is made for lmms-eval {LMMS_EVAL_VERSION}, this is "
                          f"{found}; it subclasses lmms-eval's wrappers, whose internals it relies on")


def wrapper_class(model_id: str) -> type:
    """The plugin class of `model_id` (imports its lmms-eval wrapper)."""
    spec = WRAPPERS[model_id]
    cls = globals().get(spec.class_name)
    if cls is not None:
        return cls
    module_name, base_name = spec.base.rsplit(".", 1)
    base = getattr(importlib.import_module(module_name), base_name)
    _warn_on_other_lmms_eval()
    doc = (f"lmms-eval's {base_name} ({module_name}) with vflowopt pruning: --model {spec.model_id}, model_args "
           f"method=, budget=, strategy= and the method's fields beside the wrapper's own.")
    cls = type(spec.class_name, (_PruningWrapper, base),
               {"__module__": __name__, "__qualname__": spec.class_name, "__doc__": doc, "vflowopt_spec": spec})
    globals()[spec.class_name] = cls
    return cls


def __getattr__(name: str):
    """The wrapper classes are built on first access (that is when lmms-eval is imported)."""
    spec = _BY_CLASS_NAME.get(name)
    if spec is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return wrapper_class(spec.model_id)
