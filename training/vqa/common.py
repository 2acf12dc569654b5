"""What both training scripts use: prompt / pixel encoding, the auxiliary heads, the match-probe loss, the
learning-rate shape, recipe restoring on resume, and the checkpoint reader / writer.

Checkpoints (``train``'s ``checkpoint.pt``, ``pretrain``'s ``stage.pt``, a connect folder's ``aux.pt``,
``symbolic.pt`` and ``match.pt``) hold tensors and plain data only (dicts, lists, tuples, str, int, float, bool,
None), so every one is read with ``torch.load(weights_only=True)``: a file that would need anything else to
unpickle (and so could run code while loading) is refused, see :func:`load_checkpoint`.
:func:`save_checkpoint` checks the same rule before writing, so what is written can always be read back.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vflowopt.vqa import scenes as S

CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
DEFAULT_TYPE_WEIGHTS = "exists=1,colour=1.5,count=1.2,position=1,digit=2"


# ----------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------


def pixel_values(image) -> torch.Tensor:
    """CLIP-normalised ``(3, H, W)`` tensor; equals ``LlavaImageProcessorPil`` for a 224 x 224 picture."""
    arr = np.asarray(image, dtype=np.float32) / 255.0
    arr = (arr - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def encode_qa(tokenizer, qa: list[dict[str, str]], n_image_tokens: int,
              question_first: bool = False) -> tuple[list[int], list[int], list[int]]:
    """Token ids, labels (-100 except answers and their ``</s>``) and per-token question-type index (-1 where
    no answer), in the chat template's multi-turn format: ``<s>USER: <image>*N\\n q1 ASSISTANT: a1 </s>
    USER: q2 ASSISTANT: a2 </s> ...``; with ``question_first`` (one question) ``<s>USER: q <image>*N
    ASSISTANT: a </s>``, the layout of :data:`vflowopt.vqa.model.QUESTION_FIRST_TEMPLATE`."""
    vocab = tokenizer.get_vocab()
    user = [vocab["USER"], vocab[":"]]
    assistant = [vocab["ASSISTANT"], vocab[":"]]
    image = [vocab["<image>"]] * n_image_tokens
    if question_first and len(qa) != 1:
        raise ValueError(f"question-first sequences hold one question, got {len(qa)}")
    ids = [tokenizer.bos_token_id, *user] + ([] if question_first else image)
    labels = [-100] * len(ids)
    types = [-1] * len(ids)
    for k, item in enumerate(qa):
        q = [vocab[w] for w in item["question"].split()]
        prefix = (user if k else []) + q + (image if question_first else []) + assistant
        ids += prefix
        labels += [-100] * len(prefix)
        types += [-1] * len(prefix)
        answer = vocab[item["answer"]]
        ids += [answer, tokenizer.eos_token_id]
        labels += [answer, tokenizer.eos_token_id]
        types += [S.QUESTION_TYPES.index(item["type"]), -1]
    return ids, labels, types


def parse_type_weights(text: str) -> tuple[float, ...]:
    weights = dict.fromkeys(S.QUESTION_TYPES, 1.0)
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        if key not in weights:
            raise ValueError(f"unknown question type {key!r} in --type-weights")
        weights[key] = float(value)
    return tuple(weights[t] for t in S.QUESTION_TYPES)


# ----------------------------------------------------------------------------------------------------------
# Auxiliary heads and losses (training only)
# ----------------------------------------------------------------------------------------------------------


class AuxHeads(nn.Module):
    """Per-patch classifier on the feature tokens and a CLS classifier on the pooled output."""

    def __init__(self, dim: int):
        super().__init__()
        self.patch_sizes = dict(S.PATCH_CLASSES)
        self.patch = nn.Linear(dim, sum(self.patch_sizes.values()))
        self.n_present = len(S.COLOURS) * len(S.SHAPES)
        self.n_counts = len(S.COUNT_WORDS)
        self.cls = nn.Sequential(
            nn.Linear(dim, dim), nn.GELU(),
            nn.Linear(dim, self.n_present + len(S.SHAPES) * self.n_counts + 11),
        )

    def forward(self, patches: torch.Tensor, pooled: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor, dict]:
        logs: dict[str, float] = {}
        logits = self.patch(patches).split(list(self.patch_sizes.values()), dim=-1)
        loss = patches.new_zeros(())
        on_object = batch["patch_colour"] > 0
        for (key, _), lg in zip(self.patch_sizes.items(), logits):
            target = batch[f"patch_{key}"]
            loss = loss + F.cross_entropy(lg.flatten(0, 1), target.flatten())
            mask = batch["patch_digit"] > 0 if key == "digit" else on_object
            if key != "centre" and mask.any():
                logs[f"patch_acc_{key}"] = float((lg.argmax(-1) == target)[mask].float().mean())
        out = self.cls(pooled)
        present, counts, digit = out.split([self.n_present, len(S.SHAPES) * self.n_counts, 11], dim=-1)
        counts = counts.view(-1, len(S.SHAPES), self.n_counts)
        cls_loss = (
            F.binary_cross_entropy_with_logits(present, batch["scene_present"])
            + F.cross_entropy(counts.flatten(0, 1), batch["scene_shape_count"].flatten())
            + F.cross_entropy(digit, batch["scene_digit"])
        )
        logs["cls_acc_count"] = float((counts.argmax(-1) == batch["scene_shape_count"]).float().mean())
        logs["cls_acc_digit"] = float((digit.argmax(-1) == batch["scene_digit"]).float().mean())
        logs["cls_loss"] = float(cls_loss.detach())
        logs["patch_loss"] = float(loss.detach())
        return loss, cls_loss, logs


def match_stats(match_logits: torch.Tensor, referent: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the match probe (``(tokens, 3)`` logits against :func:`scenes.referents` labels) and its logs:
    the loss and the recall on the patches a question is about."""
    match_logits, referent = match_logits.float().reshape(-1, 3), referent.reshape(-1)
    loss = F.cross_entropy(match_logits, referent)
    hit = referent > 0
    recall = (match_logits.argmax(-1)[hit] == referent[hit]).float().mean()
    return loss, {"match_loss": float(loss.detach()), "match_recall": float(recall)}


