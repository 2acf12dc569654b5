"""Tiny random Qwen-VL models saved to a folder that vLLM can load, and the transformers twin of each.

vLLM-specific constraints the project's own tiny models (src/vflowopt/tiny_families.py) do not meet, so
the shapes here differ from them:
* vLLM's CPU attention backend accepts head_dim in {32, 64, 80, ...} (16 is refused): text 2 heads x 32,
  one KV head;
* vLLM's M-RoPE recompute after pruning looks for `<|vision_start|>`: the tokenizer gets
  `<|vision_start|>` / `<|vision_end|>` and the chat template puts them around the image;
* 4 text layers, so VFlowOpt's default stage layers (L/3, 2L/3) exist (the plugin keeps every token there).
The processor is saved part by part: `ProcessorMixin.save_pretrained` cannot save a processor without a video
processor (transformers' Qwen-VL video processors need torchvision, absent here).
"""

from __future__ import annotations

import json
from pathlib import Path

from vflowopt import tiny, tiny_families
from vflowopt.tiny import CHATML_CHAT_TEMPLATE

IMAGE_ITEM = "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n{% endif %}"
VISION_ITEM = ("{% if item['type'] == 'image' %}<|vision_start|><image><|vision_end|>\n"
               "{% elif item['type'] == 'video' %}<|vision_start|><video><|vision_end|>\n{% endif %}")
CHAT_TEMPLATE = CHATML_CHAT_TEMPLATE.replace(IMAGE_ITEM, VISION_ITEM)
assert CHAT_TEMPLATE != CHATML_CHAT_TEMPLATE

TEXT_LAYERS = 4
QUESTION = "What is in the image?"


def _tokenizer():
    tok = tiny.tiny_tokenizer("chatml")
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _text(tok) -> dict:
    text = tiny_families._text_config(tok, TEXT_LAYERS, mrope=True)
    text.update(num_attention_heads=2, num_key_value_heads=1)  # head_dim 32
    text["rope_parameters"]["mrope_section"] = [4, 6, 6]  # 16 frequency pairs
    return text


def _ids(tok) -> dict:
    return {"image_token_id": tok.image_token_id, "video_token_id": tok.video_token_id,
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>")}


def build(family: str, seed: int = 0):
    """(transformers model, processor) of one family, random weights from `seed`."""
    import transformers

    tok = _tokenizer()
    mean, std, patch = tiny_families.OPENAI_CLIP_MEAN, tiny_families.OPENAI_CLIP_STD, 14
    if family == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLConfig(text_config=_text(tok), vision_config={
            "depth": 4, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_heads": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [1, 2], "in_channels": 3, "tokens_per_second": 2}, **_ids(tok))
        cls, proc_name = transformers.Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"
    elif family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(text_config=_text(tok), vision_config={
            "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}, **_ids(tok))
        cls, proc_name = transformers.Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
    elif family == "qwen3_vl":
        text = _text(tok)
        text["head_dim"] = 32
        text["rope_parameters"]["mrope_interleaved"] = True
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config={
            "depth": 3, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_heads": 2,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0], "in_channels": 3}, **_ids(tok))
        cls, proc_name = transformers.Qwen3VLForConditionalGeneration, "Qwen3VLProcessor"
        mean, std, patch = [0.5] * 3, [0.5] * 3, 16
    else:
        raise ValueError(f"no tiny vLLM model for {family}")
    model = tiny._instantiate(cls, cfg, seed, "sdpa")
    proc = tiny_families._qwen_processor(proc_name, patch, mean, std, tok, 64)
    proc.chat_template = CHAT_TEMPLATE
    return model, proc


def save(model, proc, out: Path) -> Path:
    """Save a model and its processor where vLLM (and transformers) can load them."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    proc.tokenizer.save_pretrained(out)
    proc.image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(proc.chat_template)
    base = type(proc).__mro__[1].__name__  # TinyQwen2_5_VLProcessor -> Qwen2_5_VLProcessor
    (out / "processor_config.json").write_text(json.dumps({"processor_class": base}))
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["processor_class"] = base
    tc_path.write_text(json.dumps(tc, indent=1))
    return out


def prompt(proc, n_images: int = 1, question: str = QUESTION) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return proc.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                              add_generation_prompt=True)
