"""Decoupled pre-training of the VQA model: the LM and the vision tower learn apart, then are connected.

Why: trained jointly from scratch, the vision side learns within a few hundred steps (dense per-patch
supervision) but the language model's reading of 256 image tokens stays near the answer prior for thousands of
steps (``../shared/reference/tiny-training.md``). Here each half learns on a cheaper, cleaner problem:

``lm``       the language model answers questions about *symbolic* image tokens: each of the 256 patches is the
             sum of learned embeddings of its ground-truth classes (colour, shape, digit, object centre) and of
             its row and column (:class:`SymbolicTokens`), lightly corrupted so the LM tolerates an imperfect
             vision side. No rendering and no vision tower: several times cheaper per step than joint training.
``vision``   the vision tower alone, with the per-patch and CLS heads of :mod:`training.vqa.train`
             (rendered scenes, no LM).
``connect``  the projector is fitted (vision frozen) to map vision features onto the symbolic tokens the LM
             was trained on, and the three parts are saved as one stock LLaVA folder for
             ``python -m training.vqa.train --init DIR`` (joint fine-tuning on real pictures).

Options of ``lm`` that the shipped model uses (off by default; ``docs/vqa.md`` has the measurements):
``--question-first`` (one question per sequence, before the image tokens, so every image token can attend
to it), ``--match-weight`` (a probe on the image tokens' hidden states names the patches the question is
about: dense supervision inside the LM), ``--word-tokens`` / ``--position-words`` (symbolic tokens carry the
LM's own word embeddings of their class names and of left/right/above/below).

``lm`` and ``vision`` are independent and can run side by side (one thread each on a 2-core machine).
Each writes ``OUT/stage.pt`` (weights, optimizer, step, RNG, args: tensors and plain data, read back with
``torch.load(weights_only=True)``) every ``--save-every`` steps, resumes with
``--resume`` (recipe from the checkpoint; recipe flags given explicitly are logged changes), and logs JSON
lines to ``OUT/train.log``. Batches are pure functions of ``(seed, step)``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
from vflowopt.vqa import scenes as S
from vflowopt.vqa.model import build_model, save

GRID = 16
RESUME_KEEP = ("stage", "out", "steps", "resume", "log_every", "save_every", "threads", "max_minutes")
N_TOKENS = GRID * GRID


class SymbolicTokens(nn.Module):
    """Ideal image tokens: sum of embeddings of each patch's classes and grid position.

    With ``word_ids`` (class -> token id of its word, e.g. colour class "red" -> the id of ``red``), the LM's
    word embedding of the class name is added to the learned class embedding (``forward(..., words=the LM's
    input embeddings)``). Why: an image token for a red triangle then already contains the directions of the
    words ``red`` and ``triangle``, so matching it against the question and copying its colour into the
    answer start out as near-identity maps instead of having to be discovered (the untied LM sat at chance
    on colour questions for thousands of steps). With ``position_word_ids`` (ids of left, right, above,
    below) each token also carries ``(1 - c/15) left + (c/15) right + (1 - r/15) above + (r/15) below`` for
    its column ``c`` and row ``r``: comparing two objects' positions becomes a difference of two read-outs
    in the answer words' own directions.
    """

    def __init__(self, dim: int, grid: int = GRID, word_ids: dict[str, list[int]] | None = None,
                 ordered: bool = False, position_word_ids: list[int] | None = None):
        super().__init__()
        self.tables = nn.ModuleDict({key: nn.Embedding(n, dim) for key, n in S.PATCH_CLASSES.items()})
        self.row = nn.Embedding(grid, dim)
        self.col = nn.Embedding(grid, dim)
        self.grid = grid
        for emb in (*self.tables.values(), self.row, self.col):
            nn.init.normal_(emb.weight, 0.0, 1.0 / math.sqrt(dim * 6))  # sum of 6 at norm ~1
        if ordered:  # row / column also start on a linear ramp along two orthogonal directions: comparing two
            # objects' positions (position questions) is then a difference of projections, not a lookup table
            ramp = torch.linspace(-0.5, 0.5, grid)
            axes = torch.linalg.qr(torch.randn(dim, 2)).Q
            with torch.no_grad():
                self.row.weight += ramp[:, None] * axes[:, 0]
                self.col.weight += ramp[:, None] * axes[:, 1]
        if position_word_ids is not None:  # ids of left, right, above, below
            self.register_buffer("position_word_ids", torch.tensor(position_word_ids, dtype=torch.long))
        self.word_keys = tuple(word_ids or ())
        for key, ids in (word_ids or {}).items():  # class 0 ("none") has no word: id -1
            self.register_buffer(f"word_ids_{key}", torch.tensor(ids, dtype=torch.long))

    def forward(self, targets: dict[str, torch.Tensor], words: nn.Embedding | None = None) -> torch.Tensor:
        first = next(iter(targets.values()))
        idx = torch.arange(self.grid * self.grid, device=first.device)
        out = self.row(idx // self.grid) + self.col(idx % self.grid)
        for key, table in self.tables.items():
            out = out + table(targets[key])
        if self.word_keys and words is None:
            raise ValueError("these symbolic tokens include word embeddings: pass words=the LM's input embeddings")
        for key in self.word_keys:
            ids = getattr(self, f"word_ids_{key}")[targets[key]]
            out = out + words(ids.clamp(min=0)) * (ids >= 0).unsqueeze(-1).to(out.dtype)
        if hasattr(self, "position_word_ids"):  # column c: (1 - c/15) "left" + (c/15) "right"; rows likewise
            left, right, above, below = words(self.position_word_ids).unbind(0)
            t = (idx % self.grid).to(out.dtype)[:, None] / (self.grid - 1)
            u = (idx // self.grid).to(out.dtype)[:, None] / (self.grid - 1)
            out = out + (1 - t) * left + t * right + (1 - u) * above + u * below
        return out


def symbolic_from_state(state: dict[str, torch.Tensor], dim: int) -> SymbolicTokens:
    """A :class:`SymbolicTokens` rebuilt from its ``state_dict`` (with its word ids, if it had any)."""
    word_ids = {k[len("word_ids_"):]: v.tolist() for k, v in state.items() if k.startswith("word_ids_")}
    position = state["position_word_ids"].tolist() if "position_word_ids" in state else None
    module = SymbolicTokens(dim, word_ids=word_ids or None, position_word_ids=position)
    module.load_state_dict(state)
    return module


def position_word_ids(tokenizer) -> list[int]:
    vocab = tokenizer.get_vocab()
    return [vocab[w] for w in ("left", "right", "above", "below")]


def class_word_ids(tokenizer) -> dict[str, list[int]]:
    """Per patch class table, the token id of each class's word (-1 for "none")."""
    vocab = tokenizer.get_vocab()
    return {
        "colour": [-1] + [vocab[c] for c in S.COLOURS],
        "shape": [-1] + [vocab[s] for s in S.SHAPES],
        "digit": [-1] + [vocab[str(d)] for d in range(10)],
    }


