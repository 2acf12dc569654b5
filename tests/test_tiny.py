"""Tests for the offline tiny model / processor builders in ``vflowopt.tiny``."""

from __future__ import annotations

import functools

import pytest
import torch
from PIL import Image

from vflowopt import tiny

FAMILIES = ["onevision", "llava-llama", "llava-qwen2"]
ATTN = ["sdpa", "eager"]
MAX_NEW = 4


@functools.cache
def _build(family: str, attn: str = "sdpa", seed: int = 0, num_layers: int = 6):
    if family == "onevision":
        return tiny.tiny_llava_onevision(attn_implementation=attn, seed=seed, num_layers=num_layers)
    text = family.split("-", 1)[1]
    return tiny.tiny_llava(attn_implementation=attn, seed=seed, num_layers=num_layers, text=text)


def _image_token_count(processor, batch) -> torch.Tensor:
    return (batch["input_ids"] == processor.image_token_id).sum(-1)


def _generate(model, batch):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=MAX_NEW, do_sample=False)
    assert out.shape == (batch["input_ids"].shape[0], batch["input_ids"].shape[1] + MAX_NEW)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
    return out


# ------------------------------------------------------------------------------------------------ tokenizer


def test_tokenizer_is_small_and_has_special_tokens():
    for style in ("llava", "chatml"):
        tok = tiny.tiny_tokenizer(style)
        assert len(tok) <= 1000
        assert tok.image_token_id == 5 and tok.video_token_id == 6 and tok.pad_token_id == 0
        for special in tiny.SPECIAL_TOKENS:
            assert tok.convert_tokens_to_ids(special) == tiny.SPECIAL_TOKENS.index(special)
        assert tok.padding_side == "left"
        text = "What is in the image? Ünïcödé and zebras 123."
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tiny.tiny_tokenizer("llava").eos_token == "</s>"
    assert tiny.tiny_tokenizer("chatml").eos_token == "<|im_end|>"
    with pytest.raises(ValueError):
        tiny.tiny_tokenizer("nope")


def test_tokenizer_is_deterministic():
    a = tiny.tiny_tokenizer("chatml")
    b = tiny.tiny_tokenizer("chatml")
    assert a.get_vocab() == b.get_vocab()
    text = "<image>\nDescribe the image in detail."
    assert a(text)["input_ids"] == b(text)["input_ids"]
    assert a.tokenize("<image>")[0] == "<image>"


def test_asset_configs_match_tokenizer():
    n = len(tiny.tiny_tokenizer())
    for name in ("tiny_llava_onevision", "tiny_llava"):
        cfg = tiny.load_asset_config(name)
        assert cfg["text_config"]["vocab_size"] == n
        assert cfg["image_token_index"] == 5


# ------------------------------------------------------------------------------------------------ images


def test_example_image_is_deterministic():
    a, b = tiny.example_image(0), tiny.example_image(0)
    assert isinstance(a, Image.Image) and a.mode == "RGB" and a.size == (80, 120)
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != tiny.example_image(1).tobytes()
    assert tiny.example_image(size=(64, 48)).size == (64, 48)


def test_example_png_asset_exists():
    from importlib import resources

    path = resources.files("vflowopt").joinpath("assets", "example.png")
    with path.open("rb") as fh:
        img = Image.open(fh)
        img.load()
    assert img.size == (80, 120)


