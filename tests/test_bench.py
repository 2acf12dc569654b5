"""`vflowopt bench` and `vflowopt.bench.run_bench`: FLOPs, KV bytes, fidelity, outputs, CLI, errors."""

from __future__ import annotations

import csv
import functools
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vflowopt
from vflowopt.bench import BenchRecord, prefill_flops, run_bench
from vflowopt.bench.fidelity import cosine, next_token_kl, token_agreement
from vflowopt.bench.flops import qwen_vision_flops, qwen_vision_segments
from vflowopt.bench.memory import PeakMemory, kv_cache_bytes
from vflowopt.bench.realmodels import REAL_MODELS, load_real_config, offline_processor
from vflowopt.bench.report import CSV_FIELDS, SCHEMA_VERSION, bench_meta, to_json, write_csv, write_json
from vflowopt.bench.run import _VisionCensus
from vflowopt.cli import main
from vflowopt.tiny import build_inputs, example_image
from vflowopt.tiny_families import tiny_llava_next, tiny_qwen2_5_vl, tiny_qwen2_vl, tiny_qwen3_vl

REQUIRED = ("method", "budget", "prefill_flops", "kv_cache_bytes", "prefill_ms", "e2e_ms", "peak_memory_bytes",
            "pruning_overhead_ms", "mean_retention", "tokens_into_llm", "cosine", "kl", "token_agreement")


def _counted(fn) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@functools.cache
def _eager(family: str):
    builders = {"llava_next": tiny_llava_next, "qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl,
                "qwen3_vl": tiny_qwen3_vl}
    return builders[family](attn_implementation="eager")


def _two_images(processor):
    return build_inputs(processor, [example_image(seed=0, size=(80, 120)), example_image(seed=1, size=(120, 90))],
                        ["What is in the image?"])


# ---------------------------------------------------------------------------------------------------
# Analytic FLOPs against torch's flop counter (eager attention)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_vision_flops_match_flop_counter(family):
    model, processor = _eager(family)
    inputs = _two_images(processor)
    grid = inputs["image_grid_thw"]
    counted = _counted(lambda: model.model.visual(inputs["pixel_values"], grid_thw=grid))
    assert counted == qwen_vision_flops(model.config.vision_config, grid)


def test_qwen2_5_windows_partition_the_patches():
    vc = _eager("qwen2_5_vl")[0].config.vision_config
    grid = [[1, 10, 14], [2, 8, 8]]
    for layer in range(vc.depth):
        assert sum(qwen_vision_segments(vc, grid, layer)) == 10 * 14 + 2 * 64
    windowed = [i for i in range(vc.depth) if i not in vc.fullatt_block_indexes]
    assert len(qwen_vision_segments(vc, grid, windowed[0])) > 3


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("budget", [None, 0.25])
def test_whole_prefill_flops_match_flop_counter(family, budget):
    """Vision + projector/merger + LLM at the kept per-layer counts (+ the ViT scoring VFlowOpt recomputes)."""
    model, processor = _eager(family)
    inputs = _two_images(processor) if family != "llava_next" else build_inputs(
        processor, [example_image(seed=0)], ["What is in the image?"])
    census = _VisionCensus(model)
    try:
        if budget is None:
            counted = _counted(lambda: model(**inputs, logits_to_keep=1))
            kv = [int(inputs["input_ids"].shape[1])] * model.config.text_config.num_hidden_layers
            layer = None
        else:
            with vflowopt.pruned(model, vflowopt.VFlowOptConfig(budget=budget)) as handle:
                counted = _counted(lambda: model(**inputs, logits_to_keep=1))
                kv = list(handle.stats.kv_tokens_per_layer)
                layer = handle._engine.method.vision_attention_layer
            assert max(kv) < inputs["input_ids"].shape[1]
    finally:
        census.remove()
    assert counted == prefill_flops(model.config, census.work, kv, scoring_vision_layer=layer)["total"]


