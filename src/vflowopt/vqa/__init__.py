"""A procedural visual-QA benchmark and a small trained LLaVA on which pruning visibly costs accuracy.

* :mod:`vflowopt.vqa.scenes` - deterministic scenes and one-word questions (Pillow).
* :mod:`vflowopt.vqa.model` - the model (stock ``LlavaForConditionalGeneration`` from config) and processor.
* :mod:`vflowopt.vqa.train` - ``python -m vflowopt.vqa.train --out DIR --steps N [--resume] ...``.
* :mod:`vflowopt.vqa.evaluate` - ``python -m vflowopt.vqa.evaluate --model DIR --methods ... --budgets ...``.

See ``docs/vqa.md``. Importing this package imports no torch / transformers code until a submodule is used.
"""

__all__ = ["evaluate", "model", "scenes", "train"]
