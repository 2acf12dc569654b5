"""Train the VQA benchmark model from scratch (CPU or GPU), reproducibly and resumably.

Usage::

    python -m vflowopt.vqa.train --out runs/vqa --steps 20000 [--resume] [--device cpu|cuda] [--seed 0]
        [--log FILE] [--batch 16] [--preset base] [--workers 0] [--threads N] ...

Outputs in ``--out``:

* ``checkpoint.pt`` - everything needed to resume: model + auxiliary heads, optimizer, step, RNG states,
  the arguments, the stage flags and the learning-curve history (written atomically every
  ``--save-every`` steps and at the end).
* ``--max-minutes M`` stops cleanly (checkpoint saved) after M minutes of wall clock, for machines that
  run one command for a limited time; ``--resume`` continues.
* ``model/`` - the Hugging Face folder (``save_pretrained``: model + processor, no auxiliary heads), written
  with every checkpoint; load it with :func:`vflowopt.vqa.model.load` or ``from_pretrained``.
* ``train.log`` (or ``--log``) - one JSON object per line: training records (``"kind": "train"``), held-out
  evaluations (``"kind": "eval"``) and events (``"kind": "event"``).

Reproducibility: the batch of step ``s`` is a pure function of ``(seed, s)`` (scenes ``s*B .. s*B+B-1`` of
the ``train`` split), the initial weights of ``seed``; resuming restores model, optimizer and RNG states,
so a resumed run continues the same trajectory (up to non-deterministic kernels on GPU).

The recipe (see ``docs/vqa.md`` and ``../shared/reference/tiny-training.md``, trial 2):

* answer loss on the one-word answers (and the closing ``</s>``) of ``--qa`` questions packed per image;
* dense per-patch auxiliary supervision on the 256 feature tokens (colour, shape, digit, object centre) -
  makes the vision side learn within a few hundred steps;
* a CLS head on the vision tower's pooled output (present colour x shape pairs, count per shape, digit) -
  trains the CLS token, so CLS-attention pruning methods have a real signal;
* scale control: text embeddings at norm ~1, the projector rescaled so image tokens start at norm ~1, and a
  penalty ``--scale-weight * log(mean image-token norm / target)^2`` keeping them there;
* a staged schedule: ``--vision-only-frac`` (vision + aux heads only), joint training, then from
  ``--freeze-vision-frac`` the vision tower frozen, the projector rescaled to norm 1 and projector + LM
  trained with a fresh warmup + cosine at ``--lr-stage2``;
* a curriculum: easy scenes (1-3 large objects, big digit) for the first ``--curriculum-frac`` of steps,
  then ``--easy-mix`` of easy scenes mixed in.
* question-first only: ``--match-weight`` (the LM stage's match probe kept) and ``--attn-weight`` (two heads
  of ``--attn-layer`` taught to attend from the answer position to the objects the question is about:
  :mod:`vflowopt.vqa.attn_supervision`).

The auxiliary heads are not part of the saved model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import scenes as S
from .attn_supervision import AttentionTap, attention_loss
from .model import build_model, num_parameters, rescale_projector, save

CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
DEFAULT_TYPE_WEIGHTS = "exists=1,colour=1.5,count=1.2,position=1,digit=2"


# ----------------------------------------------------------------------------------------------------------
# Data
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


class StepBatches(torch.utils.data.Dataset):
    """Item ``i`` is the whole batch of step ``start + i`` (rendered on the fly; deterministic by seed)."""

    def __init__(self, tokenizer, args, start: int, stop: int):
        self.tokenizer = tokenizer
        self.args = args
        self.start, self.stop = start, stop
        self.weights = parse_type_weights(args.type_weights)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step = self.start + i
        return make_batch(self.tokenizer, self.args, step, self.weights)


def parse_type_weights(text: str) -> tuple[float, ...]:
    weights = dict.fromkeys(S.QUESTION_TYPES, 1.0)
    for part in filter(None, text.split(",")):
        key, value = part.split("=")
        if key not in weights:
            raise ValueError(f"unknown question type {key!r} in --type-weights")
        weights[key] = float(value)
    return tuple(weights[t] for t in S.QUESTION_TYPES)


def scene_config_for(args, step: int, index: int) -> S.SceneConfig:
    if step < args.curriculum_frac * args.steps:
        return S.SceneConfig.easy()
    if args.easy_mix > 0 and random.Random(args.seed * 1_000_003 + index).random() < args.easy_mix:
        return S.SceneConfig.easy()
    return S.SceneConfig()


def make_batch(tokenizer, args, step: int, weights=None) -> dict[str, torch.Tensor]:
    weights = weights or parse_type_weights(args.type_weights)
    n_tokens = (224 // 14) ** 2
    rows = []
    for j in range(args.batch):
        index = step * args.batch + j
        rng = S.scene_rng("train", args.seed, index)
        desc = S.sample_scene(rng, scene_config_for(args, step, index))
        n_q = int(rng.integers(args.qa_min, args.qa_max + 1))
        qa = S.make_questions(desc, rng, n_q, S.QUESTION_TYPES, weights)
        targets = S.patch_targets(desc)
        if getattr(args, "question_first", False):  # one sequence per question; the picture is encoded once
            seqs = [(*encode_qa(tokenizer, [item], n_tokens, question_first=True), S.referents(targets, item))
                    for item in qa]
        else:
            seqs = [(*encode_qa(tokenizer, qa, n_tokens), None)]
        rows.append((S.render(desc), seqs, targets, S.scene_targets(desc)))
    seqs = [(j, seq) for j, r in enumerate(rows) for seq in r[1]]
    length = max(len(seq[0]) for _, seq in seqs)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([s[0] + [pad] * (length - len(s[0])) for _, s in seqs]),
        "attention_mask": torch.tensor([[1] * len(s[0]) + [0] * (length - len(s[0])) for _, s in seqs]),
        "labels": torch.tensor([s[1] + [-100] * (length - len(s[1])) for _, s in seqs]),
        "answer_type": torch.tensor([s[2] + [-1] * (length - len(s[2])) for _, s in seqs]),
        "scene_index": torch.tensor([j for j, _ in seqs]),
        "pixel_values": torch.stack([pixel_values(r[0]) for r in rows]),
    }
    if seqs[0][1][3] is not None:  # (sequences, 256): what each question is about, for the match probe
        batch["referent"] = torch.from_numpy(np.stack([s[3] for _, s in seqs]))
    for key in S.PATCH_CLASSES:
        batch[f"patch_{key}"] = torch.from_numpy(np.stack([r[2][key] for r in rows]))
    for key in ("present", "shape_count", "digit"):
        batch[f"scene_{key}"] = torch.from_numpy(np.stack([np.asarray(r[3][key]) for r in rows]))
    return batch


def match_stats(match_logits: torch.Tensor, referent: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of the match probe (``(tokens, 3)`` logits against :func:`scenes.referents` labels) and its logs:
    the loss and the recall on the patches a question is about."""
    match_logits, referent = match_logits.float().reshape(-1, 3), referent.reshape(-1)
    loss = F.cross_entropy(match_logits, referent)
    hit = referent > 0
    recall = (match_logits.argmax(-1)[hit] == referent[hit]).float().mean()
    return loss, {"match_loss": float(loss.detach()), "match_recall": float(recall)}