# ---------------------------------------------------------------------------------------------------
# run_bench on the tiny model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def bench_records(make_model):
    model, processor = make_model("llava_onevision")
    inputs = build_inputs(processor, [example_image(seed=0)], ["What is in the image?"])
    seen: list[BenchRecord] = []
    records = run_bench(model, inputs, ["vflowopt"], [1.0, 0.25], new_tokens=3, repeats=2, warmup=0,
                        random_weights=True, on_record=seen.append)
    return model, inputs, records, seen


def test_run_bench_records(bench_records):
    model, inputs, records, seen = bench_records
    assert [(r.method, r.budget) for r in records] == [("unpruned", 1.0), ("vflowopt", 1.0), ("vflowopt", 0.25)]
    assert seen == records
    assert not vflowopt.api.active_handle(model), "run_bench must remove its pruning"
    ref, full, quarter = records
    for r in records:
        assert r.error is None and not r.fidelity_meaningful
        assert r.prefill_ms > 0 and r.e2e_ms > 0 and r.pruning_overhead_ms >= 0
        assert r.prefill_ms_min <= r.prefill_ms <= r.prefill_ms_max and len(r.prefill_ms_runs) == 2
        assert r.e2e_ms_min <= r.e2e_ms <= r.e2e_ms_max and len(r.e2e_ms_runs) == 2
        assert r.peak_memory_bytes > 0 and r.new_tokens == 3
    # budget 1.0 keeps everything: same outputs as the unpruned model
    assert full.cosine == pytest.approx(1.0, abs=1e-5) and full.token_agreement == 1.0
    assert full.kl == pytest.approx(0.0, abs=1e-6)
    assert full.kv_cache_bytes == ref.kv_cache_bytes and full.tokens_into_llm == ref.tokens_into_llm
    assert full.prefill_flops > ref.prefill_flops == full.prefill_flops - full.scoring_flops
    assert quarter.mean_retention == pytest.approx(0.25, abs=0.05)
    assert quarter.flops_ratio < 1 and quarter.kv_cache_bytes < full.kv_cache_bytes
    assert quarter.tokens_into_llm < ref.tokens_into_llm and -1 <= quarter.cosine <= 1 and quarter.kl >= 0


def test_kv_bytes_equal_the_cache_sizes(bench_records):
    model, inputs, records, _ = bench_records
    text = model.config.text_config
    per_token = 2 * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 4  # k+v, fp32
    for r in records:
        assert r.kv_cache_bytes_per_layer == [per_token * n for n in r.kv_tokens_per_layer]
        assert r.kv_cache_bytes == sum(r.kv_cache_bytes_per_layer)


def test_kv_bytes_are_dtype_aware(make_model):
    model, processor = make_model("llava_onevision")
    inputs = build_inputs(processor, [example_image(seed=0)], ["What is in the image?"])
    with torch.inference_mode():
        cache = model(**inputs, use_cache=True, logits_to_keep=1).past_key_values
    sizes = kv_cache_bytes(cache)
    assert sizes == [layer.keys.nbytes + layer.values.nbytes for layer in cache.layers]
    half = [(layer.keys.half(), layer.values.half()) for layer in cache.layers]
    assert kv_cache_bytes(half) == [s // 2 for s in sizes]


def test_one_cell_out_of_memory_is_recorded_and_the_rest_go_on(make_model, monkeypatch):
    from vflowopt.bench import run as bench_run

    model, processor = make_model("llava_onevision")
    inputs = build_inputs(processor, [example_image(seed=0)], ["What is in the image?"])
    original = bench_run._Runner.measure

    def measure(self, record, handle=None):
        if record.budget == 0.5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, record, handle)

    monkeypatch.setattr(bench_run._Runner, "measure", measure)
    records = run_bench(model, inputs, ["vflowopt"], [0.5, 0.25], new_tokens=1, repeats=1, warmup=0)
    assert records[1].error.startswith("out of memory") and records[1].prefill_ms is None
    assert records[2].error is None and records[2].prefill_ms > 0
    assert not vflowopt.api.active_handle(model)


