"""Shared pieces of the `vflowopt` subcommands: errors, argument types, loading local models and images."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

DEFAULT_METHOD = "vflowopt"


DEFAULT_BUDGET = 0.25


TINY_MODEL_NAME = "bundled tiny-llava-onevision"


EXAMPLE_IMAGE = "vflowopt/assets/example.png"


VQA_MODEL_NAME = "shipped vqa-llava (vflowopt/assets/vqa_model)"


SAMPLE_SCENE = "vflowopt/assets/samples/sample_00.png"


NO_HUB = "local files only; no hub downloads are attempted"


class CLIError(Exception):
    """A user-facing failure: printed as one line, exit code `code`."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _budget(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"budget must be a number in (0, 1], got {text!r}") from None


def _error(message: str) -> None:
    print(f"vflowopt: error: {message}", file=sys.stderr)


def _note(message: str, args: argparse.Namespace, console, style: str | None = None) -> None:
    """Notices go to stdout with the tables, or to stderr when stdout carries JSON."""
    if args.json:
        print(f"vflowopt: {message}", file=sys.stderr)
    else:
        console.print(message, style=style, markup=False, highlight=False)


def _load_image(path: str | None):
    from PIL import Image, UnidentifiedImageError

    if path is None:
        with resources.files("vflowopt").joinpath("assets", "example.png").open("rb") as fh:
            return Image.open(fh).convert("RGB")
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"image file not found: {path}")
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise CLIError(f"cannot read image {path}: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0].strip() if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def _processor_class_name(path: Path) -> str | None:
    """The processor class a model directory asks for (its JSON files, else the model type's default)."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            try:
                value = json.loads(f.read_text()).get("processor_class")
            except (OSError, ValueError, AttributeError):
                value = None
            if isinstance(value, str) and value:
                return value
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
    except (OSError, ValueError, AttributeError, ImportError):
        return None
    name = PROCESSOR_MAPPING_NAMES.get(model_type)
    return name if isinstance(name, str) else None


def _processor_from_parts(path: Path):
    """Build the processor from its image processor and tokenizer, with no video processor.

    transformers 5.19-5.24 cannot build a video processor (nor type-check an empty video slot) without
    torchvision, which makes AutoProcessor fail for e.g. LLaVA-OneVision. Like `tiny.py`, we use a
    subclass of the model's own processor class that accepts `video_processor=None`; images and text
    work, videos do not.
    """
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    name = _processor_class_name(path)
    base = getattr(transformers, name, None) if name else None
    if base is None or not hasattr(base, "get_attributes"):
        raise ValueError(f"cannot tell which processor class to build (found {name!r})")

    class _NoVideoProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    _NoVideoProcessor.__name__ = _NoVideoProcessor.__qualname__ = base.__name__

    parts = []
    for attribute in _NoVideoProcessor.get_attributes():
        if attribute == "image_processor":
            parts.append(AutoImageProcessor.from_pretrained(path, local_files_only=True))
        elif attribute == "tokenizer":
            parts.append(AutoTokenizer.from_pretrained(path, local_files_only=True))
        elif attribute == "video_processor":
            parts.append(None)
        else:
            raise ValueError(f"{base.__name__} needs a '{attribute}', which vflowopt cannot build without it")
    processor_dict, extra = _NoVideoProcessor.get_processor_dict(path, local_files_only=True)
    return _NoVideoProcessor.from_args_and_dict(parts, processor_dict, **extra)


def _load_model(directory: str):
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise CLIError(f"model directory not found: {directory} (--model takes a local directory; {NO_HUB})")
    if not (path / "config.json").is_file():
        raise CLIError(f"{directory} has no config.json, so it is not a saved transformers model ({NO_HUB})")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        model = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
        raise CLIError(f"could not load a model from {directory}: {_one_line(exc)} ({NO_HUB})") from None
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as auto_exc:  # noqa: BLE001
        try:
            processor = _processor_from_parts(path)
        except Exception as parts_exc:  # noqa: BLE001
            raise CLIError(
                f"could not load the processor from {directory}: {_one_line(auto_exc)}; building it from "
                f"its image processor and tokenizer failed too: {_one_line(parts_exc)} ({NO_HUB})"
            ) from None
    if getattr(processor, "tokenizer", None) is None:
        raise CLIError(f"the processor loaded from {directory} has no tokenizer")
    model.eval()
    return model, processor


def _layer_ranges(values: Sequence[int]) -> str:
    """[56, 56, 56, 42] -> 'layers 0-2: 56, 3: 42'."""
    parts = []
    start = 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            parts.append(f"{span}: {values[start]}")
            start = i
    return ("layers " + ", ".join(parts)) if parts else "-"


def _round(value: Any, digits: int = 4) -> Any:
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, (list, tuple)):
        return [_round(v, digits) for v in value]
    return value


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _split_list(text: str, what: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise CLIError(f"--{what} needs at least one value")
    return items


def _method_budget_grid(args: argparse.Namespace) -> tuple[list[str], list[float]]:
    """``--methods`` (None or "all": every registered method) and ``--budgets``, validated before any load."""
    import vflowopt
    from vflowopt.bench.run import validate_grid

    methods = None if args.methods in (None, "all") else _split_list(args.methods, "methods")
    budgets = []
    for text in _split_list(args.budgets, "budgets"):
        try:
            budgets.append(float(text))
        except ValueError:
            raise CLIError(f"budget must be a number in (0, 1], got {text!r}") from None
    try:
        return validate_grid(methods, budgets)
    except vflowopt.ConfigError as exc:
        raise CLIError(str(exc)) from None
    except TypeError as exc:  # a method whose config takes no budget
        raise CLIError(f"a method does not accept a budget: {exc}") from None


def _shipped_model():
    """The trained VQA model shipped with vflowopt (the offline default of run and optimize)."""
    from vflowopt.vqa.model import load, shipped_model_path

    path = shipped_model_path()
    if not (path / "config.json").is_file():
        raise CLIError(f"the shipped VQA model is missing from this installation ({path}); pass --model DIR")
    return load(path)


def _model_for(args: argparse.Namespace, console) -> tuple[Any, Any, str]:
    """``(model, processor, name)`` on ``args.device``: ``--model DIR``, or the shipped VQA model."""
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda was asked for, but torch sees no CUDA device")
    if args.model is None:
        _note("No --model given: using the small LLaVA trained on vflowopt's procedural VQA scenes "
              "(vflowopt/assets/vqa_model; it only knows such scenes).", args, console)
        model, processor = _shipped_model()
        name = VQA_MODEL_NAME
    else:
        model, processor = _load_model(args.model)
        name = args.model
    return model.to(args.device), processor, name


def _shipped_sample() -> dict[str, Any]:
    """The first shipped sample scene: ``{"image": PIL image, "prompt", "answer", "type"}``."""
    from PIL import Image

    folder = resources.files("vflowopt").joinpath("assets", "samples")
    first = json.loads(folder.joinpath("samples.jsonl").read_text(encoding="utf-8").splitlines()[0])
    with folder.joinpath(first["image"]).open("rb") as fh:
        first["image"] = Image.open(fh).convert("RGB")
    return first
