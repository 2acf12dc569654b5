"""Tiny random Qwen-VL and LLaVA-OneVision models saved to a folder that vLLM can load, and the transformers
twin of each.

vLLM-specific constraints the project's own tiny models (src/vflowopt/tiny_families.py) do not meet, so
the shapes here differ from them:
* vLLM's CPU attention backend accepts head_dim in {32, 64, 80, ...} (16 is refused): text 2 heads x 32,
  one KV head;
* vLLM's M-RoPE recompute after pruning looks for `<|vision_start|>`: the tokenizer gets
  `<|vision_start|>` / `<|vision_end|>` and the chat template puts them around the image;
* 4 text layers, so VFlowOpt's default stage layers (L/3, 2L/3) exist (the plugin keeps every token there).
* LLaVA-OneVision: the SigLIP tower, projector and anyres pinpoints of the project's tiny OneVision
  (`assets/tiny_llava_onevision`), the text model above without M-RoPE, the plain chat template; `save`
  renames its vision keys (see `save`).
* LLaVA-1.5: the trained VQA model the package ships (CLIP 224 px → 256 tokens, Qwen2 text, head_dim 32),
  so answers and accuracy can be compared too; `save` renames its vision keys the same way.
The processor is saved part by part: `ProcessorMixin.save_pretrained` cannot save a processor without a video
processor (transformers' Qwen-VL video processors need torchvision, absent here).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vflowopt.tiny import CHATML_CHAT_TEMPLATE, tiny_tokenizer
from vflowopt.vqa.model import nest_vision_tower_keys
from vflowopt.vqa.model import save as vqa_save

IMAGE_ITEM = "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n{% endif %}"
VISION_ITEM = ("{% if item['type'] == 'image' %}<|vision_start|><image><|vision_end|>\n"
               "{% elif item['type'] == 'video' %}<|vision_start|><video><|vision_end|>\n{% endif %}")
CHAT_TEMPLATE = CHATML_CHAT_TEMPLATE.replace(IMAGE_ITEM, VISION_ITEM)
assert CHAT_TEMPLATE != CHATML_CHAT_TEMPLATE

TEXT_LAYERS = 4
QUESTION = "What is in the image?"


OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _tokenizer():
    tok = tiny_tokenizer("chatml")
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>"]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _text(tok, layers: int = TEXT_LAYERS, hidden: int = 64) -> dict:
    heads = hidden // 32  # head_dim 32
    return {
        "vocab_size": len(tok), "hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 2),
        "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
    }


def _onevision(tok, text_layers: int, text_hidden: int, max_image_tokens: int = 64):
    """(model config, processor) of a tiny LLaVA-OneVision whose text model vLLM's CPU attention accepts.
    `max_image_tokens` > 64 (the bench): anyres pinpoints up to 4×4 crops of 56 px instead of 2×2."""
    import transformers

    from vflowopt.tiny import CHATML_CHAT_TEMPLATE, load_asset_config, onevision_processor_class

    tok.chat_template = CHATML_CHAT_TEMPLATE
    raw = load_asset_config("tiny_llava_onevision")
    raw.pop("model_type", None)
    text = _text(tok, text_layers, text_hidden)
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}  # 1-D RoPE (no M-RoPE)
    raw["text_config"] = {"model_type": "qwen2", **text}
    raw["image_token_index"], raw["video_token_index"] = tok.image_token_id, tok.video_token_id
    if max_image_tokens > 64:
        side = raw["vision_config"]["image_size"]
        raw["image_grid_pinpoints"] = [[side * i, side * j] for i in range(1, 5) for j in range(1, 5)]
    cfg = transformers.LlavaOnevisionConfig(**raw)
    vision = cfg.vision_config
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        image_grid_pinpoints=[list(p) for p in cfg.image_grid_pinpoints], image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = onevision_processor_class()(
        image_processor=image_processor, tokenizer=tok, video_processor=None,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy, vision_aspect_ratio=cfg.vision_aspect_ratio,
        chat_template=CHATML_CHAT_TEMPLATE)
    return cfg, proc


def _processor(name: str, patch: int, mean, std, tok, max_tokens: int = 64):
    """transformers' processor `name` with the PIL image processor and no video processor (transformers'
    Qwen-VL video processors need torchvision)."""
    import transformers

    base = getattr(transformers, name)

    class NoVideoProcessor(base):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    unit = patch * 2
    image_processor = transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * unit * unit, "longest_edge": max_tokens * unit * unit}, patch_size=patch,
        temporal_patch_size=2, merge_size=2, image_mean=list(mean), image_std=list(std))
    return NoVideoProcessor(image_processor=image_processor, tokenizer=tok, video_processor=None,
                            chat_template=CHAT_TEMPLATE)


def _instantiate(cls, config, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    model.set_attn_implementation("sdpa")
    model.eval()
    text = config.get_text_config()
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = text.pad_token_id, text.bos_token_id, text.eos_token_id
    return model


def _ids(tok) -> dict:
    return {"image_token_id": tok.image_token_id, "video_token_id": tok.video_token_id,
            "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>")}


def build(family: str, seed: int = 0, *, text_layers: int = TEXT_LAYERS, text_hidden: int = 64,
          max_image_tokens: int = 64):
    """(transformers model, processor) of one family, random weights from `seed`. The defaults are the tests'
    tiny shapes; the bench passes a wider, deeper text model and larger images."""
    import transformers

    tok = _tokenizer()
    mean, std, patch = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, 14
    if family == "llava_onevision":
        cfg, proc = _onevision(tiny_tokenizer("chatml"), text_layers, text_hidden, max_image_tokens)
        return _instantiate(transformers.LlavaOnevisionForConditionalGeneration, cfg, seed), proc
    if family == "llava":  # trained weights: `seed` and the shape arguments do not apply
        from vflowopt.vqa.model import load, shipped_model_path

        return load(shipped_model_path())
    if family == "qwen2_5_vl":
        cfg = transformers.Qwen2_5_VLConfig(text_config=_text(tok, text_layers, text_hidden), vision_config={
            "depth": 4, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": text_hidden, "num_heads": 2,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [1, 2], "in_channels": 3, "tokens_per_second": 2}, **_ids(tok))
        cls, proc_name = transformers.Qwen2_5_VLForConditionalGeneration, "Qwen2_5_VLProcessor"
    elif family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(text_config=_text(tok, text_layers, text_hidden), vision_config={
            "depth": 2, "embed_dim": 32, "hidden_size": text_hidden, "num_heads": 2, "mlp_ratio": 2, "patch_size": 14,
            "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}, **_ids(tok))
        cls, proc_name = transformers.Qwen2VLForConditionalGeneration, "Qwen2VLProcessor"
    elif family == "qwen3_vl":
        text = _text(tok, text_layers, text_hidden)
        text["head_dim"] = 32
        text["rope_parameters"]["mrope_interleaved"] = True
        cfg = transformers.Qwen3VLConfig(text_config=text, vision_config={
            "depth": 3, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": text_hidden, "num_heads": 2,
            "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 64,
            "deepstack_visual_indexes": [0], "in_channels": 3}, **_ids(tok))
        cls, proc_name = transformers.Qwen3VLForConditionalGeneration, "Qwen3VLProcessor"
        mean, std, patch = [0.5] * 3, [0.5] * 3, 16
    else:
        raise ValueError(f"no tiny vLLM model for {family}")
    return _instantiate(cls, cfg, seed), _processor(proc_name, patch, mean, std, tok, max_image_tokens)


def save(model, proc, out: Path) -> Path:
    """Save a model and its processor where vLLM (and transformers) can load them.

    LLaVA-OneVision and LLaVA: transformers 5.19 saves the SigLIP / CLIP tower as `vision_tower.*`, while vLLM
    0.32's `SiglipVisionModel` / `CLIPVisionModel` load `vision_tower.vision_model.*`: the saved keys are
    renamed to the nested form, which both libraries load (`vflowopt.vqa.model.nest_vision_tower_keys`)."""
    out.mkdir(parents=True, exist_ok=True)
    if model.config.model_type == "llava":  # the project's own saving (a processor with every slot filled)
        return vqa_save(model, proc, out)
    model.save_pretrained(out)
    if model.config.model_type == "llava_onevision":
        nest_vision_tower_keys(out / "model.safetensors")
    proc.tokenizer.save_pretrained(out)
    proc.image_processor.save_pretrained(out)
    (out / "chat_template.jinja").write_text(proc.chat_template)
    base = type(proc).__mro__[1].__name__  # NoVideoProcessor -> Qwen2_5_VLProcessor
    extra = {k: getattr(proc, k) for k in ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")
             if hasattr(proc, k)}  # LLaVA-OneVision's processor settings
    (out / "processor_config.json").write_text(json.dumps({"processor_class": base, **extra}))
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["processor_class"] = base
    tc_path.write_text(json.dumps(tc, indent=1))
    return out


def prompt(proc, n_images: int = 1, question: str = QUESTION) -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
    return proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                    add_generation_prompt=True)
