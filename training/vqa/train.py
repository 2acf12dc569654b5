"""Train the VQA benchmark model from scratch (CPU or GPU), reproducibly and resumably.

Usage::

    python -m training.vqa.train --out runs/vqa --steps 20000 [--resume] [--device cpu|cuda] [--seed 0]
        [--log FILE] [--batch 16] [--preset base] [--workers 0] [--threads N] ...

Outputs in ``--out``:

* ``checkpoint.pt`` - everything needed to resume: model + auxiliary heads, optimizer, step, RNG states,
  the arguments, the stage flags and the learning-curve history (written atomically every
  ``--save-every`` steps and at the end). Tensors and plain data only (the RNG states of Python and numpy as
  lists / dicts of ints): it is read back with ``torch.load(weights_only=True)``
  (:func:`training.vqa.common.load_checkpoint`), like every other checkpoint these scripts read.
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
  :mod:`training.vqa.attn_supervision`).

The auxiliary heads are not part of the saved model.
"""

from __future__ import annotations

import argparse
import json
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

from training.vqa.attn_supervision import AttentionTap, attention_loss
from training.vqa.common import (
    DEFAULT_TYPE_WEIGHTS,
    AuxHeads,
    encode_qa,
    explicit_flags,
    load_checkpoint,
    match_stats,
    parse_type_weights,
    pixel_values,
    restore_recipe,
    save_checkpoint,
    warm_cosine,
)
from training.vqa.pretrain import symbolic_from_state
from vflowopt.vqa import scenes as S
from vflowopt.vqa.model import QUESTION_FIRST_TEMPLATE, build_model, load, num_parameters, rescale_projector, save

# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


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
# Hooks (training only)
# ----------------------------------------------------------------------------------------------------------


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
    p = argparse.ArgumentParser(prog="python -m training.vqa.train", description=__doc__.split("\n\n")[0])
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
                   help="start from a `python -m training.vqa.pretrain connect` folder (model/, aux.pt, "
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
                        "(training.vqa.attn_supervision; 0: off)")
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


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def _rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain data (readable with ``weights_only=True``): torch's (and CUDA's)
    as their uint8 tensors, Python's ``random`` as ``[version, [625 ints], gauss]``, numpy's global generator as
    its ``bit_generator`` state dict with the key as a list of ints."""
    version, internal, gauss = random.getstate()
    legacy = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(internal), gauss],
        "numpy": {"bit_generator": str(legacy["bit_generator"]),
                  "state": {"key": legacy["state"]["key"].tolist(), "pos": int(legacy["state"]["pos"])},
                  "has_gauss": int(legacy["has_gauss"]), "gauss": float(legacy["gauss"])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state({**numpy_state, "state": {**numpy_state["state"],
                                                  "key": np.asarray(numpy_state["state"]["key"], dtype=np.uint32)}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, model, aux, opt, step: int, args, flags, history, processor, match=None) -> None:
    """``OUT/checkpoint.pt`` (tensors and plain data: ``torch.load(weights_only=True)`` reads it) and ``OUT/model``."""
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
    save_checkpoint(state, out / "checkpoint.pt")
    save(model, processor, out / "model")


def _init_layout(folder: Path) -> bool:
    """Whether the ``connect`` folder's processor puts the question before the picture."""
    from transformers import AutoProcessor

    if not (folder / "model" / "config.json").is_file():
        return False  # _load_init says what is missing
    processor = AutoProcessor.from_pretrained(str(folder / "model"), local_files_only=True)
    return processor.chat_template == QUESTION_FIRST_TEMPLATE


def _load_init(folder: Path, model, aux) -> nn.Module | None:
    """Weights from a ``pretrain connect`` folder; returns its symbolic-token module (or ``None``)."""
    if not (folder / "model" / "config.json").is_file():
        raise SystemExit(f"--init: no {folder / 'model'} (expected a `python -m training.vqa.pretrain connect` "
                         "folder)")
    model.load_state_dict(load(folder / "model")[0].state_dict())
    if (folder / "aux.pt").is_file():
        aux.load_state_dict(load_checkpoint(folder / "aux.pt", "--init"))
    if not (folder / "symbolic.pt").is_file():
        return None
    symbolic = symbolic_from_state(load_checkpoint(folder / "symbolic.pt", "--init"),
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
        ckpt = load_checkpoint(path, "--resume")
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
        saved = load_checkpoint(Path(args.init) / "match.pt", "--init")
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
            from vflowopt.vqa.evaluate import evaluate_full

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
