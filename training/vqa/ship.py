"""Package a trained VQA model into the shipped assets: model folder, model card, learning curve, samples.

Usage::

    python -m training.vqa.ship --model RUN/model --eval EVAL.json --log STAGE1/train.log [--log ...]
        --recipe RECIPE.md [--out src/vflowopt/assets/vqa_model] [--samples src/vflowopt/assets/samples]

* copies the Hugging Face folder (weights, config, tokenizer, processor) to ``--out``;
* draws the learning curve of every ``--log`` (answer accuracy per question type against step, and the
  held-out evaluations) to ``--out/learning_curve.png``;
* writes the model card ``--out/README.md``: architecture and size, per-question-type accuracy at full tokens
  and under pruning (from the ``vflowopt eval --json`` result), the training recipe (``--recipe``, written by
  whoever trained it) and the time per stage read from the logs;
* writes ``--samples``: ``--n-samples`` scenes of the ``val`` split (seed ``--sample-seed``), one question each
  with types in rotation, keeping only questions the model answers correctly at full tokens (they are
  demonstrations and a regression test of loading and inference, not a measure of accuracy).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from vflowopt.vqa import scenes as S


def read_log(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def _stage_name(records: list[dict[str, Any]], path: Path) -> str:
    for r in records:
        if r.get("kind") == "event" and r.get("event") == "start":
            args = r.get("args", {})
            if "stage" in args:
                return f"pretrain {args['stage']}"
            return "joint (train.py)" if args.get("init") else "train.py"
    return path.parent.name


def plot_curves(logs: dict[str, list[dict[str, Any]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(name, recs) for name, recs in logs.items()
              if any(r.get("kind") == "train" and _acc_keys(r) for r in recs)]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5 * max(1, len(panels)), 3.6), squeeze=False)
    for ax, (name, recs) in zip(axes[0], panels):
        # a resumed run re-logs the steps after its checkpoint: the later record of a step is the one kept
        train = sorted({r["step"]: r for r in recs if r.get("kind") == "train"}.values(), key=lambda r: r["step"])
        keys = sorted({k for r in train for k in _acc_keys(r)})
        for key in keys:
            pts = [(r["step"], r[key]) for r in train if key in r]
            ax.plot(*zip(*pts), label=key.replace("train_", "").replace("acc_", "acc "), lw=1)
        evals = [(r["step"], r["accuracy"]) for r in recs if r.get("kind") == "eval"]
        if evals:
            ax.plot(*zip(*evals), "ko-", label="held-out (all types)")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("exact match")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _acc_keys(record: dict[str, Any]) -> list[str]:
    return [k for k in record if k.startswith(("acc_", "train_acc_", "patch_acc_"))]


def _stage_times(logs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, int, float]]:
    rows = []
    for name, recs in logs.items():
        steps = max((r.get("step", 0) for r in recs), default=0)
        # elapsed_s restarts at each resume: add the last value of every segment
        total, last = 0.0, 0.0
        for r in recs:
            if r.get("kind") == "event" and r.get("event") == "resume":
                total, last = total + last, 0.0
            if "elapsed_s" in r:
                last = r["elapsed_s"]
        rows.append((name, steps, total + last))
    return rows


def accuracy_table(result: dict[str, Any]) -> str:
    types = result["question_types"]
    head = "| method | budget | accuracy | relative | " + " | ".join(types) + " |"
    lines = [head, "|" + "---|" * (4 + len(types))]
    full = result["full"]
    lines.append(f"| full tokens | 1.0 | {full['accuracy']:.3f} | 1.000 | "
                 + " | ".join(f"{full['per_type'][t]:.3f}" for t in types) + " |")
    for r in result["results"]:
        name = r["method"] + (" (optimized)" if r.get("strategy") else "")
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['budget']:g} | refused | | " + " | ".join("" for _ in types) + " |")
            continue
        lines.append(f"| {name} | {r['budget']:g} | {r['accuracy']:.3f} | {r['relative_accuracy']:.3f} | "
                     + " | ".join(f"{r['per_type'][t]:.3f}" for t in types) + " |")
    return "\n".join(lines)


def write_samples(model, processor, out: Path, n: int, seed: int) -> list[dict[str, Any]]:
    from vflowopt.vqa.evaluate import answer_questions

    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("sample_*.png"):
        old.unlink()
    kept: list[dict[str, Any]] = []
    tried = 0
    for index, desc, qa in S.questions_in_rotation("val", seed):
        if len(kept) == n or tried == 50 * n:
            break
        tried += 1
        image = S.render(desc)
        if answer_questions(model, processor, [{"image": image, **qa}])[0] != qa["answer"]:
            continue
        name = f"sample_{len(kept):02d}.png"
        image.save(out / name)
        kept.append({"image": name, "prompt": qa["question"], "answer": qa["answer"], "type": qa["type"],
                     "scene_index": index})
    (out / "samples.jsonl").write_text("".join(json.dumps(k) + "\n" for k in kept), encoding="utf-8")
    (out / "README.md").write_text(
        "# Shipped sample scenes\n\n"
        f"{len(kept)} procedural scenes of the VQA benchmark (`vflowopt.vqa.scenes`, split `val`, seed {seed}, "
        "224 x 224) and one question each (types in rotation), in `samples.jsonl` as "
        '`{"image", "prompt", "answer", "type", "scene_index"}`. Written by `python -m training.vqa.ship`, which '
        f"tried scenes in order and kept the first {len(kept)} questions the shipped model answers correctly at "
        f"full tokens ({len(kept)} of {tried} tried): they demonstrate `vflowopt run` and serve as a regression "
        "test, not as a measure of accuracy (see `../vqa_model/README.md`). `vflowopt run` uses the first one "
        "when no --image is given; `vflowopt optimize` uses them when no --data is given. Generated by the "
        "project; no licence restrictions.\n",
        encoding="utf-8",
    )
    return kept


def prompt_format(processor) -> str:
    """The processor's chat template rendered for one picture and a placeholder question."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "{question}"}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def write_card(out: Path, model, result: dict[str, Any], logs, recipe: str, n_samples: int, processor) -> str:
    from vflowopt.vqa.model import QUESTION_FIRST_TEMPLATE, num_parameters

    cfg = model.config
    v, t = cfg.vision_config, cfg.text_config
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    full = result["full"]
    times = _stage_times(logs)
    total_s = sum(s for _, _, s in times)
    prompt = prompt_format(processor).replace(chr(10), "\\n")
    question_first_note = (
        " The question comes *before* the picture, so every image token can attend to it: trained on this layout,"
        " the small LM was trained to mark the image tokens a question is about in its first layers (a"
        " training-only probe at layer 2); with the word-tied symbolic tokens of the LM stage this is what"
        " moved position questions off chance within CPU hours (docs/vqa.md). Pruning"
        " methods see a normal LLaVA prompt; text-guided ones that read only the text *after* the image"
        " (SparseVLM's raters) find just `ASSISTANT:` there."
        if processor.chat_template == QUESTION_FIRST_TEMPLATE else "")
    stage_rows = "\n".join(f"| {name} | {steps} | {secs / 60:.1f} |" for name, steps, secs in times)
    card = f"""# vqa-llava: a small LLaVA trained on vflowopt's procedural visual-QA scenes

A stock `LlavaForConditionalGeneration` (transformers 5.x, `from_pretrained` offline), trained from scratch by
the vflowopt project so that accuracy under visual-token pruning can be measured on a machine without
downloads. It answers one-word questions about the scenes of `vflowopt.vqa.scenes` and nothing else.

## Architecture ({num_parameters(model) / 1e6:.2f} M parameters, {size_mb:.1f} MB fp32 safetensors)

- Vision: CLIP vision encoder, {v.image_size} px, patch {v.patch_size} -> {(v.image_size // v.patch_size) ** 2}
  patch tokens + CLS; {v.num_hidden_layers} layers, width {v.hidden_size}, {v.num_attention_heads} heads. The LLM
  receives the {(v.image_size // v.patch_size) ** 2} patch tokens of the last layer
  (`vision_feature_select_strategy="default"`). The CLS token was trained (an auxiliary head on the pooled
  output predicted the objects present, counts per shape and the digit), so CLS-attention methods read a
  real signal.
- Projector: LLaVA's 2-layer MLP.
- Language model: Qwen2, {t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads
  ({t.num_key_value_heads} KV heads), word-level vocabulary of {t.vocab_size} words.
- Prompt (the processor's chat template): `{prompt}`, the `<image>`
  placeholder expanded to the patch tokens; the answer is the first generated token.{question_first_note}

## Accuracy ({result['n']} questions of the `{result['split']}` split, seed {result['seed']}, types balanced)

Exact match at full tokens: **{full['accuracy']:.3f}**. Per question type and under pruning
(`vflowopt eval --n {result['n']} --json ...`; "relative" = accuracy / full-token accuracy):

{accuracy_table(result)}

Question types: `exists` (yes/no, half hard negatives), `colour` (of a shape present once), `count` (of a
shape or a colour, zero..seven), `position` (left/right or above/below of two objects), `digit` (a small
rendered digit). Chance / answer-prior levels: exists 0.5, colour 0.125, digit 0.1.

## Learning curve

![learning curve](learning_curve.png)

Training accuracy per question type (mean over each logging window) for every stage that answers
questions, per-patch classification accuracy for the vision stage, and the held-out evaluations where the
stage ran them.

## How it was trained

The training scripts are maintainer tools in the vflowopt repository's `training/vqa/` (not installed with
the package); run them from a clone's root as `python -m training.vqa.<script>`.

{recipe.strip()}

| stage | steps | minutes |
|---|---|---|
{stage_rows}

Sum over stages: {total_s / 60:.0f} minutes (minutes = wall clock of each stage from its log, resumed
segments added; stages that ran side by side each count in full).

## Files

`model.safetensors`, `config.json`, `generation_config.json`, the tokenizer and processor files
(`LlavaProcessor` around `LlavaImageProcessorPil`; no torchvision needed), `learning_curve.png` and this
card. {n_samples} sample scenes with questions it answers correctly live in `../samples/`.
"""
    (out / "README.md").write_text(card, encoding="utf-8")
    return card


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.vqa.ship", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="trained model folder (OUT/model)")
    p.add_argument("--eval", required=True, help="`vflowopt eval --json` result for this model")
    p.add_argument("--log", action="append", default=[], help="a training log (repeatable, in stage order)")
    p.add_argument("--recipe", required=True, help="markdown file: how the model was trained")
    p.add_argument("--out", default="src/vflowopt/assets/vqa_model")
    p.add_argument("--samples", default="src/vflowopt/assets/samples")
    p.add_argument("--n-samples", type=int, default=12)
    p.add_argument("--sample-seed", type=int, default=7)
    args = p.parse_args(argv)

    from vflowopt.vqa.model import load

    src, out = Path(args.model), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in src.iterdir():  # weights, config, tokenizer and processor files, whatever their names
        if path.is_file():
            shutil.copy2(path, out / path.name)
    logs = {}
    for path in map(Path, args.log):
        records = read_log(path)
        logs[_stage_name(records, path)] = records
    plot_curves(logs, out / "learning_curve.png")
    model, processor = load(out)
    kept = write_samples(model, processor, Path(args.samples), args.n_samples, args.sample_seed)
    result = json.loads(Path(args.eval).read_text(encoding="utf-8"))
    write_card(out, model, result, logs, Path(args.recipe).read_text(encoding="utf-8"), len(kept), processor)
    print(f"wrote {out} and {len(kept)} samples in {args.samples}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
