"""The lmms-eval plugin (vflowopt.integrations.lmms_eval), offline on the CPU.

* The real lmms-eval CLI (a subprocess, `--include_path` task built here from the procedural VQA scenes,
  the shipped model): its accuracy equals `vflowopt.vqa.evaluate` on the same 20 questions, at full tokens
  and pruned (random, 0.25); the pruning statistics reach its output; a pruning failure inside generate()
  exits non-zero without a results table.
* In process: model_args parsing and every refusal (before the model is loaded), the real `llava_hf` chat
  wrapper on the shipped model (per-sample statistics, the loud failure), and the real Qwen2-VL / Qwen2.5-VL /
  Qwen3-VL wrappers' argument handling and generate_until on tiny random models, with their checkpoint
  loading and qwen-vl-utils faked (their AutoProcessor needs torchvision, which does not import beside the
  CPU torch here).

Needs lmms-eval (requirements-lmms-eval.txt says how to install it); skipped without it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

import vflowopt  # noqa: E402
from vflowopt import ConfigError, PruningError  # noqa: E402
from vflowopt.integrations import lmms_eval as plugin  # noqa: E402
from vflowopt.methods.random_prune import RandomMethod  # noqa: E402
from vflowopt.vqa import evaluate as E  # noqa: E402
from vflowopt.vqa import model as M  # noqa: E402

N = 20  # questions in the CLI runs (about 40 s a run)
TASK = "vflowopt_vqa_scenes"
SHIPPED = str(M.shipped_model_path())
LLAVA = "vflowopt_llava_hf"


# -- model_args -> config ---------------------------------------------------------------------------------


def test_the_entry_point_registers_every_wrapper():
    import lmms_eval.models as registry

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.value.startswith("vflowopt.")]
    assert [ep.value for ep in eps] == ["vflowopt.integrations.lmms_eval:manifests"], (
        "vflowopt's lmms_eval.models entry point is not registered: reinstall vflowopt (pip install -e .)")
    ids = {m.model_id: m for m in plugin.manifests()}
    assert set(ids) == {"vflowopt_llava_hf", "vflowopt_qwen2_vl", "vflowopt_qwen2_5_vl", "vflowopt_qwen3_vl"}
    for model_id, spec in plugin.WRAPPERS.items():
        cls = registry.get_model(model_id)
        assert cls is plugin.wrapper_class(model_id) is getattr(plugin, spec.class_name)
        assert issubclass(cls, plugin._lmms_base(cls)) and plugin._lmms_base(cls).__module__.startswith(
            f"lmms_eval.models.{spec.kind}.")
        assert cls.is_simple == (spec.kind == "simple")


def test_model_args_strings_become_the_config_field_types():
    from lmms_eval.utils import simple_parse_args_string

    args = simple_parse_args_string("method=vflowopt,budget=0.25,threshold=30,recycle=false,"
                                    "retention=[0.3,1.0],stage_layers=[2,5],vision_layer=none,calibration=mean")
    config = plugin.build_config(args)
    assert config == vflowopt.config_for("vflowopt", budget=0.25, threshold=30.0, recycle=False,
                                         retention=(0.3, 1.0), stage_layers=(2, 5), vision_layer=None,
                                         calibration="mean")
    # strings as a Python caller may pass them
    assert plugin.build_config({"method": "random", "budget": "0.25", "seed": "3"}) == vflowopt.config_for(
        "random", budget=0.25, seed=3)


def test_no_pruning_args_mean_the_model_unpruned():
    assert plugin.build_config({}) is None
    assert plugin.build_config({"method": "none"}) is None
    with pytest.raises(ConfigError, match="unpruned; drop budget"):
        plugin.build_config({"method": "none", "budget": 0.5})
    assert plugin.build_config({"budget": 0.1}) == vflowopt.VFlowOptConfig(budget=0.1)


def test_an_unknown_method_lists_the_methods():
    with pytest.raises(ConfigError) as info:
        plugin.build_config({"method": "fastvv", "budget": 0.5})
    for name in vflowopt.available_methods():
        assert name in str(info.value)


def test_an_unknown_field_lists_the_accepted_ones():
    with pytest.raises(ConfigError) as info:
        plugin.build_config({"method": "random", "budget": 0.25, "threshold": 30}, wrapper=LLAVA,
                            wrapper_params=("pretrained", "device_map"))
    message = str(info.value)
    assert "unknown model_args ['threshold'] for method 'random'" in message
    assert "method, budget, strategy, positions, seed" in message  # what random accepts
    assert "vflowopt_llava_hf's own model_args: device_map, pretrained" in message


@pytest.mark.parametrize("budget", [1.5, 0, -0.25, "nan", "lots"])
def test_a_budget_outside_0_1_is_refused(budget):
    with pytest.raises(ConfigError, match="budget"):
        plugin.build_config({"method": "random", "budget": budget})


def test_a_strategy_file_with_overrides(tmp_path):
    path = tmp_path / "s.json"
    vflowopt.config_for("random", budget=0.25, seed=3).save(path)
    assert plugin.build_config({"strategy": str(path)}) == vflowopt.config_for("random", budget=0.25, seed=3)
    assert plugin.build_config({"strategy": str(path), "seed": "5"}).seed == 5
    with pytest.raises(ConfigError, match="is a 'random' config"):
        plugin.build_config({"strategy": str(path), "method": "fastv"})
    with pytest.raises(ConfigError, match="not found"):
        plugin.build_config({"strategy": str(tmp_path / "missing.json")})


def test_a_strategy_for_another_family_or_an_uncovered_model_is_refused(tmp_path):
    path = tmp_path / "qwen.json"
    vflowopt.config_for("random", budget=0.25, model_family="qwen2_vl").save(path)
    llava = plugin.WRAPPERS[LLAVA]
    with pytest.raises(ConfigError, match="made for a 'qwen2_vl' model, this checkpoint is 'llava'"):
        plugin.check_model_type(llava, "llava", plugin.build_config({"strategy": str(path)}))
    with pytest.raises(ConfigError, match="this checkpoint is 'qwen2_5_vl'; use --model vflowopt_qwen2_5_vl"):
        plugin.check_model_type(llava, "qwen2_5_vl", None)
    with pytest.raises(ConfigError, match="covers model types qwen3_vl; this checkpoint is 'qwen3_vl_moe'"):
        plugin.check_model_type(plugin.WRAPPERS["vflowopt_qwen3_vl"], "qwen3_vl_moe", None)


def test_device_batch_and_attention_defaults():
    W = plugin.WRAPPERS

    def resolve(model_id, cuda, world=1, pruned=True, **kw):
        return plugin.resolve_wrapper_args(W[model_id], kw, cuda=cuda, world_size=world, pruned=pruned)

    for model_id in W:  # no CUDA: everything on the CPU
        out, _, _ = resolve(model_id, cuda=False)
        assert (out["device"], out["device_map"], out["batch_size"]) == ("cpu", "cpu", 1)
    assert resolve(LLAVA, cuda=True)[0] == {"device": "cuda", "device_map": "cuda", "batch_size": 1}
    assert resolve(LLAVA, cuda=True, device_map="")[0]["device_map"] == "cuda"  # "" is refused by transformers 5
    assert resolve(LLAVA, cuda=True, world=2)[0].get("device_map") is None  # the wrapper's one GPU per process
    assert resolve("vflowopt_qwen2_5_vl", cuda=True)[0]["device_map"] == "auto"  # the wrapper's own default
    assert resolve("vflowopt_qwen3_vl", cuda=True, device="cuda:1")[0]["device_map"] == "auto"
    assert resolve("vflowopt_qwen2_vl", cuda=True)[0]["device_map"] == "cuda"
    assert resolve(LLAVA, cuda=False, device_map="auto")[0]["device_map"] == "auto"  # llava_hf: fine on the CPU
    for model_id in ("vflowopt_qwen2_vl", "vflowopt_qwen2_5_vl", "vflowopt_qwen3_vl"):
        with pytest.raises(ConfigError, match="device_map=auto sends the inputs to 'cuda'"):
            resolve(model_id, cuda=False, device_map="auto")
    with pytest.raises(ConfigError, match="batch_size must be at most 1"):
        resolve(LLAVA, cuda=False, batch_size="2")
    with pytest.raises(ConfigError, match="batch_size must be a whole number, got 'auto'"):
        resolve("vflowopt_qwen2_5_vl", cuda=False, batch_size="auto")
    out, _, notes = resolve("vflowopt_qwen2_5_vl", cuda=False, batch_size="4")
    assert out["batch_size"] == 4 and "same number of visual tokens" in notes[0]
    assert resolve("vflowopt_qwen2_5_vl", cuda=False, batch_size=4, pruned=False)[2] == []
    out, attn, _ = resolve("vflowopt_qwen2_vl", cuda=False, attn_implementation="flash_attention_2")
    assert attn is None and out["use_flash_attention_2"] is True and "attn_implementation" not in out
    out, attn, _ = resolve("vflowopt_qwen2_vl", cuda=False, attn_implementation="eager")
    assert attn == "eager" and "attn_implementation" not in out
    out, attn, _ = resolve("vflowopt_qwen2_5_vl", cuda=False, attn_implementation="eager")
    assert attn is None and out["attn_implementation"] == "eager"  # passed to the wrapper


def test_no_config_field_shadows_a_wrapper_arg():
    for model_id in plugin.WRAPPERS:
        params = set(plugin.wrapper_params(plugin._lmms_base(plugin.wrapper_class(model_id))))
        for method in vflowopt.available_methods():
            assert not params & set(plugin.method_fields(method)), (model_id, method)
        assert not params & set(plugin.PRUNE_ARGS)


def test_stop_run_exits_1_inside_the_lmms_eval_cli_and_raises_elsewhere():
    cli: dict = {"__name__": "lmms_eval.__main__"}
    exec("def cli_evaluate(fn):\n    return fn()\n", cli)
    error = ConfigError("budget must be a number in (0, 1], got 2")
    with pytest.raises(SystemExit) as info:
        cli["cli_evaluate"](lambda: plugin.stop_run(error, "model_args"))
    assert "vflowopt: model_args: ConfigError: budget must be a number in (0, 1]" in str(info.value.code)
    with pytest.raises(ConfigError, match="budget"):
        plugin.stop_run(error, "model_args")


# -- the llava_hf wrapper on the shipped model, in process ------------------------------------------------


@pytest.fixture(scope="module")
def items():
    return E.make_eval_set(N, 0, "test")


@pytest.fixture(scope="module")
def reference(items):
    """`vflowopt eval`'s numbers on the very questions of the task: accuracy and answers, full and pruned."""
    model, processor = M.load(SHIPPED)
    result = E.evaluate(model_and_processor=(model, processor), methods=["random"], budgets=[0.25], n=N)
    assert result["n"] == N and [r["status"] for r in result["results"]] == ["ok"]
    full = E.answer_questions(model, processor, items)
    with vflowopt.pruned(model, vflowopt.config_for("random", budget=0.25)):
        pruned = E.answer_questions(model, processor, items)
    return {"full": {"accuracy": result["full"]["accuracy"], "answers": full},
            "random": {"accuracy": result["results"][0]["accuracy"], "answers": pruned}}


