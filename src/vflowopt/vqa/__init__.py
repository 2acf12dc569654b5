"""A procedural visual-QA benchmark and a small trained LLaVA on which pruning visibly costs accuracy.

* :mod:`vflowopt.vqa.scenes` - deterministic scenes and one-word questions (Pillow).
* :mod:`vflowopt.vqa.model` - the model (stock ``LlavaForConditionalGeneration`` from config), its processor and
  the shipped model's loader.
* :mod:`vflowopt.vqa.evaluate` - ``vflowopt eval`` / ``python -m vflowopt eval --model DIR --methods ...``.

The scripts that trained and shipped the model are maintainer tools in the repository's ``training/vqa/``
(not installed). See ``docs/vqa.md``. Importing this package imports no torch / transformers code until a
submodule is used.
"""

__all__ = ["evaluate", "model", "scenes"]