def forward_answers(model, taps, batch, tap_layer: int | None = None):
    """Logits of every sequence of ``batch``; each picture goes through the vision tower once, also when several
    sequences (question-first layout) share it (``batch["scene_index"]``: the picture of each sequence). With
    ``tap_layer``, also the LM hidden states of the image positions after that many layers ``(seq, 256, dim)``."""
    model.model.get_image_features(pixel_values=batch["pixel_values"])
    features = taps.projected[batch["scene_index"]]
    embeds = model.get_input_embeddings()(batch["input_ids"])
    mask = batch["input_ids"] == model.config.image_token_id
    embeds = embeds.masked_scatter(mask[..., None], features.to(embeds.dtype))
    out = model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                output_hidden_states=tap_layer is not None)
    if tap_layer is None:
        return out.logits
    hidden = out.hidden_states[tap_layer]
    return out.logits, hidden[mask].view(hidden.shape[0], -1, hidden.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# Auxiliary heads (training only)
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


class Taps:
    """Forward hooks that keep the vision tower's output and the projector's output of the last forward."""

    def __init__(self, model):
        self.vision: tuple[torch.Tensor, torch.Tensor] | None = None
        self.projected = None
        self.handles = [
            model.model.vision_tower.register_forward_hook(self._vision),
            model.model.multi_modal_projector.register_forward_hook(self._projector),
        ]

    def _vision(self, module, args, output):
        # LlavaModel.get_image_features later overwrites output.pooler_output with the projected features:
        # keep the tensors now.
        self.vision = (output.hidden_states[-1], output.pooler_output)

    def _projector(self, module, args, output):
        self.projected = output

    def remove(self):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------------------


def warm_cosine(step: int, start: int, end: int, warmup: int, min_frac: float) -> float:
    """Learning-rate multiplier: linear warm-up from ``start``, then cosine down to ``min_frac`` at ``end``."""
    s = step - start
    length = max(1, end - start)
    if s < warmup:
        return (s + 1) / warmup
    progress = min(1.0, (s - warmup) / max(1, length - warmup))
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_factors(args, step: int) -> tuple[float, float]:
    """Multipliers ``(vision + aux heads, projector + LM)`` of the base learning rates at ``step``."""
    total = args.steps
    freeze_at = int(args.freeze_vision_frac * total)
    vision_only = int(args.vision_only_frac * total)
    floor = args.min_lr_frac
    if step >= freeze_at:
        return 0.0, warm_cosine(step, freeze_at, total, args.warmup // 2, floor) * args.lr_stage2 / args.lr_lm
    vis = warm_cosine(step, 0, freeze_at, args.warmup, floor)
    if step < vision_only:
        return vis, 0.0
    return vis, warm_cosine(step, vision_only, freeze_at, args.warmup, floor)


# ----------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m vflowopt.vqa.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, model/, train.log)")
    p.add_argument("--steps", type=int, required=True, help="total optimisation steps of the run")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="log file (default OUT/train.log)")
    p.add_argument("--preset", default="base", help="tiny | small | base (see vflowopt.vqa.model.PRESETS)")
    p.add_argument("--text", default="qwen2", help="qwen2 | llama")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--qa-min", type=int, default=7)
    p.add_argument("--qa-max", type=int, default=9)
    p.add_argument("--type-weights", default=DEFAULT_TYPE_WEIGHTS)
    p.add_argument("--lr-vision", type=float, default=2e-3)
    p.add_argument("--lr-lm", type=float, default=1e-3)
    p.add_argument("--lr-stage2", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--schedule", choices=("staged", "joint"), default="staged",
                   help="joint: no vision-only phase and no freezing (overrides the two fractions)")
    p.add_argument("--vision-only-frac", type=float, default=0.03)
    p.add_argument("--freeze-vision-frac", type=float, default=0.6)
    p.add_argument("--curriculum-frac", type=float, default=0.15)
    p.add_argument("--easy-mix", type=float, default=0.1)
    p.add_argument("--patch-weight", type=float, default=1.0)
    p.add_argument("--cls-weight", type=float, default=0.5)
    p.add_argument("--scale-weight", type=float, default=0.1)
    p.add_argument("--scale-target", type=float, default=1.0)
    p.add_argument("--init", default=None,
                   help="start from a `python -m vflowopt.vqa.pretrain connect` folder (model/, aux.pt, "
                        "symbolic.pt) instead of random weights; the projector is not rescaled")
    p.add_argument("--align-weight", type=float, default=0.0,
                   help="with --init: weight of the loss keeping projected image tokens on the symbolic tokens "
                        "the LM was pre-trained on (relative MSE)")
    p.add_argument("--question-first", action="store_true",
                   help="one question per sequence, before the image tokens (QUESTION_FIRST_TEMPLATE); "
                        "--qa-min/--qa-max then count sequences per picture. With --init, taken from that folder")
    p.add_argument("--match-weight", type=float, default=0.0,
                   help="with --init from a pretrain run that trained the match probe (match.pt): weight of that "
                        "probe's loss during fine-tuning (0: off)")
    p.add_argument("--attn-weight", type=float, default=0.0,
                   help="question-first: weight of the attention supervision of the answer position "
                        "(vflowopt.vqa.attn_supervision; 0: off)")
    p.add_argument("--attn-layer", type=int, default=3,
                   help="LM layer (0-based) whose first two heads --attn-weight supervises")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--eval-every", type=int, default=1000, help="0: no held-out evaluation during training")
    p.add_argument("--eval-n", type=int, default=250)
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes rendering scenes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop cleanly (checkpoint saved) after this much wall-clock time; resume later")
    args = p.parse_args(argv)
    args.explicit = explicit_flags(p, argv)
    if args.schedule == "joint":
        args.vision_only_frac, args.freeze_vision_frac = 0.0, 1.0
    return args


RESUME_KEEP = ("out", "steps", "resume", "device", "log", "log_every", "save_every", "eval_every", "eval_n",
               "workers", "threads", "amp", "max_minutes")


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


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, model, aux, opt, step: int, args, flags, history, processor, match=None) -> None:
    state = {
        "step": step,
        "model": model.state_dict(),
        "aux": aux.state_dict(),
        "match": None if match is None else match.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": _rng_state(),
        "args": vars(args),
        "flags": flags,
        "history": history,
    }
    tmp = out / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, out / "checkpoint.pt")
    save(model, processor, out / "model")


