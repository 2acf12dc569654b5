"""Real architectures without weights: shipped configs, random-weight models and offline processors.

``vflowopt/assets/configs/<name>.json`` hold the architectures of LLaVA-1.5-7B, LLaVA-NeXT-7B (Vicuna),
LLaVA-OneVision-7B (Qwen2-7B + SigLIP-so400m), LLaVA-OneVision-0.5B (Qwen2-0.5B + SigLIP-so400m; small enough
to time on a CPU), Qwen2-VL-7B, Qwen2.5-VL-7B, Qwen2.5-VL-3B (fits a 24 GB CPU machine in fp32) and
LLaVA-NeXT-Video-7B, written from the public model configs (the ``_source`` field names which). Compute does
not depend on weight values, so a random-weight model times like the real one; its outputs, and so any
fidelity measured on it, are meaningless.

The processor is built without a hub: the package's tiny byte-level tokenizer (special tokens only, so
prompts are short) plus the family's pure-PIL ``*ImageProcessorPil`` with the real image settings (size,
anyres pinpoints, Qwen pixel limits, mean/std), so the number of visual tokens per image is the real
model's. The config's image/video token ids are remapped to the tokenizer's (vocabulary size unchanged).
Processors of video families also carry a torchvision-free frame processor with the real video settings
(:mod:`vflowopt.bench.video`; a shipped JSON's ``_video_processor`` entries over the family defaults), so
``vflowopt bench --video-frames`` gets the real model's number of video tokens too.
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from typing import Any

import torch

from ..config import ConfigError
from ..video_inputs import VIDEO_FAMILIES, attach_video_processor, video_frame_processor
from .video import video_frame_settings

__all__ = ["REAL_MODELS", "build_random_model", "load_real_config", "offline_processor", "real_config_dict"]

#: ``--model`` names and the asset file of each.
REAL_MODELS: dict[str, str] = {
    "llava-1.5-7b": "llava-1.5-7b.json",
    "llava-next-7b": "llava-next-7b.json",
    "llava-onevision-7b": "llava-onevision-7b.json",
    "llava-onevision-0.5b": "llava-onevision-0.5b.json",
    "qwen2-vl-7b": "qwen2-vl-7b.json",
    "qwen2.5-vl-7b": "qwen2.5-vl-7b.json",
    "llava-next-video-7b": "llava-next-video-7b.json",
    "qwen2.5-vl-3b": "qwen2.5-vl-3b.json",
}

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def real_config_dict(name: str) -> dict[str, Any]:
    """The raw shipped JSON of architecture `name` (vflowopt's '_' keys included)."""
    if name not in REAL_MODELS:
        raise ConfigError(f"unknown architecture '{name}'; shipped: {', '.join(REAL_MODELS)}")
    text = resources.files("vflowopt").joinpath("assets", "configs", REAL_MODELS[name]).read_text(encoding="utf-8")
    return json.loads(text)


def load_real_config(name: str):
    """The transformers config of shipped architecture `name`."""
    from transformers import AutoConfig

    raw = {k: v for k, v in real_config_dict(name).items() if not k.startswith("_")}
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


def _model_class(config):
    import transformers
    from transformers import AutoModelForImageTextToText

    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return AutoModelForImageTextToText._model_mapping[type(config)]


def build_random_model(config, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                       attn_implementation: str = "sdpa"):
    """`config`'s model with seeded random weights, created directly in `dtype` on `device`."""
    cls = _model_class(config)
    config = copy.deepcopy(config)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = cls._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    return model.eval()


def _processor_settings(config, name: str | None) -> dict:
    if name is not None:
        return dict(real_config_dict(name).get("_processor", {}))
    return {}


def offline_processor(config, name: str | None = None):
    """A processor for `config` built offline (tiny tokenizer + the family's PIL image processor).

    Remaps the image/video token ids of `config` (in place) to the tiny tokenizer's. Real image settings
    come from the shipped JSON for a named architecture, otherwise from `config` itself (image size,
    pinpoints) and the family's usual defaults (CLIP mean/std for CLIP towers, 0.5 for SigLIP, Qwen's
    pixel limits).
    """
    from ..tiny import CHATML_CHAT_TEMPLATE, LLAVA_CHAT_TEMPLATE, onevision_processor_class, tiny_tokenizer
    from ..tiny_families import LLAVA_VIDEO_CHAT_TEMPLATE, no_video_processor_class

    model_type = config.model_type
    settings = _processor_settings(config, name)
    vision = config.vision_config
    text = config.get_text_config()
    if model_type in ("llava", "llava_next", "llava_onevision", "llava_next_video", "video_llava"):
        chatml = model_type == "llava_onevision"
        tok = tiny_tokenizer("chatml" if chatml else "llava")
        config.image_token_id = tok.image_token_id
        if hasattr(config, "image_token_index"):
            config.image_token_index = tok.image_token_id
        if model_type in ("llava_onevision", "llava_next_video", "video_llava"):
            config.video_token_id = tok.video_token_id
            if hasattr(config, "video_token_index"):
                config.video_token_index = tok.video_token_id
        siglip = "siglip" in str(vision.model_type)
        mean = settings.get("image_mean", [0.5] * 3 if siglip else _CLIP_MEAN)
        std = settings.get("image_std", [0.5] * 3 if siglip else _CLIP_STD)
        side = int(vision.image_size)
        template = CHATML_CHAT_TEMPLATE if chatml else LLAVA_CHAT_TEMPLATE
        if model_type in ("llava_next_video", "video_llava"):
            template = LLAVA_VIDEO_CHAT_TEMPLATE
        if model_type == "llava":
            from transformers import LlavaImageProcessorPil, LlavaProcessor

            ip = LlavaImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                        image_mean=mean, image_std=std)
            proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=int(vision.patch_size),
                                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                                  num_additional_image_tokens=1 if "clip" in str(vision.model_type) else 0,
                                  chat_template=template)
        elif model_type == "llava_next":
            from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

            ip = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                            image_grid_pinpoints=copy.deepcopy(config.image_grid_pinpoints),
                                            image_mean=mean, image_std=std)
            proc = LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=int(vision.patch_size),
                                      vision_feature_select_strategy=config.vision_feature_select_strategy,
                                      num_additional_image_tokens=1 if "clip" in str(vision.model_type) else 0,
                                      chat_template=template)
        elif model_type == "llava_next_video":
            from transformers import LlavaNextImageProcessorPil

            ip = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                            image_grid_pinpoints=copy.deepcopy(config.image_grid_pinpoints),
                                            image_mean=mean, image_std=std)
            proc = no_video_processor_class("LlavaNextVideoProcessor")(
                video_processor=None, image_processor=ip, tokenizer=tok, patch_size=int(vision.patch_size),
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                num_additional_image_tokens=1 if "clip" in str(vision.model_type) else 0, chat_template=template)
        elif model_type == "video_llava":
            from transformers import VideoLlavaImageProcessor

            ip = VideoLlavaImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                          image_mean=mean, image_std=std)
            proc = no_video_processor_class("VideoLlavaProcessor")(
                image_processor=ip, video_processor=None, tokenizer=tok, patch_size=int(vision.patch_size),
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                num_additional_image_tokens=1 if "clip" in str(vision.model_type) else 0, chat_template=template)
        else:
            from transformers import LlavaOnevisionImageProcessorPil

            ip = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side},
                                                 image_grid_pinpoints=copy.deepcopy(config.image_grid_pinpoints),
                                                 image_mean=mean, image_std=std)
            proc = onevision_processor_class()(
                image_processor=ip, tokenizer=tok, video_processor=None,
                num_image_tokens=(side // int(vision.patch_size)) ** 2,
                vision_feature_select_strategy=config.vision_feature_select_strategy,
                vision_aspect_ratio=config.vision_aspect_ratio, chat_template=template)
    elif model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        from transformers import Qwen2VLImageProcessorPil

        tok = tiny_tokenizer("chatml")
        config.image_token_id = tok.image_token_id
        config.video_token_id = tok.video_token_id
        # the tiny tokenizer has no vision start/end tokens: ids that never occur in its prompts
        config.vision_start_token_id = len(tok) - 1
        config.vision_end_token_id = len(tok) - 2
        patch = int(vision.patch_size)
        merge = int(vision.spatial_merge_size)
        ip = Qwen2VLImageProcessorPil(
            size={"shortest_edge": int(settings.get("min_pixels", 3136)),
                  "longest_edge": int(settings.get("max_pixels", 12845056))},
            patch_size=patch, temporal_patch_size=int(vision.temporal_patch_size), merge_size=merge,
            image_mean=settings.get("image_mean", _CLIP_MEAN if model_type != "qwen3_vl" else [0.5] * 3),
            image_std=settings.get("image_std", _CLIP_STD if model_type != "qwen3_vl" else [0.5] * 3))
        base = {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor",
                "qwen3_vl": "Qwen3VLProcessor"}[model_type]
        proc = no_video_processor_class(base)(image_processor=ip, tokenizer=tok, video_processor=None,
                                               chat_template=CHATML_CHAT_TEMPLATE)
    else:
        raise ConfigError(f"cannot build an offline processor for model type '{model_type}'")
    if model_type in VIDEO_FAMILIES:
        shipped = real_config_dict(name).get("_video_processor") if name is not None else None
        attach_video_processor(proc, video_frame_processor(model_type, **video_frame_settings(config, ip, shipped)))
    text.pad_token_id = tok.pad_token_id
    tok.model_max_length = max(int(tok.model_max_length), int(getattr(text, "max_position_embeddings", 0) or 0))
    return proc


def set_generation_ids(model, processor) -> None:
    """Point the model's generation config at the offline tokenizer's pad/eos ids."""
    tok = processor.tokenizer
    gen = model.generation_config
    gen.pad_token_id = tok.pad_token_id
    gen.eos_token_id = tok.eos_token_id
    gen.bos_token_id = tok.bos_token_id
