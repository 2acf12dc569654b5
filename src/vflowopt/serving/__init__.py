"""Serving engines: vflowopt's pre-LLM token selection inside a serving engine (today vLLM).

`plan.py` reads and checks the strategy (no engine import, so the main test suite covers it);
`vllm.py` is the vLLM general plugin (`vllm.general_plugins` entry point, `register()`), importing vLLM
only when vLLM calls it; `vllm_compat.py` holds the workarounds for vLLM/transformers on a CPU-only
machine.
"""