def _init_layout(folder: Path) -> bool:
    """Whether the ``connect`` folder's processor puts the question before the picture."""
    from transformers import AutoProcessor

    from .model import QUESTION_FIRST_TEMPLATE

    if not (folder / "model" / "config.json").is_file():
        return False  # _load_init says what is missing
    processor = AutoProcessor.from_pretrained(str(folder / "model"), local_files_only=True)
    return processor.chat_template == QUESTION_FIRST_TEMPLATE


def _load_init(folder: Path, model, aux) -> nn.Module | None:
    """Weights from a ``pretrain connect`` folder; returns its symbolic-token module (or ``None``)."""
    from .model import load
    from .pretrain import symbolic_from_state

    if not (folder / "model" / "config.json").is_file():
        raise SystemExit(f"--init: no {folder / 'model'} (expected a `python -m vflowopt.vqa.pretrain connect` folder)")
    model.load_state_dict(load(folder / "model")[0].state_dict())
    if (folder / "aux.pt").is_file():
        aux.load_state_dict(torch.load(folder / "aux.pt", map_location="cpu"))
    if not (folder / "symbolic.pt").is_file():
        return None
    symbolic = symbolic_from_state(torch.load(folder / "symbolic.pt", map_location="cpu"),
                                   model.config.text_config.hidden_size)
    return symbolic.requires_grad_(False)