def _messages(doc):
    return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                         {"type": "text", "text": doc["question"]}]}]


def _requests(docs, chat=True, max_new_tokens=1):
    gen = {"max_new_tokens": max_new_tokens, "temperature": 0, "do_sample": False}
    out = []
    for i, doc in enumerate(docs):
        args = ((doc["question"], _messages, dict(gen), i, "t", "test") if chat
                else (doc["question"], dict(gen), lambda d: [d["image"]], i, "t", "test"))
        out.append(Instance("generate_until", args, idx=0, metadata={"task": "t", "doc_id": i, "repeats": 1}))
    return out


def _prompt_tokens(processor, doc):
    text = processor.apply_chat_template(_messages(doc), tokenize=False, add_generation_prompt=True)
    return int(processor(images=[doc["image"]], text=text, return_tensors="pt")["input_ids"].shape[1])


@pytest.fixture
def never_load(monkeypatch):
    """Fail the test if an lmms-eval wrapper starts loading a model (bad input must stop before)."""
    from lmms_eval.models.simple import llava_hf, qwen2_5_vl

    def loaded(*args, **kwargs):
        raise AssertionError("the wrapper started loading the model")

    for module in (llava_hf, qwen2_5_vl):
        monkeypatch.setattr(module.AutoProcessor, "from_pretrained", loaded)
    monkeypatch.setattr(llava_hf.LlavaForConditionalGeneration, "from_pretrained", loaded)
    monkeypatch.setattr(qwen2_5_vl.Qwen2_5_VLForConditionalGeneration, "from_pretrained", loaded)


