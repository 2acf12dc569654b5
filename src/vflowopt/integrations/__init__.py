"""Integrations with other tools; each module imports its tool only when that tool is used.

- `vflowopt.integrations.lmms_eval`: an lmms-eval model plugin (entry-point group `lmms_eval.models`),
  pruned LLaVA / Qwen-VL models in `lmms-eval --model vflowopt_... --model_args ...,method=...,budget=...`.
"""
