"""Running the tiny models in vLLM (in-process engine) and in transformers, with the same strategy.

Also runnable as a script, `python tests/vllm_plugin/engine.py MODEL_DIR FAMILY N_CASES OUT.json`: a vLLM run in its
own process that loads the plugin through its entry point only, with or without VFLOWOPT_VLLM_CONFIG in the
environment (without: stock vLLM, the reference for "budget 1.0 equals stock vLLM").
`python tests/vllm_plugin/engine.py --tp MODEL_DIR FAMILY CASES.json OUT.json`: the cases of CASES.json at
tensor parallelism 2 (two CPU worker processes), the plan switched in every process between cases.
"""

from __future__ import annotations

import functools
import json
import os
import sys

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
MAX_TOKENS = 6


def engine_kwargs() -> dict:
    # No prefix caching and no processor cache: every case must run its own prefill and vision pass.
    return dict(enforce_eager=True, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=1024, dtype="float32",
                seed=0, limit_mm_per_prompt={"image": 1, "video": 0}, enable_prefix_caching=False,
                mm_processor_cache_gb=0)


def make_llm(model_dir: str):
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    from vllm import LLM

    return LLM(model=model_dir, **engine_kwargs())


def vllm_generate(llm, prompt: str, image) -> dict:
    """Greedy tokens, each chosen token's logprob, and the prompt length vLLM reports."""
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0)
    out = llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, params, use_tqdm=False)[0]
    o = out.outputs[0]
    return {"tokens": list(o.token_ids), "prompt_len": len(out.prompt_token_ids),
            "logprobs": [o.logprobs[i][t].logprob for i, t in enumerate(o.token_ids)]}


def hf_generate(model, proc, prompt: str, image, config=None) -> dict:
    """The same on the transformers path (`vflowopt.prune` with `config`, or unpruned)."""
    import torch

    import vflowopt

    batch = proc(text=[prompt], images=[image], return_tensors="pt")
    handle = vflowopt.prune(model, config) if config is not None else None
    try:
        with torch.no_grad():
            g = model.generate(**batch, max_new_tokens=MAX_TOKENS, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
        start = batch["input_ids"].shape[1]
        tokens = g.sequences[0, start:].tolist()
        result = {"tokens": tokens, "prompt_len": start,
                  "logprobs": [torch.log_softmax(lg[0].float(), -1)[t].item() for lg, t in zip(g.logits, tokens)]}
        if handle is not None:
            name, mask = handle.stats.kept.stages[0]
            assert name == "before LLM"
            result["kept"] = mask.reshape(-1).nonzero().squeeze(-1).tolist()
            result["tokens_into_llm"] = handle.stats.tokens_into_llm
        return result
    finally:
        if handle is not None:
            handle.remove()


def same_tokens(vllm_tokens: list[int], hf: dict) -> bool:
    """vLLM runs with `ignore_eos` (always MAX_TOKENS tokens); transformers' generate() stops after an EOS (the
    trained LLaVA answers in one word): the same greedy tokens through the last one transformers made."""
    n = len(hf["tokens"])
    return n >= 1 and vllm_tokens[:n] == hf["tokens"]


def case_image(i: int):
    """A distinct picture per case (so no cache of a previous case can answer), 80x120 like example_image."""
    from vflowopt.tiny import example_image

    return example_image(seed=100 + i)


def _plan(spec: dict):
    from vflowopt import config_for
    from vflowopt.serving.plan import ServingPlan

    return ServingPlan(config_for(spec["method"], budget=spec["budget"], **spec["fields"]))


def _set_plan_in_worker(model, spec: dict) -> None:
    from vflowopt.serving.plan import set_plan

    set_plan(_plan(spec))


def _kept_in_worker(model):
    pruner = model.vflowopt_pruner
    return None if pruner is None else [pruner.last_kept, pruner.last_counts]


def tensor_parallel_run(model_dir: str, family: str, specs: list[dict]) -> list[dict]:
    """Each case {method, budget, fields, size, image} at TP 2: greedy tokens, logprobs, prompt length and
    every rank's kept tokens. The first case's strategy starts the engine through VFLOWOPT_VLLM_CONFIG (so
    every worker process registers the plugin's classes); later cases switch the plan in this process (the
    processor) and in the workers (`apply_model`, which needs VLLM_ALLOW_INSECURE_SERIALIZATION)."""
    import tempfile

    import harness
    from vllm import LLM

    from vflowopt.serving.plan import set_plan

    cpus = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"{cpus[0]}|{cpus[1]}"  # one core per rank (one NUMA node here)
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    strategy = os.path.join(tempfile.mkdtemp(prefix="vflowopt_tp_"), "s.json")
    _plan(specs[0]).config.save(strategy)
    os.environ["VFLOWOPT_VLLM_CONFIG"] = strategy
    _, proc = harness.build(family)
    llm = LLM(model=model_dir, tensor_parallel_size=2, distributed_executor_backend="mp", **engine_kwargs())
    results = []
    for spec in specs:
        set_plan(_plan(spec))
        llm.apply_model(functools.partial(_set_plan_in_worker, spec=spec))
        image = case_image(spec["image"]).resize(tuple(spec["size"]))
        got = vllm_generate(llm, harness.prompt(proc), image)
        got["kept_per_rank"] = llm.apply_model(_kept_in_worker)
        results.append(got)
    return results


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    for key, value in ENGINE_ENV.items():
        os.environ.setdefault(key, value)
    if sys.argv[1] == "--tp":
        model_dir, family, cases_path, out_path = sys.argv[2:6]
        with open(cases_path) as f:
            results = tensor_parallel_run(model_dir, family, json.load(f))
    else:
        model_dir, family, n_cases, out_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
        import harness

        _, proc = harness.build(family)
        llm = make_llm(model_dir)
        results = [vllm_generate(llm, harness.prompt(proc), case_image(i)) for i in range(n_cases)]
    with open(out_path, "w") as f:
        json.dump(results, f)