# ------------------------------------------------------------------------------------------------ models


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_single_image_generate_and_forward(family, attn):
    model, processor = _build(family, attn)
    assert not model.training
    assert model.config.get_text_config()._attn_implementation == attn
    batch = tiny.build_inputs(processor, tiny.example_image(), "What is in the image?")
    expected = 72 if family == "onevision" else 16
    assert _image_token_count(processor, batch).tolist() == [expected]
    _generate(model, batch)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_of_two_prompts_left_padded(family, attn):
    model, processor = _build(family, attn)
    images = [tiny.example_image(0), tiny.example_image(1)]
    prompts = ["What is in the image?", "Count the shapes in this picture, then name their colours."]
    batch = tiny.build_inputs(processor, images, prompts)
    lengths = batch["attention_mask"].sum(-1)
    assert lengths[0] < lengths[1]
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    counts = _image_token_count(processor, batch)
    assert counts[0] == counts[1] > 0
    _generate(model, batch)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_prompt(family, attn):
    model, processor = _build(family, attn)
    batch = tiny.build_inputs(processor, None, "Describe a red circle.")
    assert "pixel_values" not in batch
    assert _image_token_count(processor, batch).tolist() == [0]
    _generate(model, batch)
    batch = tiny.build_inputs(processor, None, ["hello", "hello there, assistant"])
    _generate(model, batch)


@pytest.mark.parametrize("attn", ATTN)
def test_onevision_two_images_in_one_prompt(attn):
    model, processor = _build("onevision", attn)
    images = [tiny.example_image(0), tiny.example_image(1, size=(120, 80))]
    batch = tiny.build_inputs(processor, images, "Compare the two images.")
    assert batch["batch_num_images"].tolist() == [2]
    # multi-image prompts use only the base tile: 16 patches + 1 newline per image
    assert _image_token_count(processor, batch).tolist() == [2 * 17]
    _generate(model, batch)


def test_llava_two_images_in_one_prompt():
    model, processor = _build("llava-llama")
    batch = tiny.build_inputs(processor, [tiny.example_image(0), tiny.example_image(1)], "Compare them.")
    assert _image_token_count(processor, batch).tolist() == [32]
    _generate(model, batch)


def test_onevision_image_token_layout():
    model, processor = _build("onevision")
    batch = tiny.build_inputs(processor, tiny.example_image(), "What is in the image?")
    assert batch["pixel_values"].shape == (1, 5, 3, 56, 56)  # base tile + 2x2 anyres crops
    assert batch["image_sizes"].tolist() == [[120, 80]]
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
        ).pooler_output
    assert [f.shape[0] for f in feats] == [72]
    newlines = (feats[0] == model.model.image_newline).all(-1)
    assert int(newlines.sum()) == 8  # 16 base + 8x6 unpadded grid + 8 newlines = 72


def test_plain_placeholder_without_chat_template():
    _, processor = _build("llava-qwen2")
    batch, texts = tiny.build_inputs(processor, tiny.example_image(), "Hi", chat=False, return_text=True)
    assert texts == ["<image>\nHi"]
    assert _image_token_count(processor, batch).tolist() == [16]


def test_build_inputs_rejects_mismatched_images():
    _, processor = _build("llava-llama")
    with pytest.raises(ValueError):
        tiny.build_inputs(processor, [tiny.example_image()], ["a", "b"])


# ------------------------------------------------------------------------------------------------ determinism


def test_builders_are_deterministic_and_keep_global_rng():
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    m1, _ = tiny.tiny_llava_onevision(seed=3, num_layers=2)
    assert torch.equal(state, torch.random.get_rng_state())
    m2, _ = tiny.tiny_llava_onevision(seed=3, num_layers=2)
    m3, _ = tiny.tiny_llava_onevision(seed=4, num_layers=2)
    sd1, sd2, sd3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not all(torch.equal(sd1[k], sd3[k]) for k in sd1)
    assert len(m1.model.language_model.layers) == 2

    l1, _ = tiny.tiny_llava(seed=5, num_layers=3, text="qwen2")
    l2, _ = tiny.tiny_llava(seed=5, num_layers=3, text="qwen2")
    assert all(torch.equal(a, b) for a, b in zip(l1.state_dict().values(), l2.state_dict().values()))
    assert type(l1.model.language_model).__name__ == "Qwen2Model"
    assert len(l1.model.language_model.layers) == 3
    assert torch.equal(state, torch.random.get_rng_state())


def test_unknown_text_model_rejected():
    with pytest.raises(ValueError):
        tiny.tiny_llava(text="mistral")