def test_bad_input_is_refused_before_the_model_is_loaded(tmp_path, never_load):
    cls = plugin.wrapper_class(LLAVA)
    qwen_dir = tmp_path / "qwen"
    from vflowopt.tiny_families import tiny_qwen2_5_vl

    tiny_qwen2_5_vl()[0].config.save_pretrained(qwen_dir)
    strategy = tmp_path / "qwen.json"
    vflowopt.config_for("random", budget=0.25, model_family="qwen2_5_vl").save(strategy)
    cases = [
        ({"method": "fastvv", "budget": 0.5}, "unknown method 'fastvv'; available methods: .*random"),
        ({"method": "random", "budget": 0.5, "threshold": 3}, r"unknown model_args \['threshold'\]"),
        ({"method": "random", "budget": 1.5}, r"budget must be a number in \(0, 1\], got 1.5"),
        ({"strategy": str(strategy)}, "made for a 'qwen2_5_vl' model, this checkpoint is 'llava'"),
        ({"method": "random", "budget": 0.5, "batch_size": 2}, "batch_size must be at most 1"),
        ({"pretrained": str(qwen_dir), "method": "random", "budget": 0.5}, "use --model vflowopt_qwen2_5_vl"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError, match=message):
            cls(**{"pretrained": SHIPPED, **args})
    with pytest.raises(ConfigError, match="device_map=auto sends the inputs to 'cuda'"):
        plugin.wrapper_class("vflowopt_qwen2_5_vl")(pretrained=str(qwen_dir), device_map="auto", budget=0.5)
    with pytest.raises(ConfigError, match="covers model types llava, llava_next, llava_onevision"):
        cls(pretrained=str(qwen_dir))  # unpruned too: the plugin only covers what vflowopt prunes


def test_a_method_that_refuses_the_model_fails_after_loading_before_evaluating():
    # fastv at 0.1 needs more than the shipped model's 8 LLM layers: known only once the model is loaded
    with pytest.raises(ConfigError, match="budget"):
        plugin.wrapper_class(LLAVA)(pretrained=SHIPPED, method="fastv", budget=0.1)


@pytest.fixture(scope="module")
def pruned_llava():
    """lmms-eval's chat llava_hf wrapper through the plugin: the shipped model, random at 0.25."""
    return plugin.wrapper_class(LLAVA)(pretrained=SHIPPED, method="random", budget=0.25)


def test_llava_hf_prunes_the_model_and_reports_per_sample_stats(items, reference, pruned_llava):
    from lmms_eval.models.model_utils import gen_metrics

    lm = pruned_llava
    assert lm.device == torch.device("cpu") and lm.batch_size == 1
    handle = lm.vflowopt_handle
    assert handle.active and vflowopt.api.active_handle(lm.model) is handle
    assert (handle.config.method, handle.config.budget) == ("random", 0.25)
    docs = [{"image": it["image"], "question": it["question"]} for it in items[:5]]
    lm.task_dict = {"t": {"test": docs}}
    gen_metrics.reset_logged_metrics()
    results = lm.generate_until(_requests(docs))
    assert [r.text for r in results] == reference["random"]["answers"][:5]
    for doc, result in zip(docs, results):
        counts = result.token_counts.to_dict()
        prompt = _prompt_tokens(lm._image_processor, doc)
        assert counts == {"input_tokens": prompt - 192, "output_tokens": 1, "prompt_tokens": prompt,
                          "visual_tokens": 256, "visual_tokens_into_llm": 64, "mean_retention": 0.25}
    assert len({r.token_counts.to_dict()["prompt_tokens"] for r in results}) > 1  # the questions differ
    assert "generate" not in lm.model.__dict__  # generate() is the model's own again
    summary = gen_metrics.summarize_logged_metrics()
    assert summary["avg_vflowopt_mean_retention"] == 0.25 and summary["avg_vflowopt_visual_tokens_into_llm"] == 64
    assert summary["total_gen_tokens"] == 5  # the wrapper's own entry is unchanged


def test_llava_hf_unpruned_is_the_model_as_loaded(items, reference):
    lm = plugin.wrapper_class(LLAVA)(pretrained=SHIPPED)
    assert lm.vflowopt_handle is None and vflowopt.api.active_handle(lm.model) is None
    docs = [{"image": it["image"], "question": it["question"]} for it in items[:3]]
    lm.task_dict = {"t": {"test": docs}}
    results = lm.generate_until(_requests(docs))
    assert [r.text for r in results] == reference["full"]["answers"][:3]
    prompt = _prompt_tokens(lm._image_processor, docs[0])
    assert results[0].token_counts.to_dict() == {"input_tokens": prompt, "output_tokens": 1, "prompt_tokens": prompt}


@pytest.mark.parametrize("error", [PruningError("forced pruning failure"), RuntimeError("forced hook bug")])
def test_a_failure_inside_generate_stops_the_run(items, monkeypatch, error, pruned_llava):
    lm = pruned_llava
    docs = [{"image": it["image"], "question": it["question"]} for it in items[:2]]
    lm.task_dict = {"t": {"test": docs}}

    def fail(self, ctx):
        raise error

    monkeypatch.setattr(RandomMethod, "score", fail)
    # lmms-eval's llava_hf would log it and score an empty answer; the plugin lets it through
    with pytest.raises(type(error), match="forced"):
        lm.generate_until(_requests(docs))
    assert "generate" not in lm.model.__dict__


def test_loglikelihood_requests_are_refused_while_pruning(pruned_llava):
    # a pruned forward returns logits for fewer positions than the prompt: likelihood scores would not align
    with pytest.raises(PruningError, match="loglikelihood requests .* cannot be pruned"):
        pruned_llava.loglikelihood([])


# -- the Qwen wrappers: real lmms-eval code, faked checkpoint loading and qwen-vl-utils ---------------------


QWEN = {  # model_id: (tiny builder name, image side giving 16 LLM tokens per image)
    "vflowopt_qwen2_vl": ("tiny_qwen2_vl", 112),
    "vflowopt_qwen2_5_vl": ("tiny_qwen2_5_vl", 112),
    "vflowopt_qwen3_vl": ("tiny_qwen3_vl", 128),
}


def _decode(image):
    if isinstance(image, str) and image.startswith("data:"):
        return Image.open(io.BytesIO(base64.b64decode(image.split(",", 1)[1]))).convert("RGB")
    return image


def _fake_process_vision_info(messages, **kwargs):
    """qwen-vl-utils' process_vision_info for images that are already a multiple of the patch grid."""
    images = [_decode(c["image"]) for conv in messages for turn in conv if isinstance(turn["content"], list)
              for c in turn["content"] if c["type"] == "image"]
    return (images, None, {}) if kwargs.get("return_video_kwargs") else (images, None)


@pytest.fixture
def qwen(monkeypatch, tmp_path):
    """qwen(model_id) -> (plugin class, tiny model, calls): from_pretrained / AutoProcessor / AutoTokenizer of
    the lmms-eval wrapper's module return the tiny model and processor, config.json written for AutoConfig."""
    import importlib

    from vflowopt import tiny_families

    def make(model_id):
        builder, _ = QWEN[model_id]
        model, processor = getattr(tiny_families, builder)()
        path = tmp_path / model_id
        model.config.save_pretrained(path)
        cls = plugin.wrapper_class(model_id)
        calls: dict = {}

        class Loader:
            @staticmethod
            def from_pretrained(pretrained, **kwargs):
                calls["model"] = (pretrained, kwargs)
                return model

        simple = importlib.import_module(f"lmms_eval.models.simple.{model_id.removeprefix('vflowopt_')}")
        for module in {simple, sys.modules[plugin._lmms_base(cls).__module__]}:
            monkeypatch.setattr(module, "process_vision_info", _fake_process_vision_info, raising=False)
            monkeypatch.setattr(module, "_has_qwen_vl", True, raising=False)
        def load_processor(pretrained, **kwargs):
            calls["processor"] = kwargs
            return processor

        monkeypatch.setattr(simple, "AutoProcessor", type("P", (), {"from_pretrained": staticmethod(load_processor)}))
        monkeypatch.setattr(simple, "AutoTokenizer", type("T", (), {"from_pretrained": staticmethod(
            lambda pretrained, **kwargs: processor.tokenizer)}))
        if model_id == "vflowopt_qwen3_vl":
            monkeypatch.setattr(simple, "_resolve_model_class", lambda pretrained, is_moe: (Loader, "dtype"))
        else:
            name = "Qwen2VLForConditionalGeneration" if model_id == "vflowopt_qwen2_vl" else \
                "Qwen2_5_VLForConditionalGeneration"
            monkeypatch.setattr(simple, name, Loader)
        return cls, str(path), model, calls

    return make


QUESTIONS = ["what is it ?", "a much longer question about what the picture shows here ?", "why ?"]


@pytest.mark.parametrize("model_id", list(QWEN))
def test_qwen_wrappers_argument_handling_and_generate(qwen, model_id):
    cls, path, model, calls = qwen(model_id)
    lm = cls(pretrained=path, method="random", budget=0.25, attn_implementation="eager", batch_size="1")
    _, kwargs = calls["model"]
    assert kwargs["device_map"] == "cpu" and lm.device == torch.device("cpu") and lm.batch_size == 1
    if model_id == "vflowopt_qwen2_vl":  # the wrapper only knows a flash-attention flag: set after loading
        assert "attn_implementation" not in kwargs and model.config._attn_implementation == "eager"
    else:
        assert kwargs["attn_implementation"] == "eager"
    assert lm.vflowopt_handle.active and lm.vflowopt_handle._engine.adapter.family == model_id[len("vflowopt_"):]
    side = QWEN[model_id][1]
    docs = [{"image": Image.new("RGB", (side, side), (60 * i, 90, 40)), "question": q} for i, q in enumerate(QUESTIONS)]
    lm.task_dict = {"t": {"test": docs}}
    chat = plugin.WRAPPERS[model_id].kind == "chat"
    results = lm.generate_until(_requests(docs, chat=chat, max_new_tokens=2))
    assert len(results) == 3 and "generate" not in model.__dict__
    if chat:  # the chat wrappers sort requests by context: the counts still land on their own sample
        counts = [r.token_counts.to_dict() for r in results]
        assert [c["visual_tokens"] for c in counts] == [16] * 3
        assert [c["visual_tokens_into_llm"] for c in counts] == [4] * 3
        assert [c["mean_retention"] for c in counts] == [0.25] * 3
        assert [c["prompt_tokens"] - c["input_tokens"] for c in counts] == [12] * 3
        prompts = [c["prompt_tokens"] for c in counts]
        assert prompts[1] > prompts[0] > prompts[2]  # ordered like the questions' lengths
    else:  # the simple qwen2_vl wrapper returns bare strings: no per-sample counts
        assert all(isinstance(r, str) for r in results)


@pytest.mark.parametrize("model_id", ["vflowopt_qwen2_5_vl", "vflowopt_qwen3_vl"])
def test_qwen_batches_prune_same_size_images_and_stop_on_mixed_sizes(qwen, model_id):
    cls, path, model, _ = qwen(model_id)
    lm = cls(pretrained=path, method="random", budget=0.25, batch_size=3)
    side = QWEN[model_id][1]
    docs = [{"image": Image.new("RGB", (side, side), (60 * i, 90, 40)), "question": q} for i, q in enumerate(QUESTIONS)]
    lm.task_dict = {"t": {"test": docs}}
    results = lm.generate_until(_requests(docs, max_new_tokens=2))
    assert [r.token_counts.to_dict()["visual_tokens_into_llm"] for r in results] == [4] * 3
    docs[1]["image"] = Image.new("RGB", (2 * side, side), (0, 0, 0))
    with pytest.raises(PruningError, match="same number of visual tokens|one at a time"):
        lm.generate_until(_requests(docs, max_new_tokens=2))


def test_qwen_wrapper_without_qwen_vl_utils_is_refused_before_loading(qwen, monkeypatch):
    cls, path, _, calls = qwen("vflowopt_qwen2_5_vl")
    monkeypatch.setattr(sys.modules["lmms_eval.models.chat.qwen2_5_vl"], "_has_qwen_vl", False)
    with pytest.raises(ConfigError, match="needs the package qwen-vl-utils"):
        cls(pretrained=path, method="random", budget=0.25)
    assert "model" not in calls


def test_qwen3_wrapper_refuses_a_qwen2_5_checkpoint(qwen):
    _, path, _, calls = qwen("vflowopt_qwen2_5_vl")
    cls3, _, _, calls3 = qwen("vflowopt_qwen3_vl")
    with pytest.raises(ConfigError, match="use --model vflowopt_qwen2_5_vl"):
        cls3(pretrained=path, method="random", budget=0.25)
    assert "model" not in calls3


# -- the lmms-eval CLI on a local task --------------------------------------------------------------------


TASK_YAML = """\
dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {parquet}
task: {task}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 1
  temperature: 0
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
metadata:
  - version: 0.0
"""

TASK_UTILS = """\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]
"""

FORCED_FAILURE = """\
import sys

from vflowopt.errors import PruningError
from vflowopt.methods.random_prune import RandomMethod


def fail(self, ctx):
    raise PruningError("forced failure inside generate()")


RandomMethod.score = fail
sys.argv = ["lmms-eval", *sys.argv[1:]]
from lmms_eval.cli.dispatch import main  # noqa: E402

main()
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, items):
    """The procedural VQA questions as an lmms-eval task: a parquet file (a datasets.Image column) + YAML."""
    import datasets

    root = tmp_path_factory.mktemp("lmms_eval_task")
    features = datasets.Features({"id": datasets.Value("int64"), "image": datasets.Image(),
                                  "question": datasets.Value("string"), "answer": datasets.Value("string"),
                                  "type": datasets.Value("string")})
    table = {"id": list(range(len(items))), "image": [it["image"] for it in items],
             "question": [it["question"] for it in items], "answer": [it["answer"] for it in items],
             "type": [it["type"] for it in items]}
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(root / "test.parquet"))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(parquet=root / "test.parquet", task=TASK))
    (tasks / "utils.py").write_text(TASK_UTILS)
    (root / "forced_failure.py").write_text(FORCED_FAILURE)
    return root


def _lmms_eval_command() -> list[str]:
    script = Path(sys.executable).with_name("lmms-eval")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lmms_eval"]


@pytest.fixture(scope="module")
def cli_runs(task_dir):
    """Three lmms-eval CLI runs side by side: full tokens, random at 0.25, and a forced failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(task_dir / "datasets-cache"), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    common = ["--tasks", TASK, "--include_path", str(task_dir / "tasks"), "--log_samples"]
    runs = {
        "full": _lmms_eval_command() + ["--model", LLAVA, "--model_args", f"pretrained={SHIPPED}"],
        "random": _lmms_eval_command() + ["--model", LLAVA, "--model_args",
                                          f"pretrained={SHIPPED},method=random,budget=0.25"],
        "failure": [sys.executable, str(task_dir / "forced_failure.py"), "--model", LLAVA, "--model_args",
                    f"pretrained={SHIPPED},method=random,budget=0.25"],
    }
    procs = {name: subprocess.Popen(cmd + common + ["--output_path", str(task_dir / "out" / name)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=task_dir)
             for name, cmd in runs.items()}
    out = {}
    for name, proc in procs.items():
        stdout, _ = proc.communicate(timeout=600)
        files = sorted((task_dir / "out" / name).rglob("*"))
        results = [f for f in files if f.name.endswith("_results.json")]
        samples = [f for f in files if f.name.endswith(f"_samples_{TASK}.jsonl")]
        out[name] = {
            "rc": proc.returncode, "stdout": stdout,
            "results": json.loads(results[0].read_text()) if results else None,
            "samples": sorted((json.loads(line) for line in samples[0].read_text().splitlines()),
                              key=lambda s: s["doc_id"]) if samples else None,
        }
    return out


@pytest.mark.parametrize("run", ["full", "random"])
def test_cli_accuracy_equals_vflowopt_eval(cli_runs, reference, items, run):
    result = cli_runs[run]
    assert result["rc"] == 0, result["stdout"][-3000:]
    accuracy = result["results"]["results"][TASK]["exact_match,none"]
    assert accuracy == pytest.approx(reference[run]["accuracy"], abs=1e-9), result["stdout"][-3000:]
    assert [s["filtered_resps"] for s in result["samples"]] == reference[run]["answers"]
    assert [s["target"] for s in result["samples"]] == [it["answer"] for it in items]
    assert f"|{TASK}|none  |     0|exact_match|" in result["stdout"]  # the results table


def test_cli_reports_the_pruning_statistics(cli_runs):
    pruned, full = cli_runs["random"], cli_runs["full"]
    counts = [s["token_counts"][0] for s in pruned["samples"]]
    assert {(c["visual_tokens"], c["visual_tokens_into_llm"], c["mean_retention"]) for c in counts} == {
        (256, 64, 0.25)}
    assert all(c["input_tokens"] == c["prompt_tokens"] - 192 and c["output_tokens"] == 1 for c in counts)
    full_counts = [s["token_counts"][0] for s in full["samples"]]
    assert [c["prompt_tokens"] for c in full_counts] == [c["prompt_tokens"] for c in counts]
    assert all("visual_tokens" not in c and c["input_tokens"] == c["prompt_tokens"] for c in full_counts)
    throughput = pruned["results"]["throughput"]
    assert throughput["avg_vflowopt_mean_retention"] == 0.25
    assert throughput["avg_vflowopt_visual_tokens"] == 256 and throughput["avg_vflowopt_visual_tokens_into_llm"] == 64
    efficiency = pruned["results"]["efficiency"]["overall"]
    assert efficiency["total_input_tokens"] == sum(c["input_tokens"] for c in counts)
    assert "avg_vflowopt_mean_retention" in pruned["stdout"]  # the printed Throughput Summary
    assert "vflowopt: vflowopt_llava_hf random budget=0.25: 20 samples" in pruned["stdout"]  # logged once
    assert pruned["stdout"].count("vflowopt: vflowopt_llava_hf random budget=0.25:") == 1


def test_cli_pruning_failure_exits_non_zero_without_results(cli_runs):
    result = cli_runs["failure"]
    assert result["rc"] == 1, result["stdout"][-3000:]
    assert "PruningError: forced failure inside generate()" in result["stdout"]
    assert "the run stops instead of scoring an empty answer" in result["stdout"]
    assert result["results"] is None and "|exact_match|" not in result["stdout"]
