"""Tiny, fully offline multimodal models for tests, demos and the CLI default.

Nothing in this module touches the Hugging Face Hub: model architectures come from the config JSON files
shipped in ``vflowopt/assets``, weights are random (seeded), the tokenizer is a small byte-level BPE built
in code with the ``tokenizers`` library, and the image processors are the pure-PIL ``*ImageProcessorPil``
classes (torchvision is not required).

Public helpers:

* :func:`tiny_llava_onevision` - ``LlavaOnevisionForConditionalGeneration`` (SigLIP + Qwen2, anyres_max_9).
* :func:`tiny_llava` - ``LlavaForConditionalGeneration`` (CLIP + Llama or Qwen2).
* :func:`tiny_tokenizer` - the shared byte-level BPE tokenizer.
* :func:`example_image` - a deterministic procedural picture.
* :func:`build_inputs` - prompt formatting (image placeholders / chat template) + processor call.

All builders are deterministic given ``seed`` and leave the caller's global RNG state untouched.
"""

from __future__ import annotations

import copy
import functools
import itertools
import json
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = [
    "CHATML_CHAT_TEMPLATE",
    "LLAVA_CHAT_TEMPLATE",
    "SPECIAL_TOKENS",
    "build_inputs",
    "example_image",
    "load_asset_config",
    "tiny_llava",
    "tiny_llava_onevision",
    "tiny_tokenizer",
]

# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

#: Special tokens, in id order (``<pad>`` is id 0, ``<image>`` id 5, ``<video>`` id 6).
SPECIAL_TOKENS: tuple[str, ...] = (
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "<image>",
    "<video>",
)

#: Total vocabulary size of the tiny tokenizer (special tokens + 256 byte symbols + learned merges).
_TARGET_VOCAB_SIZE = 384

# A fixed training corpus: typical VQA / captioning prompts, so that common prompt words become single tokens.
_CORPUS = (
    "What is in the image? Describe the image in detail. What is shown in this picture?",
    "Describe this picture briefly. Give a short caption for the photo. What do you see?",
    "How many objects are there in the image? Count the shapes. How many circles are there?",
    "What colour is the square? What color is the circle on the left? Is the triangle green?",
    "There is a red circle, a blue square and a green triangle on a noisy grey background.",
    "The image shows a small yellow star next to a large purple rectangle near the top right corner.",
    "Answer the question with a single word or phrase. Answer yes or no.",
    "Where is the object located? Is it at the top, the bottom, the left or the right of the image?",
    "Compare the two images. What is the difference between the first image and the second image?",
    "Please read the text in the image. Which animal is in the photo? A cat, a dog or a bird?",
    "The answer is yes. The answer is no. The answer is one, two, three or four.",
    "You are a helpful assistant. The user asks a question about the image and the assistant answers it.",
    "USER: What is this? ASSISTANT: USER: Describe it. ASSISTANT: system user assistant",
)


