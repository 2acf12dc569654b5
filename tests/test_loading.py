"""Loading --model (local directory or hub id, read offline from a hub-layout cache the test writes), the
loading options (--dtype, --device, --device-map, --attn-implementation, --revision), and the bad inputs a
newcomer hits: each one line on stderr, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vflowopt
from vflowopt.cli import main
from vflowopt.cli.common import _load_image, _load_model, _model_folder

PROMPT = "What is in the image?"
REPO = "vflowopt-test/tiny-onevision"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _fails(capsys, argv: list[str], *needles: str) -> str:
    """`argv` exits 2 with one line on stderr naming `needles`, and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def _save_onevision(model, processor, folder: Path) -> Path:
    """A LLaVA-OneVision folder as a user has it (processor files without a video processor)."""
    model.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({
        "processor_class": "LlavaOnevisionProcessor",
        "num_image_tokens": processor.num_image_tokens,
        "vision_feature_select_strategy": processor.vision_feature_select_strategy,
        "vision_aspect_ratio": processor.vision_aspect_ratio,
        "chat_template": processor.chat_template,
    }))
    return folder


def _to_hub_cache(folder: Path, cache: Path, repo_id: str, commit: str = COMMIT, ref: str = "main") -> Path:
    """Put `folder` into `cache` in the Hugging Face hub layout: blobs named by content hash,
    snapshots/<commit>/<file> linking to them, refs/<ref> holding the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def onevision_folder(tmp_path_factory):
    from vflowopt.tiny import tiny_llava_onevision

    model, processor = tiny_llava_onevision()
    return _save_onevision(model, processor, tmp_path_factory.mktemp("onevision"))


@pytest.fixture(scope="module")
def hub_cache(onevision_folder, tmp_path_factory):
    cache = tmp_path_factory.mktemp("hf_home") / "hub"
    _to_hub_cache(onevision_folder, cache, REPO)
    return cache


@pytest.fixture
def offline(monkeypatch, hub_cache):
    """HF_HUB_OFFLINE=1 and HF_HUB_CACHE pointing at the test's cache, for this process (huggingface_hub reads
    the variables at import, so its constants are patched as well)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache))
    return hub_cache


@pytest.fixture
def shipped_is_tiny(monkeypatch, make_model):
    """The cached tiny OneVision stands in for the shipped model (fast); tests must not change its dtype."""
    import vflowopt.cli.common

    model, processor = make_model("llava_onevision")
    monkeypatch.setattr(vflowopt.cli.common, "_shipped_model", lambda: (model, processor))
    return model


def _options(**kw) -> Namespace:
    base = {"model": None, "revision": None, "dtype": "auto", "device": "cpu", "device_map": None,
            "attn_implementation": "sdpa", "trust_remote_code": False, "json": True}
    return Namespace(**{**base, **kw})


# --- hub ids, offline -----------------------------------------------------------------------------------------


