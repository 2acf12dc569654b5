"""`run_bench`: efficiency and fidelity of every (method, budget) on one model and one input.

For each cell of the grid (plus one unpruned reference, method ``"unpruned"``) the model gets
``vflowopt.prune(model, vflowopt.config_for(method, budget=B))`` attached, and:

* ``warmup`` untimed generations run first (one-time costs: hook installation, allocator growth); before
  the reference, one untimed unpruned forward (which also records the vision work) warms the model;
* ``repeats`` timed prefills ``model(**inputs, logits_to_keep=1, use_cache=True)`` and ``repeats`` timed
  generations of exactly ``new_tokens`` tokens (greedy, ``min_new_tokens = max_new_tokens``, so every row
  decodes the same number of steps); on CUDA the device is synchronised around each timed call. The
  median is reported with the minimum, maximum and every run;
* peak memory over the timed runs (:class:`vflowopt.bench.memory.PeakMemory`), KV-cache bytes from the
  cache the first timed prefill returned, pruning overhead from ``handle.stats.pruning_ms`` (median);
* analytic prefill FLOPs (:func:`prefill_flops`) from the vision work the reference forward did and the
  per-layer token counts pruning actually kept;
* fidelity against the unpruned reference (:mod:`vflowopt.bench.fidelity`).

A failing cell (out of memory, a method that does not support the model) becomes a record with ``error``
set, and the rest of the grid still runs.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..api import active_handle, prune
from ..config import ConfigError, available_methods, check_fraction, config_for
from ..models.base import adapter_for
from ..progress import ProgressBar
from ..runtime.compat import cache_from_output
from .fidelity import cosine, next_token_kl, token_agreement
from .flops import (
    llm_prefill_flops,
    projector_flops,
    qwen_vision_flops,
    qwen_vision_scoring_flops,
    vision_flops,
    vision_scoring_flops,
)
from .memory import PeakMemory, kv_cache_bytes

__all__ = ["REFERENCE", "BenchRecord", "VisionWork", "prefill_flops", "run_bench", "validate_grid",
           "visual_placeholders"]

REFERENCE = "unpruned"
DEFAULT_BUDGETS = (1.0, 0.5, 0.25, 0.1)


@dataclasses.dataclass
class BenchRecord:
    """One (method, budget) cell. Times in ms, memory in bytes, FLOPs = 2 x multiply-adds."""

    method: str
    budget: float
    prefill_flops: int | None = None
    flops_ratio: float | None = None  # prefill_flops / the unpruned model's
    vision_flops: int | None = None  # vision encoder + projector (Qwen: + merger)
    llm_flops: int | None = None  # decoder layers at the kept token counts + LM head on 1 token
    scoring_flops: int | None = None  # signals the runtime recomputes for the method (ViT attention map)
    kv_cache_bytes: int | None = None
    kv_cache_bytes_per_layer: list[int] = dataclasses.field(default_factory=list)
    prefill_ms: float | None = None  # median
    prefill_ms_min: float | None = None
    prefill_ms_max: float | None = None
    prefill_ms_runs: list[float] = dataclasses.field(default_factory=list)
    prefill_speedup: float | None = None  # unpruned median / this median
    e2e_ms: float | None = None  # median, prefill + new_tokens greedy tokens
    e2e_ms_min: float | None = None
    e2e_ms_max: float | None = None
    e2e_ms_runs: list[float] = dataclasses.field(default_factory=list)
    e2e_speedup: float | None = None
    new_tokens: int = 0
    peak_memory_bytes: int | None = None
    pruning_overhead_ms: float | None = None  # median of handle.stats.pruning_ms over the timed prefills
    mean_retention: float | None = None
    visual_tokens: int | None = None
    prompt_tokens: int | None = None
    tokens_into_llm: int | None = None
    kv_tokens_per_layer: list[int] = dataclasses.field(default_factory=list)
    cosine: float | None = None
    kl: float | None = None
    token_agreement: float | None = None
    fidelity_meaningful: bool = True  # False for random weights: the fidelity numbers mean nothing
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Analytic FLOPs of the whole prefill
# ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class VisionWork:
    """What the vision side of one forward computed (recorded by hooks on the unpruned reference).

    A video is a run of frames through the same towers as pictures: CLIP/SigLIP frames count as crops
    (one ``passes`` entry per tower call, so a prompt whose images and frames differ in size is counted
    per pass), Qwen-VL videos add their ``video_grid_thw`` rows (t = temporal patches) to ``grid_thw``.
    """

    crops: int = 0  # CLIP/SigLIP: images/crops/frames through the tower(s)
    tokens_per_crop: int = 0  # encoder sequence length per crop (CLS included), of the last pass
    projector_tokens: int = 0  # features through the LLaVA projector (after NeXT-Video's pooling)
    grid_thw: list[list[int]] = dataclasses.field(default_factory=list)  # Qwen-VL: per image/video (t, h, w)
    passes: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (crops, tokens per crop) per call

    @property
    def qwen(self) -> bool:
        return bool(self.grid_thw)


def _is_qwen(config: Any) -> bool:
    return str(getattr(config.vision_config, "model_type", "")).startswith("qwen")


class _VisionCensus:
    """Forward pre-hooks on the vision tower(s) and the projector that record their input sizes (every
    tower: Video-LLaVA encodes videos with a second one)."""

    def __init__(self, model: nn.Module):
        self.work = VisionWork()
        adapter = adapter_for(model)
        self._handles = []
        self._qwen = _is_qwen(model.config)
        towers = list(getattr(adapter, "vision_towers", None) or [adapter.vision_tower])
        for tower in dict.fromkeys(towers):
            self._handles.append(tower.register_forward_pre_hook(self._on_vision, with_kwargs=True))
        projector = getattr(adapter.base, "multi_modal_projector", None)
        if projector is not None:
            self._handles.append(projector.register_forward_pre_hook(self._on_projector, with_kwargs=True))
        self._cls = 1 if "clip" in str(getattr(model.config.vision_config, "model_type", "")) else 0
        self._patch = int(model.config.vision_config.patch_size)

    def _on_vision(self, module, args, kwargs):
        if self._qwen:
            grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
            if grid is not None:
                self.work.grid_thw += [[int(x) for x in row] for row in grid.tolist()]
            return None
        pixels = kwargs.get("pixel_values", args[0] if args else None)
        if pixels is not None:
            crops = int(pixels.numel() // (pixels.shape[-3] * pixels.shape[-2] * pixels.shape[-1]))
            grid = (pixels.shape[-2] // self._patch) * (pixels.shape[-1] // self._patch)
            self.work.crops += crops
            self.work.tokens_per_crop = grid + self._cls
            self.work.passes.append((crops, grid + self._cls))
        return None

    def _on_projector(self, module, args, kwargs):
        feats = kwargs.get("image_features", args[0] if args else None)
        if feats is not None:
            self.work.projector_tokens += int(feats.numel() // feats.shape[-1])
        return None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def prefill_flops(config: Any, work: VisionWork, kv_tokens_per_layer: Sequence[int],
                  scoring_vision_layer: int | None = None) -> dict[str, int]:
    """Analytic FLOPs of one prefill (batch element): ``vision`` (encoder + projector, or the Qwen ViT
    with its merger), ``llm`` (decoder layers at ``kv_tokens_per_layer`` + LM head on the last token),
    ``scoring`` (the ViT attention map the runtime recomputes for a method that declares
    ``vision_attention_layer``) and their ``total``. FLOPs = 2 x multiply-adds; see
    :mod:`vflowopt.bench.flops` for what is counted."""
    vc = config.vision_config
    if work.qwen:
        vision = qwen_vision_flops(vc, work.grid_thw)
        scoring = 0 if scoring_vision_layer is None else qwen_vision_scoring_flops(vc, work.grid_thw,
                                                                                     scoring_vision_layer)
    else:
        passes = work.passes or ([(work.crops, work.tokens_per_crop)] if work.crops else [])
        vision = sum(vision_flops(vc, crops, tokens) for crops, tokens in passes)
        if work.projector_tokens:
            vision += projector_flops(config, work.projector_tokens)
        scoring = 0
        if scoring_vision_layer is not None:
            scoring = sum(vision_scoring_flops(vc, crops, tokens) for crops, tokens in passes)
    llm = llm_prefill_flops(config.text_config, list(kv_tokens_per_layer), logits_tokens=1)
    return {"vision": vision, "llm": llm, "scoring": scoring, "total": vision + llm + scoring}


# ---------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------


def visual_placeholders(model: nn.Module, input_ids: torch.Tensor) -> int:
    """Image + video placeholder tokens in `input_ids` (the budget unit counts both; newline tokens included,
    unlike ``stats.visual_tokens``)."""
    adapter = adapter_for(model)
    mask = input_ids == adapter.image_token_id
    video_id = getattr(adapter, "video_token_id", None)
    if video_id is not None:
        mask = mask | (input_ids == video_id)
    return int(mask.sum())


def validate_grid(methods: Sequence[str] | None, budgets: Sequence[float]) -> tuple[list[str], list[float]]:
    """The methods (default: every registered one) and budgets, or a ConfigError naming what is wrong."""
    known = available_methods()
    methods = list(known if methods is None else methods)
    if not methods:
        raise ConfigError("no methods to benchmark")
    for name in methods:
        if name not in known:
            raise ConfigError(f"unknown method '{name}'; available methods: {', '.join(known)}")
    budgets = list(budgets)
    if not budgets:
        raise ConfigError("no budgets to benchmark")
    for b in budgets:
        check_fraction("budget", b, allow_zero=False)
    for name in methods:
        for b in budgets:
            config_for(name, budget=float(b)).validate()
    return methods, [float(b) for b in budgets]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0].strip()}" if lines else type(exc).__name__
    return ("out of memory: " + text) if _is_oom(exc) else text


class _Runner:
    def __init__(self, model: nn.Module, inputs: Mapping, new_tokens: int, repeats: int, warmup: int):
        self.model = model
        self.inputs = dict(inputs)
        self.new_tokens = int(new_tokens)
        self.repeats = int(repeats)
        self.warmup = int(warmup)
        self.adapter = adapter_for(model)
        try:
            self.device = next(model.parameters()).device
        except StopIteration:  # pragma: no cover
            self.device = torch.device("cpu")
        self.inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self.inputs.items()}
        self.prompt_len = int(self.inputs["input_ids"].shape[1])
        self._last_hidden: torch.Tensor | None = None
        self._tap_on = False
        self._tap = self.adapter.base.register_forward_hook(self._on_base)
        gen = getattr(model, "generation_config", None)
        pad = getattr(gen, "pad_token_id", None)
        if pad is None:
            eos = getattr(gen, "eos_token_id", None)
            pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
        self.generate_kwargs = dict(max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens, do_sample=False,
                                    num_beams=1, temperature=None, top_p=None, top_k=None)
        if pad is not None:
            self.generate_kwargs["pad_token_id"] = pad

    def close(self) -> None:
        self._tap.remove()

    def _on_base(self, module, args, output):
        if self._tap_on:
            state = getattr(output, "last_hidden_state", None)
            if state is None and isinstance(output, tuple):
                state = output[0]
            if state is not None:
                self._last_hidden = state[:, -1].detach().float().clone()

    def prefill(self, capture: bool) -> tuple[float, Any]:
        self._tap_on = capture
        try:
            with torch.inference_mode():
                _sync(self.device)
                t0 = time.perf_counter()
                out = self.model(**self.inputs, logits_to_keep=1, use_cache=True)
                _sync(self.device)
                ms = 1000.0 * (time.perf_counter() - t0)
        finally:
            self._tap_on = False
        return ms, out

    def generate(self) -> tuple[float, list[int]]:
        with torch.inference_mode():
            _sync(self.device)
            t0 = time.perf_counter()
            out = self.model.generate(**self.inputs, **self.generate_kwargs)
            _sync(self.device)
            ms = 1000.0 * (time.perf_counter() - t0)
        return ms, [int(t) for t in out[0, self.prompt_len:].tolist()]

    def measure(self, record: BenchRecord, handle=None) -> dict:
        """Fills the timing/memory/cache fields of `record`; returns the captured outputs. With
        ``new_tokens == 0`` only prefills run (warm-up included): no e2e time, no token agreement."""
        for _ in range(self.warmup):
            if self.new_tokens:
                self.generate()
            else:
                self.prefill(capture=False)
        prefill_runs, e2e_runs, pruning = [], [], []
        captured: dict[str, Any] = {}
        with PeakMemory(self.device) as peak:
            for r in range(self.repeats):
                ms, out = self.prefill(capture=r == 0)
                prefill_runs.append(ms)
                if handle is not None:
                    pruning.append(float(handle.stats.pruning_ms))
                if r == 0:
                    per_layer = kv_cache_bytes(cache_from_output(out))
                    record.kv_cache_bytes_per_layer = per_layer
                    record.kv_cache_bytes = sum(per_layer)
                    captured["logits"] = out.logits[0, -1].detach().float().cpu()
                    captured["hidden"] = self._last_hidden.cpu() if self._last_hidden is not None else None
                    if handle is not None:
                        captured["stats"] = dataclasses.replace(handle.stats)
                del out
                if not self.new_tokens:
                    continue
                ms, tokens = self.generate()
                e2e_runs.append(ms)
                if r == 0:
                    captured["tokens"] = tokens
        record.peak_memory_bytes = peak.peak_bytes
        captured["peak_method"] = peak.method
        record.prefill_ms_runs = [round(x, 3) for x in prefill_runs]
        record.prefill_ms = statistics.median(prefill_runs)
        record.prefill_ms_min, record.prefill_ms_max = min(prefill_runs), max(prefill_runs)
        if e2e_runs:
            record.e2e_ms_runs = [round(x, 3) for x in e2e_runs]
            record.e2e_ms = statistics.median(e2e_runs)
            record.e2e_ms_min, record.e2e_ms_max = min(e2e_runs), max(e2e_runs)
        record.new_tokens = len(captured.get("tokens", ()))
        record.pruning_overhead_ms = statistics.median(pruning) if pruning else 0.0
        return captured


def run_bench(
    model: nn.Module,
    inputs: Mapping,
    methods: Sequence[str] | None = None,
    budgets: Sequence[float] = DEFAULT_BUDGETS,
    *,
    new_tokens: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    random_weights: bool = False,
    progress: bool = False,
    on_record: Callable[[BenchRecord], None] | None = None,
) -> list[BenchRecord]:
    """Measure every (method, budget) on `model` with `inputs` (a processor output for one sample).

    Returns the unpruned reference record (method ``"unpruned"``, budget 1.0) followed by one record per
    cell in the order given. `methods=None` means every registered method. `random_weights=True` marks
    every record's fidelity as meaningless. `on_record` is called with each finished record (the CLI
    writes its JSON/CSV there, so an interruption loses nothing finished). `progress` shows a rich
    progress bar with ETA on stderr when stderr is a terminal (vflowopt.progress). Raises ConfigError for an
    unknown method, a budget outside (0, 1] or bad counts; failures inside
    a cell are recorded in its `error` field instead.
    """
    methods, budgets = validate_grid(methods, budgets)
    for name, value, least in (("new_tokens", new_tokens, 0), ("repeats", repeats, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError(f"{name} must be a whole number >= {least}, got {value!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be a whole number >= 0, got {warmup!r}")
    if "input_ids" not in inputs:
        raise ConfigError("inputs must be a processor output with input_ids (one sample)")
    if int(inputs["input_ids"].shape[0]) != 1:
        raise ConfigError(f"run_bench measures one sample; inputs have batch size {inputs['input_ids'].shape[0]}")

    if active_handle(model) is not None:
        raise ConfigError("the model already has pruning attached; remove it before benchmarking")
    config = model.config
    runner = _Runner(model, inputs, new_tokens, repeats, warmup)
    n_layers = adapter_for(model).num_llm_layers
    cells = [(m, b) for m in methods for b in budgets]
    records: list[BenchRecord] = []

    bar = ProgressBar(len(cells) + 1, "bench", enabled=progress)
    bar.__enter__()
    bar.update(description=REFERENCE)
    try:
        # --- the unpruned reference -----------------------------------------------------------------
        ref = BenchRecord(method=REFERENCE, budget=1.0, fidelity_meaningful=not random_weights)
        census = _VisionCensus(model)
        try:
            with torch.inference_mode():
                model(**runner.inputs, logits_to_keep=1, use_cache=False)
        finally:
            census.remove()
        work = census.work
        reference = runner.measure(ref)
        ref.visual_tokens = visual_placeholders(model, runner.inputs["input_ids"][0])
        ref.prompt_tokens = ref.tokens_into_llm = runner.prompt_len
        ref.kv_tokens_per_layer = [runner.prompt_len] * n_layers
        ref.mean_retention = 1.0
        ref.pruning_overhead_ms = 0.0
        f = prefill_flops(config, work, ref.kv_tokens_per_layer)
        ref.prefill_flops, ref.vision_flops, ref.llm_flops, ref.scoring_flops = f["total"], f["vision"], f["llm"], 0
        ref.flops_ratio = ref.prefill_speedup = 1.0
        ref.e2e_speedup = 1.0 if ref.e2e_ms is not None else None
        ref.cosine, ref.kl = 1.0, 0.0
        ref.token_agreement = 1.0 if "tokens" in reference else None
        records.append(ref)
        if on_record is not None:
            on_record(ref)
        bar.update(advance=1)

        # --- the grid ---------------------------------------------------------------------------------
        ref_counted = False
        for method, budget in cells:
            bar.update(description=f"{method} @ {budget:g}")
            rec = BenchRecord(method=method, budget=budget, fidelity_meaningful=not random_weights)
            handle = None
            try:
                handle = prune(model, config_for(method, budget=budget))
                got = runner.measure(rec, handle)
                stats = got.get("stats")
                if stats is not None and stats.kv_tokens_per_layer:
                    rec.kv_tokens_per_layer = list(stats.kv_tokens_per_layer)
                    rec.visual_tokens = stats.visual_tokens
                    rec.prompt_tokens = stats.prompt_tokens
                    rec.tokens_into_llm = stats.tokens_into_llm
                    rec.mean_retention = float(stats.mean_retention)
                else:  # the method never pruned this forward (e.g. no image reached it)
                    rec.kv_tokens_per_layer = list(ref.kv_tokens_per_layer)
                    rec.visual_tokens, rec.prompt_tokens = ref.visual_tokens, ref.prompt_tokens
                    rec.tokens_into_llm, rec.mean_retention = ref.tokens_into_llm, 1.0
                layer = handle.method.vision_attention_layer if handle is not None else None
                f = prefill_flops(config, work, rec.kv_tokens_per_layer, scoring_vision_layer=layer)
                rec.prefill_flops, rec.vision_flops = f["total"], f["vision"]
                rec.llm_flops, rec.scoring_flops = f["llm"], f["scoring"]
                rec.flops_ratio = rec.prefill_flops / ref.prefill_flops
                rec.prefill_speedup = ref.prefill_ms / rec.prefill_ms
                if rec.e2e_ms is not None:
                    rec.e2e_speedup = ref.e2e_ms / rec.e2e_ms
                if reference.get("hidden") is not None and got.get("hidden") is not None:
                    rec.cosine = cosine(reference["hidden"], got["hidden"])
                rec.kl = next_token_kl(reference["logits"], got["logits"])
                if "tokens" in got:
                    rec.token_agreement = token_agreement(reference["tokens"], got["tokens"])
                if not ref_counted and rec.visual_tokens is not None and stats is not None:
                    # prunable visual tokens (newline/CLS tokens excluded), as the runtime counts them
                    ref.visual_tokens, ref_counted = rec.visual_tokens, True
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as exc:  # noqa: BLE001 - recorded, and the rest of the grid goes on
                rec.error = _describe(exc)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            finally:
                if handle is not None:
                    handle.remove()
            records.append(rec)
            if on_record is not None:
                on_record(rec)
            bar.update(advance=1)
    finally:
        runner.close()
        bar.update(description="done")
        bar.__exit__(None, None, None)
    for r in records:
        for key in ("cosine", "kl"):
            value = getattr(r, key)
            if isinstance(value, float) and math.isnan(value):
                setattr(r, key, None)
    return records
