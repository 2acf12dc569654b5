"""Tiny, fully offline LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and Qwen3-VL models and processors.

Like :mod:`vflowopt.tiny`: configs built in code, seeded random weights, the shared byte-level BPE
tokenizer (``<image>`` is id 5, ``<video>`` id 6) and the pure-PIL image processors; nothing touches a
model hub. Processors with a ``video_processor`` slot are built through a subclass that accepts
``video_processor=None`` (torchvision is unusable here; see :func:`vflowopt.tiny.onevision_processor_class`);
calling them directly supports images and text. Each also carries a torchvision-free video processor
(:mod:`vflowopt.video_inputs`), so :func:`vflowopt.video_inputs.build_video_inputs` builds video prompts.

* :func:`tiny_llava_next` - CLIP (56 px, 14 px patches, CLS) + Llama, anyres pinpoints ``{56,112}^2``.
* :func:`tiny_qwen2_vl`, :func:`tiny_qwen2_5_vl`, :func:`tiny_qwen3_vl` - 14 px patches (16 for Qwen3-VL),
  2×2 merge, M-RoPE text model; the image processor keeps images small (at most 64 merged tokens).
* :func:`tiny_llava_next_video` - the LLaVA-NeXT CLIP/anyres set-up + stride-2 average video pooling.
* :func:`tiny_video_llava` - Video-LLaVA: separate CLIP image and video towers, CLS kept for video frames.
"""

from __future__ import annotations

import functools

from .tiny import (
    CHATML_CHAT_TEMPLATE,
    LLAVA_CHAT_TEMPLATE,
    _attach_tiny_video_processor,
    _instantiate,
    load_asset_config,
    tiny_llava_onevision,
    tiny_tokenizer,
)

__all__ = [
    "LLAVA_VIDEO_CHAT_TEMPLATE",
    "QWEN_FAMILIES",
    "VIDEO_FAMILY_BUILDERS",
    "tiny_llava_next",
    "tiny_llava_next_video",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
    "tiny_qwen3_vl",
    "tiny_video_llava",
]

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _text_config(tokenizer, num_layers: int, mrope: bool) -> dict:
    cfg = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": int(num_layers),
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": False,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    }
    if mrope:  # head_dim 16: 8 frequency pairs split (t, h, w)
        cfg["rope_parameters"]["mrope_section"] = [2, 3, 3]
    return cfg


@functools.cache
def no_video_processor_class(base_name: str):
    """A subclass of ``transformers.<base_name>`` that tolerates ``video_processor=None``."""
    import transformers

    base = getattr(transformers, base_name)

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument is None and argument_name == "video_processor":
            return None
        return base.check_argument_for_proper_class(self, argument_name, argument)

    return type(f"Tiny{base_name}", (base,), {"check_argument_for_proper_class": check_argument_for_proper_class})


# ---------------------------------------------------------------------------------------------------------
# LLaVA-NeXT
# ---------------------------------------------------------------------------------------------------------