def test_run_loads_a_hub_id_from_the_cache_offline(hub_cache, tmp_path):
    """The real thing, in a fresh process: HF_HUB_OFFLINE=1, HF_HOME and HF_HUB_CACHE set, --model ORG/NAME."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(hub_cache.parent), "HF_HUB_CACHE": str(hub_cache)}
    cmd = [sys.executable, "-m", "vflowopt", "run", "--model", REPO, "--prompt", PROMPT, "--max-new-tokens", "1",
           "--json"]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["model"] == REPO and report["model_class"] == "LlavaOnevisionForConditionalGeneration"
    assert report["visual_tokens"] > 0 and report["tokens_into_llm"] < report["prompt_tokens"]
    assert "Loading weights" not in out.stderr  # --json keeps stderr to notices
    # a missing id says it is not in the cache and what to do; nothing is written
    cmd[cmd.index(REPO)] = "vflowopt-test/not-there"
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    errors = [line for line in out.stderr.splitlines() if line.startswith("vflowopt: error:")]
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(errors) == 1, out.stderr
    assert "not in the local Hugging Face cache" in out.stderr and "HF_HUB_OFFLINE=1" in out.stderr
    assert "hf download vflowopt-test/not-there" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_hub_id_resolves_to_the_cached_snapshot_and_revision(offline, onevision_folder):
    snapshot = offline / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert _model_folder(_options(model=REPO)) == snapshot
    assert _model_folder(_options(model=REPO, revision=COMMIT)) == snapshot
    other = "fedcba9876543210fedcba9876543210fedcba98"
    _to_hub_cache(onevision_folder, offline, REPO, commit=other, ref="v2")
    assert _model_folder(_options(model=REPO, revision="v2")).name == other
    with pytest.raises(vflowopt.cli.CLIError, match="at revision nope is not in the local Hugging Face cache"):
        _model_folder(_options(model=REPO, revision="nope"))


def test_missing_hub_id_and_local_paths(offline, capsys, tmp_path, onevision_folder):
    _fails(capsys, ["run", "--prompt", PROMPT, "--model", "someone/missing-model"],
           "someone/missing-model is not in the local Hugging Face cache", "hf download", "local directory")
    _fails(capsys, ["run", "--prompt", PROMPT, "--model", str(tmp_path / "no" / "such" / "dir")],
           "model directory not found", "hub id")
    _fails(capsys, ["run", "--prompt", PROMPT, "--model", str(onevision_folder), "--revision", "main"],
           "--revision applies to hub ids")


def test_eval_and_bench_take_hub_ids(offline, capsys, tmp_path, monkeypatch):
    from vflowopt.vqa import model as M

    model, processor = M.build_model("tiny", seed=0)
    folder = M.save(model, processor, tmp_path / "vqa")
    _to_hub_cache(folder, offline, "vflowopt-test/tiny-vqa")
    monkeypatch.chdir(tmp_path)
    code = main(["eval", "--model", "vflowopt-test/tiny-vqa", "--methods", "random", "--budgets", "1.0",
                 "--n", "2", "--batch-size", "2"])
    assert code == 0, capsys.readouterr().err
    assert "random" in capsys.readouterr().out
    code = main(["bench", "--model", REPO, "--methods", "random", "--budgets", "0.5", "--repeats", "1",
                 "--warmup", "0", "--new-tokens", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert REPO in captured.out and "random weights" not in captured.out.lower()


# --- loading options --------------------------------------------------------------------------------------------


def test_dtype_and_attention_options_reach_from_pretrained(onevision_folder):
    model, processor = _load_model(onevision_folder, _options(dtype="bf16", attn_implementation="eager"))
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
    assert not model.training and processor.tokenizer is not None
    model, _ = _load_model(onevision_folder, _options(dtype="auto"))
    assert model.dtype == torch.float32  # the checkpoint's own dtype


def test_run_in_bf16_with_eager_attention(capsys, onevision_folder):
    code = main(["run", "--model", str(onevision_folder), "--prompt", PROMPT, "--max-new-tokens", "1",
                 "--dtype", "bf16", "--attn-implementation", "eager", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["mean_retention"] == pytest.approx(0.25, abs=0.05)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda(capsys, device):
    for command in (["run", "--prompt", PROMPT], ["optimize", "--budget", "0.25"], ["eval", "--n", "1"],
                    ["bench"]):
        _fails(capsys, [*command, "--device", device], f"--device {device}", "no CUDA device")


def test_option_errors_are_one_line(capsys):
    _fails(capsys, ["run", "--device", "tpu"], "argument --device", "cpu, cuda or cuda:N")
    _fails(capsys, ["run", "--device", "cuda", "--device-map", "auto"], "not allowed with argument")
    _fails(capsys, ["bench", "--dtype", "fp8"], "argument --dtype", "invalid choice")
    if importlib.util.find_spec("flash_attn") is None:
        _fails(capsys, ["run", "--prompt", PROMPT, "--attn-implementation", "flash_attention_2"],
               "flash_attention_2 needs the flash-attn package")
    if importlib.util.find_spec("accelerate") is None:
        _fails(capsys, ["run", "--prompt", PROMPT, "--device-map", "auto"], "needs the accelerate package")


def test_help_lists_the_loading_options(capsys):
    for command in ("run", "optimize", "bench", "eval"):
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        for option in ("--revision", "--dtype", "--device-map", "--attn-implementation", "--trust-remote-code",
                       "DIR|ID"):
            assert option in out, (command, option)


# --- bad images -------------------------------------------------------------------------------------------------


def test_bad_image_files(capsys, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not a picture")
    _fails(capsys, ["run", "--image", str(junk), "--prompt", PROMPT], "not an image Pillow can read")
    png = tmp_path / "ok.png"
    Image.new("RGB", (64, 64), "red").save(png)
    cut = tmp_path / "cut.png"
    cut.write_bytes(png.read_bytes()[:60])
    _fails(capsys, ["run", "--image", str(cut), "--prompt", PROMPT], "cannot read image", "damaged or cut short")
    _fails(capsys, ["run", "--image", str(tmp_path), "--prompt", PROMPT], "is not a file")
    _fails(capsys, ["run", "--image", str(tmp_path / "none.png"), "--prompt", PROMPT], "image file not found")
    _fails(capsys, ["bench", "--images", str(junk)], "not an image Pillow can read")


def test_decompression_bomb_is_one_line(capsys, tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("L", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10000 pixels is then over twice the limit
    _fails(capsys, ["run", "--image", str(path), "--prompt", PROMPT], "too large to open safely", "downscale")


def test_images_are_converted_with_a_note(capsys, tmp_path):
    grey16 = tmp_path / "grey16.png"
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(grey16)
    image = _load_image(str(grey16))
    assert image.mode == "RGB"
    values = np.asarray(image)[..., 0].astype(int)
    assert values.min() == 0 and values.max() == 255 and len(np.unique(values)) > 200  # not all white
    assert np.allclose(values, ramp / 257.0, atol=1)
    assert "16-bit greyscale, scaled to 8-bit RGB" in capsys.readouterr().err

    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(rgba)  # fully transparent black: white once composited
    assert np.asarray(_load_image(str(rgba))).min() == 255
    assert "transparency, composited onto white" in capsys.readouterr().err
    for mode, words in (("P", "palette"), ("L", "greyscale")):
        path = tmp_path / f"{mode}.png"
        Image.new(mode, (8, 8)).save(path)
        assert _load_image(str(path)).mode == "RGB"
        assert words in capsys.readouterr().err
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8)).save(rgb)
    _load_image(str(rgb))
    assert capsys.readouterr().err == ""


def test_huge_image_says_how_many_tokens_it_became(capsys, tmp_path, shipped_is_tiny):
    path = tmp_path / "huge.png"
    Image.new("L", (8000, 8000), 128).save(path)
    code = main(["run", "--image", str(path), "--prompt", PROMPT, "--max-new-tokens", "1", "--budget", "0.25",
                 "--json"])  # --budget: not the shipped model's own strategy, which is for the real shipped model
    captured = capsys.readouterr()
    assert code == 0, captured.err
    n = json.loads(captured.out)["visual_tokens"]
    assert "8000x8000 px; the processor resizes it" in captured.err
    said = re.search(r"resized the 8000x8000 px picture\(s\) to (\d+) image tokens", captured.err)
    assert said and int(said.group(1)) >= n > 0  # the prompt's placeholders (OneVision adds row-end tokens)


# --- prompts and strategy files ----------------------------------------------------------------------------------


def test_empty_prompt(capsys):
    _fails(capsys, ["run", "--prompt", "  "], "the prompt is empty")
    _fails(capsys, ["bench", "--prompt", ""], "the prompt is empty")


def test_bad_strategy_files(capsys, tmp_path, shipped_is_tiny):
    cases = {"notjson.json": b"{not json", "binary.json": b"\xff\xfe\x00garbage\x9c"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    _fails(capsys, ["run", "--prompt", PROMPT, "--strategy", str(tmp_path / "notjson.json")], "is not valid JSON")
    _fails(capsys, ["run", "--prompt", PROMPT, "--strategy", str(tmp_path / "binary.json")],
           "not a text (UTF-8 JSON) file")
    _fails(capsys, ["run", "--prompt", PROMPT, "--strategy", str(tmp_path)], "is a directory")
    _fails(capsys, ["eval", "--strategy", str(tmp_path)], "is a directory")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"method": "random", "budget": 0.5, "colour": "blue"}))
    _fails(capsys, ["run", "--prompt", PROMPT, "--strategy", str(unknown)], "unknown field(s) ['colour']")
    other = tmp_path / "other.json"
    vflowopt.config_for("random", budget=0.5).save(other)
    _fails(capsys, ["run", "--prompt", PROMPT, "--strategy", str(other), "--method", "vflowopt"], "contradicts")
    family = tmp_path / "family.json"
    vflowopt.config_for("random", budget=0.5, model_family="qwen2_vl").save(family)
    _fails(capsys, ["run", "--prompt", PROMPT, "--strategy", str(family), "--max-new-tokens", "1"],
           "made for a 'qwen2_vl' model")


# --- model directories --------------------------------------------------------------------------------------------


def _text_only(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    return folder


def _truncated(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


def test_bad_model_directories(capsys, tmp_path, onevision_folder, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    empty = tmp_path / "empty"
    empty.mkdir()
    text = _text_only(tmp_path / "text")
    cut = _truncated(onevision_folder, tmp_path / "cut")
    pickled = tmp_path / "pickled"
    shutil.copytree(onevision_folder, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    shutil.copy(onevision_folder / "config.json", weightless)
    for command in (["run", "--prompt", PROMPT], ["optimize", "--budget", "0.25"], ["bench"]):
        _fails(capsys, [*command, "--model", str(empty)], "no config.json")
        _fails(capsys, [*command, "--model", str(text)], "'llama' model (LlamaForCausalLM)",
               "text-only model", "llava_onevision")
        _fails(capsys, [*command, "--model", str(cut)], "model.safetensors is truncated or damaged")
        _fails(capsys, [*command, "--model", str(pickled)], "pickle weights", "safetensors only")
    _fails(capsys, ["run", "--prompt", PROMPT, "--model", str(weightless)], "has no weights")
    assert list(work.iterdir()) == []


def test_eval_checks_the_folder_before_building_anything(capsys, tmp_path, onevision_folder, monkeypatch):
    """The found bug: a text-only folder made eval build a default LLaVA-7B (22.9 GB) before failing."""
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("a model was built before the folder was checked")

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", never)
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "__init__", never)
    text = _text_only(tmp_path / "text")
    _fails(capsys, ["eval", "--model", str(text), "--n", "1"], "'llama' model", "not a LLaVA trained on")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "llava"}))
    _fails(capsys, ["eval", "--model", str(bare), "--n", "1"], "does not describe its vision_config and text_config")
    _fails(capsys, ["eval", "--model", str(onevision_folder), "--n", "1"], "'llava_onevision' model")
    monkeypatch.undo()

    from vflowopt.vqa import model as M

    model, processor = M.build_model("tiny", seed=0)
    folder = M.save(model, processor, tmp_path / "vqa")
    cut = _truncated(folder, tmp_path / "vqa_cut")
    _fails(capsys, ["eval", "--model", str(cut), "--n", "1"], "model.safetensors is truncated or damaged")
    big = tmp_path / "vqa_big"
    shutil.copytree(folder, big)
    config = json.loads((big / "config.json").read_text())
    config["text_config"]["hidden_size"] = config["text_config"]["intermediate_size"] = 1024
    (big / "config.json").write_text(json.dumps(config))
    _fails(capsys, ["eval", "--model", str(big), "--n", "1"], "do not match")


# --- counts and data files -----------------------------------------------------------------------------------------


def test_counts_must_be_positive(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["eval", "--n", "0"], ["eval", "--n", "-3"], ["optimize", "--budget", "0.25", "--trials", "0"],
                 ["optimize", "--budget", "0.25", "--samples", "0"]):
        _fails(capsys, argv, "expected a whole number >= 1")
    assert list(tmp_path.iterdir()) == []


def test_data_file_whose_images_are_missing(capsys, tmp_path, monkeypatch, shipped_is_tiny):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"image": "missing.png", "prompt": PROMPT}) + "\n")
    code = main(["optimize", "--budget", "0.25", "--data", str(data), "--trials", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "none of the 1 images of data file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


def test_bench_refuses_conflicting_outputs_and_image_flags(capsys, tmp_path):
    out = tmp_path / "x"
    _fails(capsys, ["bench", "--json", str(out), "--csv", str(out)], "must name different files")
    png = tmp_path / "a.png"
    Image.new("RGB", (32, 32)).save(png)
    _fails(capsys, ["bench", "--images", str(png), "--num-images", "2"], "--num-images", "--images replaces")
    _fails(capsys, ["bench", "--images", str(png), "--image-size", "64"], "--image-size")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png"]


def test_seeds_and_output_paths_are_checked_before_any_work(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for argv in (["eval", "--seed", "-1"], ["optimize", "--budget", "0.25", "--seed", "-1"]):
        _fails(capsys, argv, "argument --seed", "expected a whole number from 0")
    folder = tmp_path / "folder"
    folder.mkdir()
    for argv in (["eval", "--json", str(folder)], ["optimize", "--budget", "0.25", "--out", str(folder)],
                 ["optimize", "--budget", "0.25", "--plot", str(folder)], ["bench", "--csv", str(folder)]):
        _fails(capsys, argv, "is a directory; give a file name")
    if os.geteuid() != 0:  # root writes anywhere
        folder.chmod(0o500)
        try:
            _fails(capsys, ["eval", "--json", str(folder / "x.json")], "no write permission")
        finally:
            folder.chmod(0o700)
    assert [p.name for p in tmp_path.iterdir()] == ["folder"] and not any(folder.iterdir())


def test_a_strategy_for_another_family_or_depth_is_refused_before_loading(capsys, tmp_path, onevision_folder,
                                                                          monkeypatch):
    import transformers

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded before the strategy was checked")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", never)
    family = tmp_path / "family.json"
    vflowopt.config_for("random", budget=0.5, model_family="qwen2_vl").save(family)
    _fails(capsys, ["run", "--prompt", PROMPT, "--model", str(onevision_folder), "--strategy", str(family)],
           "made for a 'qwen2_vl' model, not 'llava_onevision'")
    depth = tmp_path / "depth.json"
    vflowopt.config_for("random", budget=0.5, model_family="llava_onevision", num_layers=32).save(depth)
    _fails(capsys, ["run", "--prompt", PROMPT, "--model", str(onevision_folder), "--strategy", str(depth)],
           "made for an LLM with 32 layers", "has 6")
