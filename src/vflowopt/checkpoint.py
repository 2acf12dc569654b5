"""Checks on a saved model folder that run before anything is built: its config.json and its weights.

Building a model from a config allocates every parameter, so a wrong folder (a text-only model, a config
with no weights, a truncated download) must be refused from the files alone. Weights are read as
safetensors only: PyTorch pickles (``*.bin``, ``*.pt``) can run code when loaded, so a folder that holds
only those is refused with a way out. Every failure is a :class:`CheckpointError` whose message is one line
naming the folder or file, what is wrong and what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["CheckpointError", "check_safetensors", "config_parameters", "read_config", "weight_parameters"]

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
SAFETENSORS_INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A model folder that cannot be loaded as it is (message: one line, with what to do)."""


def read_config(folder: str | Path) -> dict[str, Any]:
    """The folder's config.json as a dict, or a CheckpointError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model directory not found: {folder}")
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json, so it is not a saved transformers model")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable JSON file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model_type"), str):
        raise CheckpointError(f"{path} has no 'model_type', so it is not a transformers model config")
    return data


def _weight_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no 'weight_map')") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"{folder} is missing {len(missing)} of the {len(names)} weight shards its "
                                  f"index names ({missing[0]}{', ...' if len(missing) > 1 else ''}); download "
                                  "or copy the folder again")
        return [folder / n for n in names]
    return sorted(folder.glob("*.safetensors"))


def check_safetensors(folder: str | Path) -> list[Path]:
    """The folder's safetensors weight files, each with a complete, readable header; else a CheckpointError.

    A file cut short (an interrupted download or copy) fails here, before any model is built."""
    from safetensors import safe_open

    folder = Path(folder)
    files = _weight_files(folder)
    if not files:
        pickles = sorted(p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern))
        if pickles:
            raise CheckpointError(
                f"{folder} holds only PyTorch pickle weights ({', '.join(pickles[:3])}), which can run code when "
                "read; vflowopt reads safetensors only: save the model again with `save_pretrained` (which writes "
                "safetensors) or use a revision of the repository that has *.safetensors"
            )
        raise CheckpointError(f"{folder} has no weights (no *.safetensors file next to its config.json)")
    for path in files:
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError: the file is unusable either way
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path} is truncated or damaged ({first}); download or copy it again") from None
    return files


def weight_parameters(files: list[Path]) -> int:
    """Elements stored in the safetensors `files` (from their headers; nothing is read into memory)."""
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - a safe_open handle is not a dict
                n = 1
                for dim in fh.get_slice(key).get_shape():
                    n *= int(dim)
                total += n
    return total


def config_parameters(model_class, config) -> int:
    """Parameters of `model_class(config)`, counted on the meta device (no memory is allocated)."""
    import torch

    with torch.device("meta"):
        model = model_class._from_config(config)
    return sum(p.numel() for p in model.parameters())