def tiny_llava_next(attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 6):
    """Tiny random ``LlavaNextForConditionalGeneration`` and its ``LlavaNextProcessor`` (no downloads).

    The CLIP tower and projector of :func:`vflowopt.tiny.tiny_llava` (56 px, 14 px patches + CLS,
    ``vision_feature_layer=-2``, strategy ``"default"``), a Llama text model, and anyres pinpoints
    ``{56,112}^2``: an 80×120 image gives a 4×4 base grid plus an unpadded crop grid with newlines.
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
    )

    tokenizer = tiny_tokenizer("llava")
    raw = load_asset_config("tiny_llava")
    raw.pop("model_type", None)
    raw.pop("image_seq_length", None)
    raw["text_config"] = _text_config(tokenizer, num_layers, mrope=False) | {"model_type": "llama"}
    raw["image_token_index"] = tokenizer.image_token_id
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    raw["image_grid_pinpoints"] = pinpoints
    config = LlavaNextConfig(**raw)
    model = _instantiate(LlavaNextForConditionalGeneration, config, seed, attn_implementation)
    vision = config.vision_config
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


# ---------------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL / Qwen3-VL
# ---------------------------------------------------------------------------------------------------------


def _qwen_processor(processor_name: str, patch_size: int, mean, std, tokenizer, max_tokens: int):
    from transformers import Qwen2VLImageProcessorPil

    unit = patch_size * 2  # one merged token covers (2·patch)² pixels
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 4 * unit * unit, "longest_edge": max_tokens * unit * unit},
        patch_size=patch_size,
        temporal_patch_size=2,
        merge_size=2,
        image_mean=list(mean),
        image_std=list(std),
    )
    cls = no_video_processor_class(processor_name)
    processor = cls(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                    chat_template=CHATML_CHAT_TEMPLATE)
    # videos (build_video_inputs): the image processor's per-frame pixel bounds; Qwen3-VL's bounds cover the
    # whole clip (frames x height x width), so its budget is 16 frames' worth
    family = {"Qwen2VLProcessor": "qwen2_vl", "Qwen2_5_VLProcessor": "qwen2_5_vl",
              "Qwen3VLProcessor": "qwen3_vl"}[processor_name]
    frames = 16 if family == "qwen3_vl" else 1
    _attach_tiny_video_processor(
        processor, family, size={"shortest_edge": 4 * unit * unit, "longest_edge": frames * max_tokens * unit * unit},
        patch_size=patch_size, temporal_patch_size=2, merge_size=2, image_mean=tuple(mean), image_std=tuple(std))
    return processor


def _qwen_config_kwargs(tokenizer) -> dict:
    return {
        "image_token_id": tokenizer.image_token_id,
        "video_token_id": tokenizer.video_token_id,
        # the tiny tokenizer has no <|vision_start|>/<|vision_end|>; ids that never occur in prompts
        "vision_start_token_id": len(tokenizer) - 1,
        "vision_end_token_id": len(tokenizer) - 2,
    }


def tiny_qwen2_vl(attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 6, max_tokens: int = 64):
    """Tiny random ``Qwen2VLForConditionalGeneration`` and a ``Qwen2VLProcessor`` (no downloads).

    Vision: depth 2, embed 32, 2 heads, 14 px patches, 2×2 merge (one LLM token = 28×28 pixels);
    text: Qwen2-VL (hidden 64, ``num_layers`` layers, 4/2 heads, M-RoPE sections [2, 3, 3]). The image
    processor (OpenAI CLIP mean/std, like the real one) resizes to at most ``max_tokens`` merged tokens.
    """
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = tiny_tokenizer("chatml")
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer, num_layers, mrope=True),
        vision_config={"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        **_qwen_config_kwargs(tokenizer),
    )
    model = _instantiate(Qwen2VLForConditionalGeneration, config, seed, attn_implementation)
    processor = _qwen_processor("Qwen2VLProcessor", 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tokenizer, max_tokens)
    return model, processor


def tiny_qwen2_5_vl(attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 6, max_tokens: int = 64):
    """Tiny random ``Qwen2_5_VLForConditionalGeneration`` and a ``Qwen2_5_VLProcessor`` (no downloads).

    Vision: depth 4, hidden 32, 2 heads, 14 px patches, 2×2 merge, ``window_size=56`` (2×2 merged tokens
    per window) and full attention in blocks ``[1, 2]`` (so blocks 0 and 3 are windowed and the default
    scored block, the last full-attention one, is not the last block).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = tiny_tokenizer("chatml")
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer, num_layers, mrope=True),
        vision_config={"depth": 4, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                       "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "window_size": 56, "fullatt_block_indexes": [1, 2], "in_channels": 3},
        **_qwen_config_kwargs(tokenizer),
    )
    model = _instantiate(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation)
    processor = _qwen_processor("Qwen2_5_VLProcessor", 14, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, tokenizer, max_tokens)
    return model, processor


