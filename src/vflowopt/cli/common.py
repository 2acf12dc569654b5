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


NO_HUB = "not a hub id either (owner/name), so no hub downloads are attempted"


HUB_EXAMPLE = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"


#: --dtype choices and the torch dtype of each ("auto": the checkpoint's own dtype).
DTYPES = {"auto": "auto", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


#: What is fetched of a hub repository: configs, processor and tokenizer files and safetensors weights;
#: never pickled weights. Python files only with --trust-remote-code.
HUB_FILES = ("*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*", "vocab*",
             "merges*")


LARGE_IMAGE_PIXELS = 4096 * 4096


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


def _seed(text: str) -> int:
    """argparse type: a seed numpy and Optuna accept (0 to 2**32 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {2**32 - 1}, got {value}")
    return value


def _output_file(text: str) -> str:
    """argparse type: a file this process can write (checked before any work; missing folders are created)."""
    import os

    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; give a file name, e.g. {Path(text) / 'out.json'}")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} exists and cannot be overwritten (no write permission)")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no write permission in {folder}")
    return text


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


def _print_note(message: str) -> None:
    print(f"vflowopt: note: {message}", file=sys.stderr)


def _to_rgb(im, path: str):
    """`im` as 8-bit RGB, and what was converted (None for an 8-bit RGB picture)."""
    from PIL import Image

    mode = im.mode
    if mode == "RGB":
        return im.convert("RGB"), None
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float greyscale
        import numpy as np

        values = np.asarray(im, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if mode == "F" and top <= 1.0:
            scale = 255.0
        else:
            scale = 255.0 / 65535.0 if (mode.startswith("I;16") or top > 255) else 1.0
        eight = np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
        bits = "16-bit" if mode.startswith("I;16") else ("32-bit float" if mode == "F" else "32-bit integer")
        return Image.fromarray(eight, mode="L").convert("RGB"), f"{bits} greyscale, scaled to 8-bit RGB"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), \
            f"{mode} with transparency, composited onto white and converted to RGB"
    what = {"P": "a palette image", "L": "greyscale", "1": "black and white", "CMYK": "CMYK"}.get(mode, mode)
    return im.convert("RGB"), f"{what}, converted to RGB"


def _load_image(path: str | None):
    """An 8-bit RGB PIL image, or a CLIError; a conversion (16-bit, alpha, palette, greyscale) or a very
    large picture is one note on stderr."""
    from PIL import Image, UnidentifiedImageError

    if path is None:
        with resources.files("vflowopt").joinpath("assets", "example.png").open("rb") as fh:
            return Image.open(fh).convert("RGB")
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"image file not found: {path}" if not p.exists() else f"--image {path} is not a file")
    try:
        with Image.open(p) as im:
            im.load()
            image, converted = _to_rgb(im, path)
    except Image.DecompressionBombError as exc:
        raise CLIError(f"image {path} is too large to open safely ({_one_line(exc)}); downscale it, e.g. to "
                       "at most 4096 px a side (the processor resizes it much smaller anyway)") from None
    except UnidentifiedImageError:
        raise CLIError(f"{path} is not an image Pillow can read (accepted: PNG, JPEG, WebP, BMP, GIF, TIFF, ...)") \
            from None
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt data
        raise CLIError(f"cannot read image {path}: {_one_line(exc)} (the file is damaged or cut short)") from None
    if converted:
        _print_note(f"{path} is {converted}")
    if image.width * image.height > LARGE_IMAGE_PIXELS:
        _print_note(f"{path} is {image.width}x{image.height} px; the processor resizes it to the model's input "
                    "size")
    return image


def _image_tokens_note(images: Sequence, inputs, model) -> None:
    """After processing: how many visual tokens the very large pictures became."""
    if not any(im.width * im.height > LARGE_IMAGE_PIXELS for im in images):
        return
    from vflowopt.models.base import adapter_for

    try:
        n = int((inputs["input_ids"] == adapter_for(model).image_token_id).sum())
    except Exception:  # noqa: BLE001 - an unsupported model is refused later, with its own message
        return
    sizes = ", ".join(f"{im.width}x{im.height}" for im in images if im.width * im.height > LARGE_IMAGE_PIXELS)
    _print_note(f"the processor resized the {sizes} px picture(s) to {n} image tokens in the prompt")


def _prompt_text(text: str) -> str:
    """argparse type: a prompt with something in it."""
    if not text.strip():
        raise argparse.ArgumentTypeError("the prompt is empty; ask a question about the image, e.g. "
                                         "--prompt 'What is in the image?'")
    return text


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


def _device(text: str) -> str:
    """argparse type: cpu, cuda or cuda:N."""
    if text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _one_line_usage_error(parser: argparse.ArgumentParser):
    def error(message: str):
        parser.exit(2, f"{parser.prog}: error: {message} (see `{parser.prog} --help`)\n")

    return error


def add_model_arguments(p: argparse.ArgumentParser, *, dtype_default: str | None = "auto",
                        dtype_help: str = "the checkpoint's own dtype") -> None:
    """The loading options every command shares (--revision, --dtype, --device / --device-map,
    --attn-implementation, --trust-remote-code); argparse errors become one line."""
    p.add_argument("--revision", metavar="REV",
                   help="branch, tag or commit of a hub id (default: main); not with a local directory")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=dtype_default,
                   help=f"weights and activations; auto: the checkpoint's own dtype (default: {dtype_help})")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--device", type=_device, default="cpu", metavar="cpu|cuda|cuda:N",
                       help="where to run (default: cpu)")
    where.add_argument("--device-map", choices=("auto",),
                       help="spread the model over the GPUs and the CPU (needs the accelerate package); "
                            "instead of --device")
    p.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default="sdpa",
                   help="attention kernel of the model (default: sdpa; flash_attention_2 needs flash-attn and CUDA)")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let a hub model run its own Python code (off by default; never needed for the "
                        "supported families)")
    p.error = _one_line_usage_error(p)  # type: ignore[method-assign]


def _check_model_options(args: argparse.Namespace) -> None:
    """The loading options this machine can honour, checked before anything is loaded."""
    import importlib.util

    import torch

    device = args.device
    if device.startswith("cuda") and args.device_map is None:
        if not torch.cuda.is_available():
            raise CLIError(f"--device {device} was asked for, but torch sees no CUDA device "
                           "(this torch build or machine has none); use --device cpu")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CLIError(f"--device {device} was asked for, but torch sees {torch.cuda.device_count()} CUDA "
                           f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if args.device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise CLIError("--device-map auto needs the accelerate package (pip install accelerate); or use --device")
    if args.attn_implementation == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            raise CLIError("--attn-implementation flash_attention_2 needs the flash-attn package "
                           "(pip install flash-attn); use sdpa or eager")
        if args.device_map is None and not device.startswith("cuda"):
            raise CLIError("--attn-implementation flash_attention_2 runs on CUDA only; add --device cuda, "
                           "or use sdpa or eager")
        if args.dtype == "fp32":
            raise CLIError("--attn-implementation flash_attention_2 runs in fp16 or bf16, not fp32; "
                           "pass --dtype bf16")


def _is_hub_id(text: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if text.startswith((".", "/", "~")) or text.count("/") != 1:
        return False
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def _hub_error(repo_id: str, revision: str | None, exc: BaseException) -> CLIError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f" at revision {revision}" if revision else ""
    cache = constants.HF_HUB_CACHE
    if isinstance(exc, LocalEntryNotFoundError) or type(exc).__name__ == "OfflineModeIsEnabled":
        if constants.is_offline_mode():
            return CLIError(
                f"{repo_id}{at} is not in the local Hugging Face cache ({cache}) and hub downloads are off "
                f"(HF_HUB_OFFLINE=1): download it where the hub is reachable (`hf download {repo_id}`, into the same "
                "HF_HUB_CACHE or HF_HOME), or pass --model with a local directory"
            )
        return CLIError(f"{repo_id}{at} is not in the local Hugging Face cache ({cache}) and the hub could not be "
                        f"reached ({_one_line(exc.__cause__ or exc)}); check the network, or pass a local directory")
    if isinstance(exc, GatedRepoError):
        return CLIError(f"{repo_id} is gated: accept its terms on huggingface.co and log in (`hf auth login`)")
    if isinstance(exc, RepositoryNotFoundError):
        return CLIError(f"no model {repo_id} on the Hugging Face hub (or it is private: log in with "
                        f"`hf auth login`); nor is it a local directory")
    if isinstance(exc, RevisionNotFoundError):
        return CLIError(f"{repo_id} has no revision {revision!r} (--revision takes a branch, tag or commit)")
    if isinstance(exc, EntryNotFoundError):
        return CLIError(f"{repo_id}{at} has no config.json, so it is not a transformers model")
    return CLIError(f"could not fetch {repo_id}{at} from the Hugging Face hub: {_one_line(exc)}")


def _model_folder(args: argparse.Namespace) -> Path:
    """`--model` as a local folder: a directory as given, or a hub id's snapshot in the Hugging Face cache
    (downloaded unless it is there or HF_HUB_OFFLINE=1; configs, processor files and safetensors only). The
    hub id's config.json is fetched and checked first, so a wrong model costs no weight download."""
    spec = args.model
    path = Path(spec).expanduser()
    if path.is_dir():
        if args.revision is not None:
            raise CLIError(f"--revision applies to hub ids; {spec} is a local directory")
        return path
    if path.exists():
        raise CLIError(f"--model {spec} is a file; it takes a model directory or a hub id such as {HUB_EXAMPLE}")
    if not _is_hub_id(spec):
        raise CLIError(f"model directory not found: {spec} ({NO_HUB}; --model takes a local directory or a hub id "
                       f"such as {HUB_EXAMPLE})")
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        config_file = Path(hf_hub_download(spec, "config.json", revision=args.revision))
    except Exception as exc:  # noqa: BLE001 - every hub failure becomes one line
        raise _hub_error(spec, args.revision, exc) from None
    _check_family(config_file.parent, spec)
    patterns = [*HUB_FILES, "*.py"] if args.trust_remote_code else list(HUB_FILES)
    try:
        return Path(snapshot_download(spec, revision=args.revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(spec, args.revision, exc) from None


def _check_family(folder: Path, name: str) -> dict:
    """The folder's config.json, if it is a model family vflowopt prunes; else a CLIError saying what it is."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    from vflowopt.checkpoint import CheckpointError, read_config
    from vflowopt.models.base import supported_families

    try:
        config = read_config(folder)
    except CheckpointError as exc:
        raise CLIError(str(exc).replace(str(folder), name)) from None
    model_type = config["model_type"]
    families = supported_families()
    if model_type not in families:
        arch = ", ".join(config.get("architectures") or []) or "no architectures listed"
        kind = ("an image-text model of a family vflowopt has no adapter for"
                if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "vision_config" in config
                else "a text-only model (it takes no images)")
        raise CLIError(f"{name} is a '{model_type}' model ({arch}), {kind}; vflowopt prunes the visual tokens of "
                       f"these families: {', '.join(families)}")
    return config


def _checked_weights(folder: Path, name: str) -> list[Path]:
    from vflowopt.checkpoint import CheckpointError, check_safetensors

    try:
        return check_safetensors(folder)
    except CheckpointError as exc:
        raise CLIError(str(exc).replace(str(folder), name)) from None


def _load_model(folder: Path, args: argparse.Namespace, name: str | None = None):
    """``(model, processor)`` from a checked local folder, with the loading options of `args`, in eval mode.

    The family (config.json) and the weights (complete safetensors headers) are checked before anything is
    built; the model is ``AutoModelForImageTextToText.from_pretrained`` (the family's class), the processor
    ``AutoProcessor``, or its parts without a video processor where AutoProcessor needs torchvision."""
    name = name or str(folder)
    _check_family(folder, name)
    _checked_weights(folder, name)
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    kwargs: dict[str, Any] = {
        "dtype": DTYPES[args.dtype] if args.dtype else "auto",
        "attn_implementation": args.attn_implementation,
        "trust_remote_code": args.trust_remote_code,
        "use_safetensors": True,
        "local_files_only": True,
    }
    if args.device_map is not None:
        kwargs["device_map"] = args.device_map
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, **kwargs)
    except (torch.OutOfMemoryError, MemoryError) as exc:
        raise CLIError(f"out of memory loading {name} ({_one_line(exc)}): try --dtype bf16, a smaller model, or "
                       "--device-map auto") from None
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
        raise CLIError(f"could not load a model from {name}: {_one_line(exc)}") from None
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True,
                                                  trust_remote_code=args.trust_remote_code)
    except Exception as auto_exc:  # noqa: BLE001
        try:
            processor = _processor_from_parts(folder)
        except Exception as parts_exc:  # noqa: BLE001
            raise CLIError(
                f"could not load the processor from {name}: {_one_line(auto_exc)}; building it from "
                f"its image processor and tokenizer failed too: {_one_line(parts_exc)}"
            ) from None
    if getattr(processor, "tokenizer", None) is None:
        raise CLIError(f"the processor loaded from {name} has no tokenizer")
    if args.device_map is None:
        model = model.to(args.device)
    model.eval()
    return model, processor


def _placed(args: argparse.Namespace, model) -> None:
    """With --device-map, inputs go where the model's first layers are."""
    if args.device_map is not None:
        args.device = str(model.device)


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
    if str(device).startswith("cuda"):
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
    """The trained VQA model shipped with vflowopt (the offline default of run and optimize), on the CPU."""
    from vflowopt.vqa.model import load, shipped_model_path

    path = shipped_model_path()
    if not (path / "config.json").is_file():
        raise CLIError(f"the shipped VQA model is missing from this installation ({path}); pass --model DIR")
    return load(path)


def _as_asked(model, args: argparse.Namespace):
    """An already built model (the shipped one) with the dtype, attention kernel and device of `args`; its
    3 M parameters need no device map, so --device-map auto puts it on the first GPU, if any."""
    import torch

    if model.config._attn_implementation != args.attn_implementation:
        model.set_attn_implementation(args.attn_implementation)
    if args.device_map is not None:
        args.device = "cuda:0" if torch.cuda.is_available() else "cpu"
        args.device_map = None
    dtype = DTYPES[args.dtype or "auto"]
    return model.to(args.device) if dtype == "auto" else model.to(args.device, getattr(torch, dtype))


def _check_strategy_fits(folder: Path, name: str, strategy) -> None:
    """A strategy resolved for another family or depth is refused from config.json, before the weights load."""
    if strategy is None:
        return
    config = _check_family(folder, name)
    family = getattr(strategy, "model_family", None)
    if family is not None and family != config["model_type"]:
        raise CLIError(f"this strategy was made for a '{family}' model, not '{config['model_type']}' ({name}); "
                       "optimize a strategy for this model or use a plain config")
    layers = getattr(strategy, "num_layers", None)
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    depth = text.get("num_hidden_layers")
    if layers is not None and isinstance(depth, int) and layers != depth:
        raise CLIError(f"this strategy was made for an LLM with {layers} layers; {name} has {depth}")


def _model_for(args: argparse.Namespace, console, strategy=None) -> tuple[Any, Any, str]:
    """``(model, processor, name)`` placed as `args` asks: ``--model DIR|ID``, or the shipped VQA model.
    A `strategy` (config) made for another family or depth is refused before the weights are loaded."""
    _check_model_options(args)
    if args.json is True:  # stdout carries JSON: stderr keeps to one-line notices, without loading bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.model is None:
        if args.revision is not None:
            raise CLIError("--revision applies to hub ids given with --model")
        _note("No --model given: using the small LLaVA trained on vflowopt's procedural VQA scenes "
              "(vflowopt/assets/vqa_model; it only knows such scenes).", args, console)
        model, processor = _shipped_model()
        model = _as_asked(model, args)
        name = VQA_MODEL_NAME
    else:
        folder = _model_folder(args)
        _check_strategy_fits(folder, args.model, strategy)
        model, processor = _load_model(folder, args, args.model)
        name = args.model
    _placed(args, model)
    return model, processor, name


def _vqa_model_for(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """``eval``'s ``(model, processor, folder)``: a LLaVA trained on the VQA benchmark, checked before it is built."""
    from vflowopt.checkpoint import CheckpointError
    from vflowopt.vqa.model import load, shipped_model_path

    _check_model_options(args)
    if args.revision is not None and args.model is None:
        raise CLIError("--revision applies to hub ids given with --model")
    folder = _model_folder(args) if args.model else shipped_model_path()
    name = args.model or str(folder)
    try:
        model, processor = load(folder, device=args.device, attn_implementation=args.attn_implementation,
                                dtype=DTYPES[args.dtype], device_map=args.device_map)
    except CheckpointError as exc:
        raise CLIError(str(exc).replace(str(folder), name)) from None
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear line
        raise CLIError(f"could not load the model from {name}: {_one_line(exc)}") from None
    _placed(args, model)
    return model, processor, folder


def _shipped_sample() -> dict[str, Any]:
    """The first shipped sample scene: ``{"image": PIL image, "prompt", "answer", "type"}``."""
    from PIL import Image

    folder = resources.files("vflowopt").joinpath("assets", "samples")
    first = json.loads(folder.joinpath("samples.jsonl").read_text(encoding="utf-8").splitlines()[0])
    with folder.joinpath(first["image"]).open("rb") as fh:
        first["image"] = Image.open(fh).convert("RGB")
    return first