def _bpe_merges(words: Counter, num_merges: int) -> list[tuple[str, str]]:
    """Learn up to ``num_merges`` BPE merges from ``words`` (symbol tuple -> count).

    A deliberately simple, pure-Python trainer: the most frequent adjacent pair wins and ties are broken by
    the pair itself (lexicographically), so the result depends on nothing but the corpus.
    """
    words = Counter(words)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Serialized ``tokenizers.Tokenizer`` (byte-level BPE), built once per process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    words: Counter = Counter()
    for sentence in _CORPUS:
        for piece, _ in byte_level.pre_tokenize_str(sentence):
            words[tuple(piece)] += 1

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in (*SPECIAL_TOKENS, *alphabet):
        vocab[token] = len(vocab)
    merges = _bpe_merges(words, _TARGET_VOCAB_SIZE - len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok.to_str()


#: LLaVA-1.5 style template (``USER: <image>\n... ASSISTANT:``), used by :func:`tiny_llava`.
LLAVA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

#: ChatML template (Qwen2 / LLaVA-OneVision style), used by :func:`tiny_llava_onevision`.
CHATML_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'video' %}<video>\n{% endif %}"
    "{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(style: str = "llava"):
    """The tiny byte-level BPE tokenizer as a ``PreTrainedTokenizerFast`` (``TokenizersBackend`` in 5.x).

    ``style="llava"`` uses ``<s>``/``</s>`` as BOS/EOS and :data:`LLAVA_CHAT_TEMPLATE`; ``style="chatml"``
    uses ``<|im_end|>`` as EOS (no BOS) and :data:`CHATML_CHAT_TEMPLATE`. The vocabulary is identical for
    both styles (``len(tok) == 384``); ``tok.image_token_id == 5`` and ``tok.video_token_id == 6``.
    Padding is on the left, as needed for batched generation with decoder-only models.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if style not in ("llava", "chatml"):
        raise ValueError(f"unknown tokenizer style {style!r}; expected 'llava' or 'chatml'")
    backend = Tokenizer.from_str(_tokenizer_json())
    chatml = style == "chatml"
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=None if chatml else "<s>",
        eos_token="<|im_end|>" if chatml else "</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=CHATML_CHAT_TEMPLATE if chatml else LLAVA_CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=2048,
    )
    return tokenizer


# --------------------------------------------------------------------------------------------------------------
# Configs and models
# --------------------------------------------------------------------------------------------------------------


def load_asset_config(name: str) -> dict[str, Any]:
    """Return the raw config dict stored in ``vflowopt/assets/<name>/config.json`` (a fresh copy)."""
    text = resources.files("vflowopt").joinpath("assets", name, "config.json").read_text(encoding="utf-8")
    return json.loads(text)


def _set_token_ids(text_config: dict[str, Any], tokenizer) -> None:
    text_config["vocab_size"] = len(tokenizer)
    text_config["pad_token_id"] = tokenizer.pad_token_id
    text_config["bos_token_id"] = tokenizer.bos_token_id
    text_config["eos_token_id"] = tokenizer.eos_token_id


def _instantiate(model_cls, config, seed: int, attn_implementation: str):
    """Build ``model_cls(config)`` with seeded random weights without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model.set_attn_implementation(attn_implementation)
    model.eval()
    gen = model.generation_config
    text_config = config.get_text_config()
    gen.pad_token_id = text_config.pad_token_id
    gen.bos_token_id = text_config.bos_token_id
    gen.eos_token_id = text_config.eos_token_id
    return model


@functools.lru_cache(maxsize=1)
def onevision_processor_class():
    """A ``LlavaOnevisionProcessor`` subclass that tolerates ``video_processor=None``.

    Why: ``ProcessorMixin.__init__`` type-checks every sub-processor slot via
    ``check_argument_for_proper_class``. For the ``video_processor`` slot it resolves ``VideoProcessorMixin``
    through ``get_possibly_dynamic_module``; without a working torchvision (our CPU set-up cannot import the
    CUDA torchvision wheel) that class is not exported, the lookup falls through to
    ``VIDEO_PROCESSOR_MAPPING._extra_content`` and crashes with ``AttributeError`` - even when the value passed
    is ``None``. Instead of patching ``ProcessorMixin`` globally (which would change behaviour for every other
    processor in the process), this subclass accepts ``None`` for that single slot and defers to the stock
    check otherwise. Video inputs are therefore unsupported by the tiny processor; images and text work.
    """
    from transformers import LlavaOnevisionProcessor

    class TinyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
        __doc__ = onevision_processor_class.__doc__

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return TinyLlavaOnevisionProcessor