def train(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = Path(args.log) if args.log else out / "train.log"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))

    ckpt = None
    if args.resume:
        path = out / "checkpoint.pt"
        if not path.exists():
            raise SystemExit(f"--resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        changed = restore_recipe(args, ckpt["args"], RESUME_KEEP)

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    if args.init:
        args.question_first = _init_layout(Path(args.init))
    model, processor = build_model(args.preset, args.text, seed=args.seed, question_first=args.question_first)
    aux = AuxHeads(model.config.vision_config.hidden_size)
    vision_params = list(model.model.vision_tower.parameters()) + list(aux.parameters())
    vision_ids = {id(p) for p in model.model.vision_tower.parameters()}
    match, match_layer = None, 0
    if args.init and (Path(args.init) / "match.pt").is_file():  # the LM stage's match probe
        saved = torch.load(Path(args.init) / "match.pt", map_location="cpu")
        match, match_layer = nn.Linear(model.config.text_config.hidden_size, 3), int(saved["layer"])
        match.load_state_dict(saved["state"])
    if args.match_weight > 0 and match is None:
        raise SystemExit("--match-weight needs --init DIR from a pretrain run that trained the match probe "
                         f"(DIR/match.pt); {args.init or 'no --init'} has none")
    if args.attn_weight > 0 and not args.question_first:
        raise SystemExit("--attn-weight needs the question-first layout (--question-first, or --init from a "
                         "question-first pretrain run)")
    try:  # checked before anything is logged and before a resumed checkpoint's weights are loaded
        attn_tap = AttentionTap(model, args.attn_layer) if args.attn_weight > 0 else None
    except ValueError as err:
        raise SystemExit(str(err)) from None
    lm_params = [p for p in model.parameters() if id(p) not in vision_ids]
    if match is not None:
        lm_params += list(match.parameters())
    opt = torch.optim.AdamW(
        [{"params": vision_params, "lr": args.lr_vision}, {"params": lm_params, "lr": args.lr_lm}],
        weight_decay=args.weight_decay, betas=(0.9, 0.98),
    )
    flags = {"projector_scaled": False, "stage2_scaled": False}
    history: list[dict[str, Any]] = []
    start = 0
    symbolic = None
    if args.init:
        symbolic = _load_init(Path(args.init), model, aux)
        flags["projector_scaled"] = True
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        aux.load_state_dict(ckpt["aux"])
        if match is not None and ckpt.get("match") is not None:
            match.load_state_dict(ckpt["match"])
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        flags, history, start = ckpt["flags"], ckpt["history"], ckpt["step"]
        _log(log_path, {"kind": "event", "event": "resume", "step": start, "time": time.time()})
        if changed:
            _log(log_path, {"kind": "event", "event": "recipe_change", "step": start, "changed": changed})
    else:
        _log(log_path, {"kind": "event", "event": "start", "args": vars(args), "params": num_parameters(model),
                        "device": str(device), "time": time.time()})
    model.to(device).train()
    aux.to(device).train()
    if match is not None:
        match.to(device).train()
    if symbolic is not None:
        symbolic.to(device)
    for state in opt.state.values():
        for k, v in state.items():
            if torch.is_tensor(v) and k != "step":
                state[k] = v.to(device)
    taps = Taps(model)
    freeze_at = int(args.freeze_vision_frac * args.steps)

    loader = torch.utils.data.DataLoader(
        StepBatches(processor.tokenizer, args, start, args.steps), batch_size=None, shuffle=False,
        num_workers=args.workers, persistent_workers=False, prefetch_factor=4 if args.workers else None,
        pin_memory=device.type == "cuda",
    )
    t0 = time.time()
    window = {"t": time.time(), "steps": 0}
    acc: dict[str, list[float]] = {}
    step = start
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if step >= freeze_at and not flags["stage2_scaled"]:
            model.model.vision_tower.requires_grad_(False)
            with torch.no_grad():
                model.model.get_image_features(pixel_values=batch["pixel_values"])
            factor = rescale_projector(model, taps.projected, args.scale_target)
            flags["stage2_scaled"] = True
            _log(log_path, {"kind": "event", "event": "freeze_vision", "step": step, "projector_factor": factor})
        if not flags["projector_scaled"]:
            with torch.no_grad():
                model.model.get_image_features(pixel_values=batch["pixel_values"])
            factor = rescale_projector(model, taps.projected, args.scale_target)
            flags["projector_scaled"] = True
            _log(log_path, {"kind": "event", "event": "projector_scaled", "step": step, "factor": factor})
        if step >= freeze_at:
            model.model.vision_tower.requires_grad_(False)

        f_vis, f_lm = lr_factors(args, step)
        opt.param_groups[0]["lr"] = args.lr_vision * f_vis
        opt.param_groups[1]["lr"] = args.lr_lm * f_lm

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            tap = match_layer if match is not None and args.match_weight > 0 else None
            logits = forward_answers(model, taps, batch, tap)
            if tap is not None:
                logits, image_hidden = logits
            logits = logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            answer_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
            last_hidden, pooled = taps.vision
            aux_patch, aux_cls, logs = aux(last_hidden[:, 1:].float(), pooled.float(), batch)
            norm = taps.projected.float().norm(dim=-1).mean()
            scale_loss = torch.log(norm / args.scale_target) ** 2
            w_ans = 0.0 if f_lm == 0.0 else 1.0
            loss = w_ans * answer_loss + args.scale_weight * scale_loss
            if symbolic is not None and args.align_weight:
                with torch.no_grad():
                    target = symbolic({k: batch[f"patch_{k}"] for k in S.PATCH_CLASSES}, model.get_input_embeddings())
                align = F.mse_loss(taps.projected.float(), target) / target.pow(2).mean()
                loss = loss + args.align_weight * align
                logs["align_rel_mse"] = float(align.detach())
            if tap is not None:  # keep the LM's image tokens naming what the question is about
                match_loss, match_logs = match_stats(match(image_hidden.float()), batch["referent"])
                loss = loss + args.match_weight * match_loss
                logs.update(match_logs)
            if attn_tap is not None:  # the answer position reads the referred objects (attn_supervision)
                attn_loss, attn_logs = attention_loss(attn_tap, batch, model.config.image_token_id)
                loss = loss + args.attn_weight * attn_loss
                logs.update(attn_logs)
            if step < freeze_at:
                loss = loss + args.patch_weight * aux_patch + args.cls_weight * aux_cls
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), args.grad_clip)
        opt.step()
        step += 1
        window["steps"] += 1

        with torch.no_grad():
            pred = logits.argmax(-1)
            types = batch["answer_type"][:, 1:]
            for k, name in enumerate(S.QUESTION_TYPES):
                mask = types == k
                if mask.any():
                    acc.setdefault(name, []).append(float((pred[mask] == labels[mask]).float().mean()))
            logs["answer_loss"] = float(answer_loss.detach())  # answers and their </s>
            words = types >= 0
            if words.any():  # the answer words alone (</s> is trivial and would halve the number)
                logs["answer_word_loss"] = float(F.cross_entropy(logits[words], labels[words]))
            logs["image_norm"] = float(norm)
            for key, value in logs.items():
                acc.setdefault(key, []).append(value)

        if step % args.log_every == 0 or step == args.steps:
            now = time.time()
            record = {"kind": "train", "step": step, "loss": float(loss.detach()),
                      "lr_vision": opt.param_groups[0]["lr"], "lr_lm": opt.param_groups[1]["lr"],
                      "steps_per_s": window["steps"] / max(1e-9, now - window["t"]),
                      "elapsed_s": now - t0, "load": os.getloadavg()[0]}
            for key, values in acc.items():
                record[key if key not in S.QUESTION_TYPES else f"train_acc_{key}"] = float(np.mean(values))
            _log(log_path, record)
            history.append({k: record[k] for k in record if k not in ("kind",)})
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}),
                  file=sys.stderr, flush=True)
            acc = {}
            window = {"t": now, "steps": 0}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            from .evaluate import evaluate_full

            model.eval()
            result = evaluate_full(model, processor, n=args.eval_n, seed=args.seed, split="val")
            model.train()
            _log(log_path, {"kind": "eval", "step": step, "split": "val", **result})
            history.append({"step": step, "val_accuracy": result["accuracy"], "val_per_type": result["per_type"]})
        if step % args.save_every == 0 or step == args.steps:
            _save_checkpoint(out, model, aux, opt, step, args, flags, history, processor, match)
        elif args.max_minutes and time.time() - t0 > args.max_minutes * 60:
            _save_checkpoint(out, model, aux, opt, step, args, flags, history, processor, match)
            _log(log_path, {"kind": "event", "event": "time_limit", "step": step, "elapsed_s": time.time() - t0})
            break
    taps.remove()
    if attn_tap is not None:
        attn_tap.remove()
    if step == start:  # nothing to do (already at --steps)
        _log(log_path, {"kind": "event", "event": "nothing_to_do", "step": step})
    _log(log_path, {"kind": "event", "event": "end", "step": step, "elapsed_s": time.time() - t0})
    return {"step": step, "history": history}


def main(argv=None) -> int:
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
