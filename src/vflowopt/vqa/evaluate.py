"""Exact-match accuracy of a VQA model under every pruning method and budget.

Usage (``python -m vflowopt eval`` takes the same arguments)::

    vflowopt eval [--model DIR] --methods random,visionzip,... --budgets 1.0,0.5,0.25,0.1
        [--strategy FILE ...] [--n 1000] [--seed 0] [--split test] [--batch-size 32] [--device cpu] [--json OUT]

``--methods all`` (the default) means every registered method (``vflowopt.available_methods()``). Each
(method, budget) uses ``vflowopt.config_for(method, budget=budget)`` and ``vflowopt.prune``; a method that
refuses the budget (``ConfigError`` / ``PruningError`` / ``ValueError`` when configuring, attaching or
running) is recorded with ``"status": "refused"`` and the reason. The unpruned model is always evaluated
first (``full``) and is the reference of ``relative_accuracy``.

Questions: question ``i`` is about scene ``i`` of ``--split`` (default ``test``, disjoint from training)
and has type ``QUESTION_TYPES[i % 5]``, so types are balanced; the same ``(n, seed, split)`` always gives
the same questions. Answers are the greedy first generated token (the answers are one word), compared
exactly with the reference word.

JSON written by ``--json`` (``evaluate()`` returns the same dict)::

    {
      "model": "DIR",                       # as given
      "n": 1000, "seed": 0, "split": "test",
      "question_types": ["exists", "colour", "count", "position", "digit"],
      "questions_per_type": {"exists": 200, ...},
      "full": {"accuracy": 0.93, "per_type": {"exists": 0.95, ...}},
      "results": [
        {"method": "random", "budget": 0.1, "status": "ok",      # or "refused"
         "accuracy": 0.81,                   # overall exact match (null when refused)
         "relative_accuracy": 0.87,          # accuracy / full accuracy (null when refused or full is 0)
         "per_type": {"exists": 0.9, ...},   # exact match per question type (null when refused)
         "visual_tokens_into_llm": 26,       # visual tokens entering the LLM's first layer (last batch)
         "mean_retention": 0.1,              # PruneStats.mean_retention over LLM layers (last batch)
         "reason": null,                     # why it was refused
         "strategy": null,                   # the --strategy file of this row (null: config_for defaults)
         "label": null,                      # the row's label (--strategy LABEL=FILE, e.g. "auto"), or null
         "seconds": 1.2},
        ...
      ],
      "seconds": 42.0
    }
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from . import scenes as S

__all__ = ["answer_questions", "evaluate", "evaluate_full", "make_eval_set"]


def make_eval_set(n: int, seed: int = 0, split: str = "test", types: tuple[str, ...] = S.QUESTION_TYPES):
    """``n`` items ``{"image", "type", "question", "answer", "index"}``, types in rotation."""
    items = []
    for i in range(n):
        qtype = types[i % len(types)]
        for attempt in range(100):
            index = i * 100 + attempt
            rng = S.scene_rng(split, seed, index)
            desc = S.sample_scene(rng)
            qa = S.question_of_type(desc, rng, qtype)
            if qa is not None:
                items.append({"image": S.render(desc), "index": index, **qa})
                break
        else:  # pragma: no cover - every type is supported by a large share of scenes
            raise RuntimeError(f"no scene supports a {qtype!r} question")
    return items


def answer_questions(model, processor, items, batch_size: int = 32) -> list[str]:
    """Greedy one-token answers for ``items`` (batched, left padding)."""
    from ..tiny import build_inputs

    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = build_inputs(processor, [it["image"] for it in chunk], [it["question"] for it in chunk])
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=1, do_sample=False)
        answers += [processor.tokenizer.convert_ids_to_tokens(int(t)) for t in out[:, -1]]
    return answers


def _score(items, answers) -> dict[str, Any]:
    per_type: dict[str, list[bool]] = {}
    for it, ans in zip(items, answers):
        per_type.setdefault(it["type"], []).append(ans == it["answer"])
    total = sum(sum(v) for v in per_type.values())
    return {
        "accuracy": total / max(1, len(items)),
        "per_type": {t: sum(v) / len(v) for t, v in per_type.items()},
    }


def evaluate_full(model, processor, n: int = 250, seed: int = 0, split: str = "val", batch_size: int = 32):
    """Accuracy at full tokens (no pruning) on ``n`` questions; used during training."""
    items = make_eval_set(n, seed, split)
    return {"n": n, **_score(items, answer_questions(model, processor, items, batch_size))}


def evaluate(
    model_dir: str | Path | None = None,
    methods: list[str] | None = None,
    budgets: list[float] = (1.0, 0.5, 0.25, 0.1),
    n: int = 1000,
    seed: int = 0,
    split: str = "test",
    batch_size: int = 32,
    device: str = "cpu",
    model_and_processor=None,
    progress=None,
    strategies: list[str | Path | tuple[str, str | Path]] = (),
) -> dict[str, Any]:
    """Run the benchmark; see the module docstring for the returned (and ``--json``) structure."""
    import vflowopt
    from vflowopt.config import ConfigError
    from vflowopt.errors import PruningError

    from .model import load

    t0 = time.time()
    if model_and_processor is None:
        model, processor = load(model_dir, device=device)
    else:
        model, processor = model_and_processor
    model.eval()
    methods = list(methods) if methods else vflowopt.available_methods()
    items = make_eval_set(n, seed, split)
    full = _score(items, answer_questions(model, processor, items, batch_size))
    results = []
    cells: list[tuple[str, float, Any]] = [(m, float(b), None) for m in methods for b in budgets]
    for item in strategies:  # saved configs (e.g. `vflowopt optimize` output): one row each
        label, path = item if isinstance(item, tuple) else (None, item)
        config = vflowopt.load_config(path)
        cells.append((config.method, float(config.budget), (str(path), config, label)))
    for method, budget, strategy in cells:
        t1 = time.time()
        record: dict[str, Any] = {"method": method, "budget": float(budget), "status": "ok", "accuracy": None,
                                  "relative_accuracy": None, "per_type": None, "visual_tokens_into_llm": None,
                                  "mean_retention": None, "reason": None,
                                  "strategy": strategy[0] if strategy else None,
                                  "label": strategy[2] if strategy else None}
        try:
            config = strategy[1] if strategy else vflowopt.config_for(method, budget=float(budget))
            with vflowopt.pruned(model, config) as handle:
                answers = answer_questions(model, processor, items, batch_size)
                stats = handle.stats
            score = _score(items, answers)
            record.update(score)
            record["relative_accuracy"] = score["accuracy"] / full["accuracy"] if full["accuracy"] else None
            record["visual_tokens_into_llm"] = (
                stats.visual_tokens_per_layer[0] if stats.visual_tokens_per_layer else None
            )
            record["mean_retention"] = stats.mean_retention
        except (ConfigError, PruningError, ValueError, TypeError) as exc:
            record["status"] = "refused"
            record["reason"] = f"{type(exc).__name__}: {exc}"
        record["seconds"] = time.time() - t1
        results.append(record)
        if progress:
            progress(record)
    return {
        "model": str(model_dir) if model_dir is not None else None,
        "n": n,
        "seed": seed,
        "split": split,
        "question_types": list(S.QUESTION_TYPES),
        "questions_per_type": {t: sum(it["type"] == t for it in items) for t in S.QUESTION_TYPES},
        "full": full,
        "results": results,
        "seconds": time.time() - t0,
    }


def _label(record: dict[str, Any]) -> str:
    if record.get("label"):
        return f"{record['label']} ({record['method']})"
    return f"{record['method']}*" if record.get("strategy") else record["method"]


def format_table(result: dict[str, Any]) -> str:
    """A papers-style table: one row per (method, budget), accuracy, relative accuracy and per-type columns."""
    types = result["question_types"]
    head = f"{'method':<20}{'budget':>7}{'acc':>8}{'rel':>8}" + "".join(f"{t[:8]:>9}" for t in types)
    lines = [head, "-" * len(head)]
    full = result["full"]
    lines.append(f"{'full':<20}{1.0:>7.2f}{full['accuracy']:>8.3f}{1.0:>8.3f}"
                 + "".join(f"{full['per_type'].get(t, float('nan')):>9.3f}" for t in types))
    for r in result["results"]:
        if r["status"] != "ok":
            lines.append(f"{_label(r):<20}{r['budget']:>7.2f}   refused: {r['reason'][:60]}")
            continue
        rel = r["relative_accuracy"] if r["relative_accuracy"] is not None else float("nan")
        lines.append(f"{_label(r):<20}{r['budget']:>7.2f}{r['accuracy']:>8.3f}{rel:>8.3f}"
                     + "".join(f"{r['per_type'].get(t, float('nan')):>9.3f}" for t in types))
    if any(r.get("strategy") for r in result["results"]):
        lines.append("* a saved strategy: " + ", ".join(sorted({r["strategy"] for r in result["results"]
                                                                if r.get("strategy")})))
    return "\n".join(lines)