def corrupt(targets: dict[str, torch.Tensor], p: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Replace each class label of an object or digit patch by a random one with probability ``p``.

    Why: the LM must tolerate an imperfect vision side. Background patches are left alone: flipping their
    labels too (the first version) put ~13 spurious objects and object centres in every picture at p = 0.05,
    which made counting and position questions unlearnable.
    """
    classes = torch.stack(list(targets.values()), dim=-1)
    on_object = (classes != 0).any(-1)
    out = {}
    for key, value in targets.items():
        flip = (torch.rand(value.shape, generator=generator) < p) & on_object
        noise = torch.randint(0, S.PATCH_CLASSES[key], value.shape, generator=generator)
        out[key] = torch.where(flip, noise, value)
    return out


# ----------------------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------------------


def scene_config(args, step: int) -> S.SceneConfig:
    return S.SceneConfig.easy() if step < args.curriculum_frac * args.steps else S.SceneConfig()


def lm_batch(tokenizer, args, step: int, weights) -> dict[str, torch.Tensor]:
    rows = []
    for j in range(args.batch):
        rng = S.scene_rng("train", args.seed, 10_000_000 + step * args.batch + j)
        desc = S.sample_scene(rng, scene_config(args, step))
        qa = S.make_questions(desc, rng, int(rng.integers(args.qa_min, args.qa_max + 1)), S.QUESTION_TYPES, weights)
        targets = S.patch_targets(desc)
        if args.question_first:  # one row per question, the scene repeated
            for item in qa:
                rows.append((*encode_qa(tokenizer, [item], N_TOKENS, question_first=True),
                             {**targets, "referent": S.referents(targets, item)}))
        else:
            rows.append((*encode_qa(tokenizer, qa, N_TOKENS), targets))
    length = max(len(r[0]) for r in rows)
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([r[0] + [pad] * (length - len(r[0])) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r[0]) + [0] * (length - len(r[0])) for r in rows]),
        "labels": torch.tensor([r[1] + [-100] * (length - len(r[1])) for r in rows]),
        "answer_type": torch.tensor([r[2] + [-1] * (length - len(r[2])) for r in rows]),
    }
    for key in (*S.PATCH_CLASSES, *(("referent",) if args.question_first else ())):
        batch[f"patch_{key}"] = torch.from_numpy(np.stack([r[3][key] for r in rows]))
    return batch


def vision_batch(args, step: int) -> dict[str, torch.Tensor]:
    rows = []
    for j in range(args.batch):
        rng = S.scene_rng("train", args.seed, 20_000_000 + step * args.batch + j)
        desc = S.sample_scene(rng, scene_config(args, step))
        rows.append((S.render(desc), S.patch_targets(desc), S.scene_targets(desc)))
    batch = {"pixel_values": torch.stack([pixel_values(r[0]) for r in rows])}
    for key in S.PATCH_CLASSES:
        batch[f"patch_{key}"] = torch.from_numpy(np.stack([r[1][key] for r in rows]))
    for key in ("present", "shape_count", "digit"):
        batch[f"scene_{key}"] = torch.from_numpy(np.stack([np.asarray(r[2][key]) for r in rows]))
    return batch


def targets_of(batch) -> dict[str, torch.Tensor]:
    return {key: batch[f"patch_{key}"] for key in S.PATCH_CLASSES}


# ----------------------------------------------------------------------------------------------------------
# Forward passes
# ----------------------------------------------------------------------------------------------------------


def lm_logits(model, input_ids, attention_mask, image_tokens: torch.Tensor,
              position_ids: torch.Tensor | None = None, tap_layer: int | None = None):
    """Logits of the LLaVA language model with the ``<image>`` positions filled by ``image_tokens``; with
    ``tap_layer``, also the hidden states of the image positions after that many layers, ``(n_image, dim)``."""
    embeds = model.get_input_embeddings()(input_ids)
    mask = input_ids == model.config.image_token_id
    embeds = embeds.masked_scatter(mask[..., None], image_tokens.to(embeds.dtype))
    out = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                     position_ids=position_ids, output_hidden_states=tap_layer is not None)
    logits = model.lm_head(out.last_hidden_state)
    if tap_layer is None:
        return logits
    return logits, out.hidden_states[tap_layer][mask]


def drop_background(batch, tokens: torch.Tensor, image_token_id: int, keep_prob: float,
                    generator: torch.Generator) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Curriculum: drop background image tokens (no class) with probability ``1 - keep_prob``.

    Why: at the start the answer must be found among 256 tokens of which ~95 % are background, and the LM's
    attention stays uniform for thousands of steps; with the background dropped the same circuits are learned
    on ~20 tokens, then the background is brought back gradually. Kept tokens keep their original positions
    (``position_ids``), rows are right-padded. Returns ``(batch, image tokens kept, position_ids)``.
    """
    ids = batch["input_ids"]
    is_image = ids == image_token_id
    classes = torch.stack([batch[f"patch_{k}"] for k in S.PATCH_CLASSES], dim=-1)
    keep_image = (classes != 0).any(-1) | (torch.rand(classes.shape[:2], generator=generator) < keep_prob)
    if "patch_referent" in batch:
        out_referent = batch["patch_referent"][keep_image]
    keep = (~is_image) & (batch["attention_mask"] == 1)
    keep[is_image] = keep_image.flatten()
    rows = [k.nonzero().squeeze(-1) for k in keep]
    length = max(len(r) for r in rows)
    out: dict[str, torch.Tensor] = {}
    fills = {"input_ids": 0, "attention_mask": 0, "labels": -100, "answer_type": -1}
    for key, fill in fills.items():
        value = batch[key]
        out[key] = torch.stack([torch.cat([value[b, r], value.new_full((length - len(r),), fill)])
                                for b, r in enumerate(rows)])
    out["attention_mask"] = torch.stack([torch.cat([torch.ones(len(r), dtype=torch.long),
                                                    torch.zeros(length - len(r), dtype=torch.long)]) for r in rows])
    positions = torch.stack([torch.cat([r, r.new_zeros(length - len(r))]) for r in rows])
    if "patch_referent" in batch:
        out["referent"] = out_referent  # (kept image tokens,), in the order they fill the sequence
    return out, tokens[keep_image], positions


def vision_features(model, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(patch features of the feature layer without CLS, pooled CLS output)``."""
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:], out.pooler_output


def answer_stats(logits, batch) -> tuple[torch.Tensor, dict[str, float]]:
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    pred = logits.argmax(-1)
    types = batch["answer_type"][:, 1:]
    logs = {"answer_loss": float(loss.detach())}
    for k, name in enumerate(S.QUESTION_TYPES):
        m = types == k
        if m.any():
            logs[f"acc_{name}"] = float((pred[m] == labels[m]).float().mean())
    return loss, logs


# ----------------------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------------------


def _log(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}),
          file=sys.stderr, flush=True)


def _modules(stage: str, model, dim_vision: int, dim_text: int, word_ids=None, ordered: bool = False,
             position_ids=None) -> dict[str, nn.Module]:
    if stage == "lm":
        return {"lm": model.model.language_model, "lm_head": model.lm_head,
                "symbolic": SymbolicTokens(dim_text, word_ids=word_ids, ordered=ordered,
                                           position_word_ids=position_ids),
                "match": nn.Linear(dim_text, 3)}
    if stage == "vision":
        return {"vision": model.model.vision_tower, "aux": AuxHeads(dim_vision)}
    return {"projector": model.model.multi_modal_projector}


def run(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "train.log"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    ckpt_path = out / "stage.pt"
    ckpt = None
    if args.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, "--resume")
        changed = restore_recipe(args, ckpt["args"], RESUME_KEEP)  # explicit recipe flags: logged changes
    lm_state = None
    if args.stage == "connect":  # the LM's prompt layout decides the saved processor's chat template
        lm_state = load_checkpoint(Path(args.lm) / "stage.pt", "connect --lm")
        args.question_first = bool(lm_state["args"].get("question_first", False))
    model, processor = build_model(args.preset, seed=args.seed, question_first=args.question_first)
    dim_v, dim_t = model.config.vision_config.hidden_size, model.config.text_config.hidden_size
    if args.match_weight > 0 and not args.question_first:
        raise SystemExit("--match-weight needs --question-first (image tokens see the question only then)")
    if args.match_weight > 0 and not 1 <= args.match_layer <= model.config.text_config.num_hidden_layers:
        raise SystemExit(f"--match-layer {args.match_layer}: the LM has layers 1..."
                         f"{model.config.text_config.num_hidden_layers}")
    word_ids = class_word_ids(processor.tokenizer) if args.word_tokens else None
    pos_ids = position_word_ids(processor.tokenizer) if args.position_words else None
    parts = _modules(args.stage, model, dim_v, dim_t, word_ids, args.ordered_positions, pos_ids)
    symbolic = None
    if args.stage == "connect":
        vis_state = load_checkpoint(Path(args.vision) / "stage.pt", "connect --vision")
        model.model.language_model.load_state_dict(lm_state["parts"]["lm"])
        model.lm_head.load_state_dict(lm_state["parts"]["lm_head"])
        symbolic = symbolic_from_state(lm_state["parts"]["symbolic"], dim_t)
        model.model.vision_tower.load_state_dict(vis_state["parts"]["vision"])
        model.requires_grad_(False)
        model.model.multi_modal_projector.requires_grad_(True)
        symbolic.requires_grad_(False)
    params = list({id(p): p for m in parts.values() for p in m.parameters()}.values())  # lm_head is tied
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.98))
    start = 0
    if ckpt is not None:
        for key, module in parts.items():
            if key not in ckpt["parts"]:  # runs from before the match probe existed have none
                continue
            missing, unexpected = module.load_state_dict(ckpt["parts"][key], strict=False)
            if unexpected or any(not m.startswith(("word_ids_", "position_word_ids")) for m in missing):
                raise SystemExit(f"--resume: {key} does not match the checkpoint (missing {missing}, "
                                 f"unexpected {unexpected})")
        opt.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["step"]
        _log(log_path, {"kind": "event", "event": "resume", "step": start})
        if changed:
            _log(log_path, {"kind": "event", "event": "recipe_change", "step": start, "changed": changed})
    else:
        _log(log_path, {"kind": "event", "event": "start", "args": vars(args)})
    gen = torch.Generator().manual_seed(args.seed)
    weights = parse_type_weights(args.type_weights)
    tokenizer = processor.tokenizer
    t0 = time.time()
    window, acc = time.time(), {}
    step = start
    for m in parts.values():
        m.train()
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = args.lr * warm_cosine(step, 0, args.steps, args.warmup, args.min_lr_frac)
        if args.stage == "lm":
            batch = lm_batch(tokenizer, args, step, weights)
            gen.manual_seed(args.seed * 1_000_003 + step)
            tokens = parts["symbolic"](corrupt(targets_of(batch), args.corrupt, gen), model.get_input_embeddings())
            tokens = tokens + args.noise * tokens.detach().norm(dim=-1, keepdim=True).mean() * torch.randn(
                tokens.shape, generator=gen) / math.sqrt(tokens.shape[-1])
            keep_prob = min(1.0, step / (args.bg_ramp * args.steps)) if args.bg_ramp > 0 else 1.0
            if keep_prob < 1.0:
                batch, tokens, positions = drop_background(batch, tokens, model.config.image_token_id, keep_prob, gen)
            else:
                positions = None
                if args.question_first:
                    batch["referent"] = batch["patch_referent"].flatten()
            tap = args.match_layer if args.match_weight > 0 else None
            out_lm = lm_logits(model, batch["input_ids"], batch["attention_mask"], tokens, positions, tap)
            logits = out_lm[0] if tap is not None else out_lm
            loss, logs = answer_stats(logits, batch)
            if tap is not None:  # dense supervision: which image tokens the question is about
                match_loss, match_logs = match_stats(parts["match"](out_lm[1]), batch["referent"])
                loss = loss + args.match_weight * match_loss
                logs.update(match_logs)
            logs["background_kept"] = keep_prob
        elif args.stage == "vision":
            batch = vision_batch(args, step)
            feats, pooled = vision_features(model, batch["pixel_values"])
            patch_loss, cls_loss, logs = parts["aux"](feats, pooled, batch)
            loss = patch_loss + args.cls_weight * cls_loss
        else:
            batch = vision_batch(args, step)
            with torch.no_grad():
                feats, _ = vision_features(model, batch["pixel_values"])
                target = symbolic(targets_of(batch), model.get_input_embeddings())
            projected = model.model.multi_modal_projector(feats)
            loss = F.mse_loss(projected, target) / target.pow(2).mean()
            logs = {"rel_mse": float(loss.detach())}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        for key, value in logs.items():
            acc.setdefault(key, []).append(value)
        if step % args.log_every == 0 or step == args.steps:
            now = time.time()
            record = {"kind": "train", "stage": args.stage, "step": step, "lr": opt.param_groups[0]["lr"],
                      "steps_per_s": args.log_every / max(1e-9, now - window), "elapsed_s": now - t0,
                      **{k: float(np.mean(v)) for k, v in acc.items()}}
            _log(log_path, record)
            window, acc = now, {}
        done = step == args.steps
        timed_out = args.max_minutes and time.time() - t0 > args.max_minutes * 60
        if step % args.save_every == 0 or done or timed_out:
            state = {"step": step, "parts": {k: m.state_dict() for k, m in parts.items()},
                     "optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "args": vars(args)}
            save_checkpoint(state, ckpt_path)
        if timed_out:
            _log(log_path, {"kind": "event", "event": "time_limit", "step": step})
            break
    if args.stage == "connect":  # the starting point of `python -m training.vqa.train --init OUT`
        save(model, processor, out / "model")
        save_checkpoint(vis_state["parts"]["aux"], out / "aux.pt")
        save_checkpoint(symbolic.state_dict(), out / "symbolic.pt")
        if lm_state["args"].get("match_weight", 0) > 0:  # the match probe, for joint fine-tuning
            save_checkpoint({"state": lm_state["parts"]["match"], "layer": lm_state["args"]["match_layer"]},
                            out / "match.pt")
    _log(log_path, {"kind": "event", "event": "end", "step": step, "elapsed_s": time.time() - t0})
    return {"step": step}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.vqa.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=("lm", "vision", "connect"))
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="base")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--qa-min", type=int, default=7)
    p.add_argument("--qa-max", type=int, default=9)
    p.add_argument("--type-weights", default=DEFAULT_TYPE_WEIGHTS)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-lr-frac", type=float, default=0.05)
    p.add_argument("--curriculum-frac", type=float, default=0.0)
    p.add_argument("--corrupt", type=float, default=0.05,
                   help="lm: label corruption probability per class of an object / digit patch")
    p.add_argument("--noise", type=float, default=0.3, help="lm: gaussian noise relative to the token norm")
    p.add_argument("--bg-ramp", type=float, default=0.0,
                   help="lm: background image tokens are dropped at first and kept with a probability rising "
                        "linearly to 1 over this fraction of the steps (0: always kept)")
    p.add_argument("--question-first", action="store_true",
                   help="lm: one question per sequence, placed before the image tokens (the shipped model's "
                        "prompt layout); --qa-min/--qa-max then count sequences per scene")
    p.add_argument("--word-tokens", action="store_true",
                   help="lm: symbolic image tokens also carry the LM's word embeddings of their colour, shape and "
                        "digit names (see SymbolicTokens)")
    p.add_argument("--position-words", action="store_true",
                   help="lm: symbolic image tokens also carry a column ramp between the word embeddings of 'left' "
                        "and 'right' and a row ramp between 'above' and 'below' (see SymbolicTokens)")
    p.add_argument("--ordered-positions", action="store_true",
                   help="lm: the symbolic row / column embeddings start on a linear ramp (see SymbolicTokens)")
    p.add_argument("--match-weight", type=float, default=0.0,
                   help="lm, question-first: weight of a probe loss on the image tokens' hidden states after "
                        "--match-layer layers, naming the patches the question is about (0: off)")
    p.add_argument("--match-layer", type=int, default=2)
    p.add_argument("--cls-weight", type=float, default=0.5)
    p.add_argument("--lm", help="connect: the lm stage's folder")
    p.add_argument("--vision", help="connect: the vision stage's folder")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--max-minutes", type=float, default=0.0)
    args = p.parse_args(argv)
    args.explicit = explicit_flags(p, argv)
    if args.stage == "connect" and not (args.lm and args.vision):
        p.error("connect needs --lm DIR and --vision DIR")
    return args


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