def test_bad_grid_is_refused_before_any_run(make_model):
    model, processor = make_model("llava_onevision")
    inputs = build_inputs(processor, [example_image(seed=0)], ["hi"])
    with pytest.raises(vflowopt.ConfigError, match="available methods"):
        run_bench(model, inputs, ["nope"], [0.5])
    with pytest.raises(vflowopt.ConfigError, match=r"\(0, 1\]"):
        run_bench(model, inputs, ["vflowopt"], [1.5])


def test_fidelity_metrics():
    a = torch.tensor([1.0, 2.0, 3.0])
    assert cosine(a, 2 * a) == pytest.approx(1.0)
    assert next_token_kl(a, a) == 0.0
    p = torch.log_softmax(a, 0).exp()
    q = torch.softmax(torch.tensor([3.0, 2.0, 1.0]), 0)
    assert next_token_kl(a, torch.tensor([3.0, 2.0, 1.0])) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-5)
    assert token_agreement([1, 2, 3, 4], [1, 2, 5, 4]) == 0.75
    assert token_agreement([1, 2, 3, 4], [1, 2]) == 0.5


def test_peak_memory_is_positive():
    with PeakMemory("cpu") as pm:
        x = torch.ones(1 << 20)
    assert pm.peak_bytes > x.nbytes and pm.method


# ---------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------


def test_json_schema_and_csv(bench_records, tmp_path):
    model, inputs, records, _ = bench_records
    meta = bench_meta(model, model_name="tiny", device="cpu", random_weights=True, new_tokens=3, repeats=2,
                      warmup=0)
    doc = to_json(records, meta)
    assert doc["schema_version"] == SCHEMA_VERSION == 1 and doc["kind"] == "vflowopt-bench"
    for key in ("model", "device", "dtype", "machine", "versions", "flops_convention", "kl_definition",
                "peak_memory_method", "random_weights", "fidelity_meaningful", "fidelity_note"):
        assert key in doc["meta"]
    assert doc["meta"]["dtype"] == "float32" and doc["meta"]["fidelity_meaningful"] is False
    assert "2 x multiply-adds" in doc["meta"]["flops_convention"]
    assert {"torch", "transformers", "vflowopt"} <= set(doc["meta"]["versions"])
    for rec in doc["records"]:
        assert set(REQUIRED) <= set(rec) and rec["fidelity_meaningful"] is False and rec["error"] is None
    json.dumps(doc, allow_nan=False)
    write_json(tmp_path / "b.json", records, meta)
    assert json.loads((tmp_path / "b.json").read_text()) == json.loads(json.dumps(doc))
    write_csv(tmp_path / "b.csv", records, meta)
    rows = list(csv.DictReader((tmp_path / "b.csv").open()))
    assert len(rows) == 3 and tuple(rows[0]) == CSV_FIELDS and rows[1]["fidelity_meaningful"] == "False"


# ---------------------------------------------------------------------------------------------------
# Shipped real architectures (configs and offline processors only; nothing 7B is built here)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, side, visual", [("llava-1.5-7b", 336, 576), ("llava-onevision-7b", 384, 1485),
                                                ("qwen2-vl-7b", 448, 256), ("qwen2.5-vl-7b", 448, 256),
                                                ("llava-next-7b", 336, None), ("llava-onevision-0.5b", 384, 1485)])
def test_real_architectures_offline(name, side, visual):
    assert name in REAL_MODELS
    config = load_real_config(name)
    assert config.get_text_config().num_hidden_layers in (24, 28, 32)
    processor = offline_processor(config, name)
    inputs = build_inputs(processor, [example_image(size=(side, side))], ["What is in the image?"])
    n = int((inputs["input_ids"] == config.image_token_id).sum())
    if visual is not None:
        assert n == visual
    else:
        assert n > 576