def tiny_qwen3_vl(attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 6, max_tokens: int = 64):
    """Tiny random ``Qwen3VLForConditionalGeneration`` and a ``Qwen3VLProcessor`` (no downloads).

    Vision: depth 3, hidden 32, 2 heads, 16 px patches, 2×2 merge, deepstack from blocks ``[0, 1]`` (added
    after LLM layers 0 and 1, so in-LLM pruning may start at layer 2); mean/std 0.5 like the real one.
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = tiny_tokenizer("chatml")
    text = _text_config(tokenizer, num_layers, mrope=True)
    text["head_dim"] = 16
    text["rope_parameters"]["mrope_interleaved"] = True
    config = Qwen3VLConfig(
        text_config=text,
        vision_config={"depth": 3, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                       "num_heads": 2, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "num_position_embeddings": 64, "deepstack_visual_indexes": [0, 1], "in_channels": 3},
        **_qwen_config_kwargs(tokenizer),
    )
    model = _instantiate(Qwen3VLForConditionalGeneration, config, seed, attn_implementation)
    processor = _qwen_processor("Qwen3VLProcessor", 16, [0.5] * 3, [0.5] * 3, tokenizer, max_tokens)
    return model, processor


#: family name -> builder, for tests and the CLI.
QWEN_FAMILIES = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl}


# ---------------------------------------------------------------------------------------------------------
# LLaVA-NeXT-Video and Video-LLaVA (video families)
# ---------------------------------------------------------------------------------------------------------

#: LLaVA-1.5 style template that also renders video items (``USER: <image>\n<video>\n... ASSISTANT:``); used by
#: the video families, whose real checkpoints prompt the same way.
LLAVA_VIDEO_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n{% endif %}"
    "{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _clip_llava_raw(tokenizer, num_layers: int) -> dict:
    """The tiny CLIP + projector of :func:`vflowopt.tiny.tiny_llava` with a Llama text model, as a raw dict."""
    raw = load_asset_config("tiny_llava")
    raw.pop("model_type", None)
    raw.pop("image_seq_length", None)
    raw["text_config"] = _text_config(tokenizer, num_layers, mrope=False) | {"model_type": "llama"}
    raw["image_token_index"] = tokenizer.image_token_id
    raw["video_token_index"] = tokenizer.video_token_id
    return raw


def tiny_llava_next_video(attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 6):
    """Tiny random ``LlavaNextVideoForConditionalGeneration`` and its ``LlavaNextVideoProcessor`` (no downloads).

    Images as in :func:`tiny_llava_next` (CLIP 56 px, 14 px patches + CLS, strategy ``"default"``, anyres
    pinpoints ``{56,112}^2``); videos: each frame is a 4×4 patch grid (CLS dropped) average-pooled with stride 2
    (``spatial_pool_stride=2``) -> 4 tokens per frame, no newline. The processor tolerates
    ``video_processor=None`` and carries a torchvision-free video processor (shortest edge 56, centre crop
    56×56, CLIP mean/std, like the real ``LlavaNextVideoVideoProcessor`` at 224) for
    :func:`vflowopt.video_inputs.build_video_inputs`.
    """
    from transformers import (
        LlavaNextImageProcessorPil,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    tokenizer = tiny_tokenizer("llava")
    raw = _clip_llava_raw(tokenizer, num_layers)
    pinpoints = [[56, 56], [56, 112], [112, 56], [112, 112]]
    raw["image_grid_pinpoints"] = pinpoints
    raw["spatial_pool_mode"] = "average"
    raw["spatial_pool_stride"] = 2
    config = LlavaNextVideoConfig(**raw)
    model = _instantiate(LlavaNextVideoForConditionalGeneration, config, seed, attn_implementation)
    vision = config.vision_config
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        image_grid_pinpoints=pinpoints,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = no_video_processor_class("LlavaNextVideoProcessor")(
        video_processor=None,
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_VIDEO_CHAT_TEMPLATE,
    )
    _attach_tiny_video_processor(
        processor, "llava_next_video", size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size})
    return model, processor


def tiny_video_llava(attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 6):
    """Tiny random ``VideoLlavaForConditionalGeneration`` and its ``VideoLlavaProcessor`` (no downloads).

    Separate ``image_tower`` and ``video_tower`` (both the tiny CLIP: 56 px, 14 px patches + CLS,
    ``vision_feature_layer=-2``), one projector, a Llama text model. Images use strategy ``"default"`` (CLS
    dropped: 16 tokens); videos keep the CLS of every frame (17 tokens per frame), as the model's
    ``get_video_features`` does. Image processor: ``VideoLlavaImageProcessor`` (PIL/numpy; shortest edge 56,
    centre crop 56, CLIP mean/std); video: a torchvision-free processor with the same settings.
    """
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration, VideoLlavaImageProcessor

    tokenizer = tiny_tokenizer("llava")
    raw = _clip_llava_raw(tokenizer, num_layers)
    config = VideoLlavaConfig(**raw)
    model = _instantiate(VideoLlavaForConditionalGeneration, config, seed, attn_implementation)
    vision = config.vision_config
    image_processor = VideoLlavaImageProcessor(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )
    processor = no_video_processor_class("VideoLlavaProcessor")(
        image_processor=image_processor,
        video_processor=None,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_VIDEO_CHAT_TEMPLATE,
    )
    _attach_tiny_video_processor(
        processor, "video_llava", size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size})
    return model, processor


#: video family name -> builder (every family :func:`vflowopt.video_inputs.build_video_inputs` supports).
VIDEO_FAMILY_BUILDERS = {
    "llava_onevision": tiny_llava_onevision,
    "qwen2_5_vl": tiny_qwen2_5_vl,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen3_vl": tiny_qwen3_vl,
    "llava_next_video": tiny_llava_next_video,
    "video_llava": tiny_video_llava,
}