def warm_cosine(step: int, start: int, end: int, warmup: int, min_frac: float) -> float:
    """Learning-rate multiplier: linear warm-up from ``start``, then cosine down to ``min_frac`` at ``end``."""
    s = step - start
    length = max(1, end - start)
    if s < warmup:
        return (s + 1) / warmup
    progress = min(1.0, (s - warmup) / max(1, length - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------------------
# Command line and resume
# ----------------------------------------------------------------------------------------------------------


def explicit_flags(parser: argparse.ArgumentParser, argv) -> list[str]:
    """Destinations of the options written on the command line (``argv``, or ``sys.argv[1:]``)."""
    given = sys.argv[1:] if argv is None else list(argv)
    return sorted({a.dest for a in parser._actions
                   if any(tok == o or tok.startswith(o + "=") for o in a.option_strings for tok in given)})


def restore_recipe(args: argparse.Namespace, saved: dict[str, Any], keep: tuple[str, ...]) -> dict[str, Any]:
    """On resume the recipe comes from the checkpoint (``saved``) and run control (``keep``) from now; recipe
    flags given explicitly on the command line are deliberate changes: kept, and returned to be logged."""
    explicit = set(getattr(args, "explicit", []))
    changed = {k: getattr(args, k) for k in sorted(explicit)
               if k not in keep and (k not in saved or saved[k] != getattr(args, k))}
    for key, value in saved.items():
        if key not in keep and key not in changed and key != "explicit" and hasattr(args, key):
            setattr(args, key, value)
    return changed


# ----------------------------------------------------------------------------------------------------------
# Checkpoints: tensors and plain data, read with weights_only=True
# ----------------------------------------------------------------------------------------------------------

_PLAIN = (str, int, float, bool, type(None))


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise ``TypeError`` unless ``obj`` is tensors and plain data (dict / list / tuple of str, int, float, bool,
    None), i.e. what ``torch.load(weights_only=True)`` reads back. Exact types: a numpy scalar (a ``float``
    subclass) or array would pickle as a numpy global and be refused on load."""
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN:
        return
    if type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in _PLAIN:
                raise TypeError(f"{where}: key {key!r} of type {type(key).__name__} is not plain data")
            check_plain(value, f"{where}[{key!r}]")
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            check_plain(value, f"{where}[{i}]")
        return
    raise TypeError(f"{where}: {type(obj).__module__}.{type(obj).__name__} is not a tensor or plain data "
                    "(torch.load(weights_only=True) would refuse it)")


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` atomically (``PATH.tmp`` then rename) after :func:`check_plain`."""
    path = Path(path)
    check_plain(state, path.name)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(path, map_location="cpu", weights_only=True)``; a missing file or one that holds anything but
    tensors and plain data (unpickling it could run code) ends the command with a one-line ``SystemExit``."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"{what}: no file {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[-1] if lines else "")
        raise SystemExit(
            f"{what}: refused to load {path}: it holds more than tensors and plain data, and unpickling it could "
            f"run code (read with torch.load(weights_only=True): {reason}). Checkpoints written by these "
            "training scripts hold tensors and plain data only; never unpickle one from an untrusted source "
            "with the unrestricted loader."
        ) from None