# ---------------------------------------------------------------------------------------------------
# CLI, in process
# ---------------------------------------------------------------------------------------------------


def _save_tiny(make_model, path, weights: bool = True):
    model, processor = make_model("llava_onevision")
    if not weights:
        model.config.save_pretrained(path)
        return
    model.save_pretrained(path)
    processor.image_processor.save_pretrained(path)
    processor.tokenizer.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor", "num_image_tokens": processor.num_image_tokens,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "vision_aspect_ratio": processor.vision_aspect_ratio, "chat_template": processor.chat_template,
    }))


def test_cli_end_to_end_on_a_saved_model(capsys, tmp_path, make_model):
    model_dir = tmp_path / "model"
    _save_tiny(make_model, model_dir)
    out = tmp_path / "out"
    code = main(["bench", "--model", str(model_dir), "--methods", "vflowopt", "--budgets", "1.0,0.25",
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--json", str(out / "b.json"),
                 "--csv", str(out / "b.csv"), "--plot", str(out / "b.png")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "RANDOM WEIGHTS" not in captured.out and "vflowopt bench" in captured.out
    doc = json.loads((out / "b.json").read_text())
    assert doc["meta"]["random_weights"] is False and doc["meta"]["model"] == str(model_dir)
    assert [(r["method"], r["budget"]) for r in doc["records"]] == [("unpruned", 1.0), ("vflowopt", 1.0),
                                                                    ("vflowopt", 0.25)]
    assert doc["records"][1]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert len(list(csv.DictReader((out / "b.csv").open()))) == 3
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_config_only_directory_needs_allow_random(capsys, tmp_path, make_model):
    model_dir = tmp_path / "cfg"
    _save_tiny(make_model, model_dir, weights=False)
    assert main(["bench", "--model", str(model_dir), "--methods", "vflowopt"]) == 2
    err = capsys.readouterr().err
    assert "--allow-random" in err and len(err.strip().splitlines()) == 1
    out = tmp_path / "b.json"
    code = main(["bench", "--model", str(model_dir), "--allow-random", "--methods", "vflowopt", "--budgets", "0.5",
                 "--repeats", "1", "--warmup", "0", "--new-tokens", "1", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "RANDOM WEIGHTS" in captured.out
    doc = json.loads(out.read_text())
    assert doc["meta"]["fidelity_meaningful"] is False
    assert all(r["fidelity_meaningful"] is False for r in doc["records"])


@pytest.mark.parametrize("args, message", [
    (["--methods", "vflowopt,nope"], "available methods"),
    (["--budgets", "0.5,1.5"], "(0, 1]"),
    (["--budgets", "0"], "(0, 1]"),
    (["--budgets", "half"], "(0, 1]"),
    (["--model", "/definitely/not/a/model/dir"], "no hub downloads"),
    (["--images", "/no/such/image.png"], "image file not found"),
])
def test_cli_errors_exit_2_with_one_line(capsys, args, message):
    code = main(["bench", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no CUDA")
def test_cli_cuda_without_cuda(capsys):
    assert main(["bench", "--device", "cuda", "--methods", "vflowopt"]) == 2
    assert "no CUDA" in capsys.readouterr().err


def test_a_named_architecture_that_does_not_fit_in_memory_is_refused_before_building(capsys, monkeypatch):
    """On a Linux CPU an allocation that does not fit is not an error (the kernel kills the process): the
    weights' size is checked against the memory available first (counted on the meta device)."""
    import vflowopt.bench.memory

    monkeypatch.setattr(vflowopt.bench.memory, "available_bytes", lambda device="cpu": 2**30)
    code = main(["bench", "--model", "llava-onevision-0.5b", "--methods", "random", "--budgets", "0.5"])
    err = capsys.readouterr().err
    assert code == 2 and "needs 3.3 GiB for its 0.89 B parameters in float32" in err and "1.0 GiB available" in err
    assert "Traceback" not in err