def tiny_llava_onevision(attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 6):
    """Tiny random ``LlavaOnevisionForConditionalGeneration`` and its processor (no downloads).

    Architecture (from ``assets/tiny_llava_onevision/config.json``): SigLIP vision tower (hidden 32,
    2 layers, 2 heads, 56 px images, 14 px patches -> 4x4 = 16 patches per tile, no pooling head),
    2-layer GELU projector, Qwen2 text model (hidden 64, MLP 128, ``num_layers`` layers, 4 heads / 2 KV
    heads, vocab 384). ``image_grid_pinpoints`` are ``{56,112}^2`` so images larger than 56 px get anyres
    crops; ``vision_aspect_ratio="anyres_max_9"``, ``vision_feature_layer=-1``, strategy ``"full"``.

    The processor is a :func:`onevision_processor_class` instance (``LlavaOnevisionProcessor`` that
    tolerates the missing video processor) around ``LlavaOnevisionImageProcessorPil`` (56 px, SigLIP
    mean/std 0.5) and :func:`tiny_tokenizer` (``style="chatml"``). It carries a torchvision-free video
    processor (frames resized to 56x56, mean/std 0.5) used by :func:`vflowopt.video_inputs.build_video_inputs`:
    a video gives ``frames x 2 x 2`` pooled tokens + 1 newline.

    Returns ``(model, processor)``; the model is in ``eval()`` mode and uses ``attn_implementation``.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
    )

    tokenizer = tiny_tokenizer("chatml")
    raw = load_asset_config("tiny_llava_onevision")
    raw.pop("model_type", None)
    raw["text_config"]["num_hidden_layers"] = int(num_layers)
    _set_token_ids(raw["text_config"], tokenizer)
    raw["image_token_index"] = tokenizer.image_token_id
    raw["video_token_index"] = tokenizer.video_token_id
    config = LlavaOnevisionConfig(**raw)
    model = _instantiate(LlavaOnevisionForConditionalGeneration, config, seed, attn_implementation)

    vision = config.vision_config
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": vision.image_size, "width": vision.image_size},
        image_grid_pinpoints=copy.deepcopy(config.image_grid_pinpoints),
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor_cls = onevision_processor_class()
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        vision_aspect_ratio=config.vision_aspect_ratio,
        chat_template=CHATML_CHAT_TEMPLATE,
    )
    _attach_tiny_video_processor(processor, "llava_onevision", size={"height": vision.image_size,
                                                                     "width": vision.image_size},
                                 image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))
    return model, processor


def _attach_tiny_video_processor(processor, family: str, **settings) -> None:
    """Give a tiny processor a torchvision-free video processor (for :func:`vflowopt.video_inputs.build_video_inputs`).

    Stored beside the processor's slots, so images and text behave exactly as without it.
    """
    from .video_inputs import attach_video_processor, video_frame_processor

    attach_video_processor(processor, video_frame_processor(family, **settings))


def tiny_llava(attn_implementation: str = "sdpa", seed: int = 0, num_layers: int = 6, text: str = "llama"):
    """Tiny random ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` (no downloads).

    Architecture (from ``assets/tiny_llava/config.json``): CLIP vision tower (hidden 32, 3 layers, 2 heads,
    56 px images, 14 px patches -> 16 patches + CLS), ``vision_feature_layer=-2``, strategy ``"default"``
    (CLS dropped -> 16 image tokens per image), 2-layer GELU projector, and a Llama (``text="llama"``) or
    Qwen2 (``text="qwen2"``) text model (hidden 64, MLP 128, ``num_layers`` layers, 4 heads / 2 KV heads,
    vocab 384).

    The processor is a stock ``LlavaProcessor`` around ``LlavaImageProcessorPil`` (CLIP mean/std, resize
    shortest edge to 56 then centre-crop 56x56) and :func:`tiny_tokenizer` (``style="llava"``), with
    ``patch_size=14`` and ``num_additional_image_tokens=1`` so it emits exactly 16 ``<image>`` tokens.

    Returns ``(model, processor)``; the model is in ``eval()`` mode and uses ``attn_implementation``.
    """
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaImageProcessorPil,
        LlavaProcessor,
    )

    if text not in ("llama", "qwen2"):
        raise ValueError(f"unknown text model {text!r}; expected 'llama' or 'qwen2'")
    tokenizer = tiny_tokenizer("llava")
    raw = load_asset_config("tiny_llava")
    raw.pop("model_type", None)
    text_config = raw["text_config"]
    text_config["model_type"] = text
    text_config["num_hidden_layers"] = int(num_layers)
    _set_token_ids(text_config, tokenizer)
    raw["image_token_index"] = tokenizer.image_token_id
    config = LlavaConfig(**raw)
    model = _instantiate(LlavaForConditionalGeneration, config, seed, attn_implementation)

    vision = config.vision_config
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": vision.image_size},
        crop_size={"height": vision.image_size, "width": vision.image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


# --------------------------------------------------------------------------------------------------------------
# Example image and input building
# --------------------------------------------------------------------------------------------------------------


def example_image(seed: int = 0, size: tuple[int, int] = (80, 120)) -> Image.Image:
    """A deterministic procedural RGB picture: a few coloured shapes on a noisy background.

    ``size`` follows the PIL convention ``(width, height)``; the default is 80 px wide and 120 px tall.
    Uses a private ``numpy`` generator, so global RNG state is not touched.
    """
    width, height = int(size[0]), int(size[1])
    rng = np.random.default_rng(seed)
    base = rng.integers(90, 170, size=3)
    noise = rng.normal(0.0, 18.0, size=(height, width, 3))
    # a soft vertical gradient so that the background is not flat
    gradient = np.linspace(-25.0, 25.0, height)[:, None, None]
    pixels = np.clip(base[None, None, :] + noise + gradient, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, mode="RGB")

    draw = ImageDraw.Draw(image)
    palette = [(220, 40, 40), (40, 80, 220), (40, 180, 60), (240, 200, 30), (150, 60, 190)]
    order = rng.permutation(len(palette))
    short = min(width, height)
    for i, kind in enumerate(("ellipse", "rectangle", "triangle", "ellipse")):
        colour = palette[int(order[i % len(palette)])]
        extent = int(rng.integers(max(4, short // 5), max(5, short // 2)))
        x0 = int(rng.integers(0, max(1, width - extent)))
        y0 = int(rng.integers(0, max(1, height - extent)))
        box = (x0, y0, x0 + extent, y0 + extent)
        if kind == "ellipse":
            draw.ellipse(box, fill=colour, outline=(0, 0, 0))
        elif kind == "rectangle":
            draw.rectangle(box, fill=colour, outline=(0, 0, 0))
        else:
            draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=colour)
    return image


def build_inputs(
    processor,
    images=None,
    prompts: str | Sequence[str] = "What is in the image?",
    *,
    chat: bool = True,
    return_text: bool = False,
    **processor_kwargs,
):
    """Format prompts with image placeholders and run ``processor`` (PyTorch tensors, left padding).

    Args:
        processor: a multimodal processor (e.g. from :func:`tiny_llava_onevision` or :func:`tiny_llava`).
        images: ``None`` (text only); one ``PIL.Image``; for a single prompt, a list of images that all go
            into that prompt; for several prompts, a list with one entry per prompt, each ``None``, an image
            or a list of images.
        prompts: one prompt or a list of prompts (a batch).
        chat: if true and the processor has a chat template, render a single user turn with one image item
            per image plus the text, and append the generation prompt. Otherwise use
            ``"<image>\\n" * n_images + prompt``.
        return_text: also return the list of formatted prompt strings.
        **processor_kwargs: forwarded to ``processor(...)``.

    Returns:
        The processor's ``BatchFeature`` (``input_ids``, ``attention_mask``, ``pixel_values``, ...), or
        ``(batch, texts)`` if ``return_text``.
    """
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("at least one prompt is required")
    from .video_inputs import normalise_images

    per_prompt = normalise_images(images, len(prompt_list))

    template = getattr(processor, "chat_template", None)
    tokenizer = processor.tokenizer
    image_token = getattr(processor, "image_token", "<image>")
    texts = []
    for prompt, imgs in zip(prompt_list, per_prompt):
        if chat and template:
            content = [{"type": "image"} for _ in imgs] + [{"type": "text", "text": prompt}]
            conversation = [{"role": "user", "content": content}]
            texts.append(
                tokenizer.apply_chat_template(
                    conversation, chat_template=template, tokenize=False, add_generation_prompt=True
                )
            )
        else:
            texts.append(f"{image_token}\n" * len(imgs) + prompt)

    flat = [im for imgs in per_prompt for im in imgs]
    kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "padding_side": "left"}
    kwargs.update(processor_kwargs)
    if flat:
        batch = processor(images=[imgs for imgs in per_prompt], text=texts, **kwargs)
    else:
        batch = processor(text=texts, **kwargs)
    return (batch, texts) if return_text else batch
