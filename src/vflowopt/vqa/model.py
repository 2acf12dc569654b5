"""The VQA benchmark model: a stock ``LlavaForConditionalGeneration`` built from config (no downloads).

* Vision: CLIP vision encoder, 224 px images, 14 px patches -> 16 x 16 = 256 patch tokens + CLS.
  ``vision_feature_layer=-1`` and ``vision_feature_select_strategy="default"``: the LLM receives the 256
  patch tokens of the last layer; the CLS token is trained by an auxiliary head on the pooled output during
  training (see ``training/vqa/train.py`` in the repository), so CLS-attention pruning methods read a real signal.
* Language model: a small Qwen2 (or Llama) decoder over a word-level vocabulary (:func:`build_tokenizer`).
* Processor: stock ``LlavaProcessor`` around ``LlavaImageProcessorPil`` (CLIP mean / std) and the
  word-level tokenizer; it emits 256 ``<image>`` tokens per picture.

``save_pretrained(model, processor, path)`` writes a normal Hugging Face folder; ``load(path)`` (or plain
``LlavaForConditionalGeneration.from_pretrained`` + ``AutoProcessor.from_pretrained``) reads it back offline.

Prompt format (the processor's chat template): the shipped model reads the question *before* the picture
(:data:`QUESTION_FIRST_TEMPLATE`)::

    <s>USER: {question} <image>\\n ASSISTANT: {answer} </s>

so that every image token can attend to the question (a 3 M-parameter LM learns the question-dependent lookups
far faster that way, see ``training/vqa/pretrain.py`` in the repository); ``question_first=False`` gives the
LLaVA-1.5 layout ``<s>USER: <image>\\n{question} ASSISTANT:``.

The answer is one word, so greedy decoding of one new token gives it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from ..tiny import LLAVA_CHAT_TEMPLATE
from .scenes import vocabulary

__all__ = [
    "PRESETS", "QUESTION_FIRST_TEMPLATE", "SPECIAL_TOKENS", "build_model", "build_processor", "build_tokenizer",
    "check_folder",
    "load", "save", "shipped_model_path",
]

#: LLaVA-1.5 words, but the text items come before the image items.
QUESTION_FIRST_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }} {% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} "
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>", "<image>")
PROMPT_WORDS: tuple[str, ...] = ("USER", "ASSISTANT", ":")

#: Architecture presets. ``base`` is the benchmark model (~2.9 M parameters, ~11.6 MB as fp32 safetensors): an
#: 8-layer LM, so that in-LLM methods (FastV, PDrop, SparseVLM: budget = mean retention over LLM layers) can
#: reach budgets down to 0.25 (FastV, K=2) and 0.125 (PDrop / SparseVLM); ``wide`` is a 4-layer, 192-wide LM of
#: similar cost; ``small`` is the trial-2 size; ``tiny`` is for tests only.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2},
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                 "num_key_value_heads": 1},
    },
    "small": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
        "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 4,
                 "num_key_value_heads": 2},
    },
    "base": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
        "text": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 4,
                 "num_key_value_heads": 4},
    },
    "wide": {
        "vision": {"hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4},
        "text": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 6,
                 "num_key_value_heads": 2},
    },
}


def build_tokenizer(question_first: bool = False):
    """Word-level tokenizer (``tokenizers`` WordLevel + Whitespace split) as a ``PreTrainedTokenizerFast``.

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<image>`` 4, then the prompt words and
    :func:`vflowopt.vqa.scenes.vocabulary`. Padding on the left (batched generation).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for word in (*SPECIAL_TOKENS, *PROMPT_WORDS, *vocabulary()):
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=QUESTION_FIRST_TEMPLATE if question_first else LLAVA_CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=1024,
    )


def build_processor(tokenizer=None, image_size: int = 224, patch_size: int = 14, question_first: bool = False):
    """``LlavaProcessor`` (``LlavaImageProcessorPil``, CLIP mean / std) emitting ``(size/patch)^2`` image tokens."""
    from transformers import LlavaImageProcessorPil, LlavaProcessor

    tokenizer = tokenizer or build_tokenizer(question_first)
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=QUESTION_FIRST_TEMPLATE if question_first else LLAVA_CHAT_TEMPLATE,
    )


def build_config(preset: str = "base", text: str = "qwen2", image_size: int = 224, patch_size: int = 14,
                 tokenizer=None):
    """``LlavaConfig`` for ``preset`` (see :data:`PRESETS`) and the word-level vocabulary."""
    from transformers import LlavaConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    if text not in ("qwen2", "llama"):
        raise ValueError(f"unknown text model {text!r}; expected 'qwen2' or 'llama'")
    tokenizer = tokenizer or build_tokenizer()
    spec = PRESETS[preset]
    vision = {
        "model_type": "clip_vision_model",
        "image_size": image_size,
        "patch_size": patch_size,
        "num_channels": 3,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "attention_dropout": 0.0,
        "projection_dim": spec["vision"]["hidden_size"],
        **spec["vision"],
    }
    text_cfg = {
        "model_type": text,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **spec["text"],
    }
    return LlavaConfig(
        vision_config=vision,
        text_config=text_cfg,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(image_size // patch_size) ** 2,
        tie_word_embeddings=True,
    )


def init_for_training(model) -> None:
    """Re-initialise the text embeddings so each row has norm ~1 (trial 1: image tokens at norm ~22 against
    text at ~0.5 left the LLM unable to use either). The projector is rescaled later, on real images
    (:func:`rescale_projector`)."""
    emb = model.get_input_embeddings()
    dim = emb.weight.shape[1]
    with torch.no_grad():
        emb.weight.normal_(0.0, 1.0 / math.sqrt(dim))


def rescale_projector(model, image_features: torch.Tensor, target: float = 1.0) -> float:
    """Scale the projector's last linear layer so projected image tokens have mean norm ``target``.

    ``image_features`` are projector outputs (any shape ``(..., dim)``) measured on real images. Returns
    the factor applied.
    """
    norm = float(image_features.detach().norm(dim=-1).mean())
    factor = target / max(norm, 1e-6)
    proj = model.model.multi_modal_projector.linear_2
    with torch.no_grad():
        proj.weight.mul_(factor)
        if proj.bias is not None:
            proj.bias.mul_(factor)
    return factor


def build_model(preset: str = "base", text: str = "qwen2", seed: int = 0, attn_implementation: str = "sdpa",
                question_first: bool = False):
    """``(model, processor)`` with seeded random weights, the model in ``train()`` mode."""
    from transformers import LlavaForConditionalGeneration

    tokenizer = build_tokenizer(question_first)
    config = build_config(preset, text, tokenizer=tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        init_for_training(model)
    model.set_attn_implementation(attn_implementation)
    gen = model.generation_config
    gen.pad_token_id, gen.bos_token_id, gen.eos_token_id = (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
    )
    gen.do_sample = False
    gen.max_new_tokens = 1
    return model, build_processor(tokenizer, question_first=question_first)


def num_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def nest_vision_tower_keys(weights: str | Path) -> bool:
    """Rename the ``vision_tower.*`` tensors of a saved LLaVA-style ``model.safetensors`` to
    ``vision_tower.vision_model.*`` (in place; True if anything was renamed).

    Why: transformers (5.19 and 5.24, the releases CI runs) save a CLIP / SigLIP tower flat and load either
    form, while vLLM 0.32's
    ``CLIPVisionModel`` / ``SiglipVisionModel`` load only the nested one: a folder saved this way can be
    served by vLLM as it is."""
    from safetensors.torch import load_file, save_file

    old, new = "vision_tower.", "vision_tower.vision_model."
    state = load_file(str(weights))
    flat = {k for k in state if k.startswith(old) and not k.startswith(new)}
    if not flat:
        return False
    state = {(new + k[len(old):] if k in flat else k): v for k, v in state.items()}
    mode = Path(weights).stat().st_mode & 0o777
    save_file(state, str(weights), metadata={"format": "pt"})
    Path(weights).chmod(mode)  # save_file writes a private file
    return True


def save(model, processor, path: str | Path, card: str | None = None) -> Path:
    """``save_pretrained`` for model and processor (safetensors; vision tower keys nested so that vLLM loads
    the folder too), plus ``README.md`` if ``card`` is given."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    nest_vision_tower_keys(path / "model.safetensors")
    processor.save_pretrained(path)
    if card is not None:
        (path / "README.md").write_text(card, encoding="utf-8")
    return path


def shipped_model_path() -> Path:
    """The trained benchmark model shipped inside the package (``vflowopt/assets/vqa_model``)."""
    from importlib import resources

    return Path(str(resources.files("vflowopt").joinpath("assets", "vqa_model")))


def check_folder(path: str | Path):
    """The ``LlavaConfig`` of a benchmark model folder, after checking its files; else a ``CheckpointError``.

    Runs before anything is built: the folder must hold a LLaVA config that spells out its vision and text
    models (a bare ``{"model_type": "llava"}`` would build the default CLIP-L + Llama-7B) and complete
    safetensors weights that cover the parameters the config describes."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from ..checkpoint import CheckpointError, check_safetensors, config_parameters, read_config, weight_parameters

    path = Path(path)
    raw = read_config(path)
    if raw["model_type"] != "llava":
        arch = ", ".join(raw.get("architectures") or []) or "no architectures listed"
        raise CheckpointError(
            f"{path} holds a '{raw['model_type']}' model ({arch}), not a LLaVA trained on the procedural VQA "
            "benchmark; eval takes the OUT/model folder of `python -m training.vqa.train` (default: the shipped "
            "model)"
        )
    missing = [k for k in ("vision_config", "text_config") if not isinstance(raw.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}/config.json does not describe its {' and '.join(missing)}, so it is not a "
                              "VQA benchmark model (transformers would build a default 7B LLaVA)")
    files = check_safetensors(path)
    try:
        config = LlavaConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - a malformed config
        raise CheckpointError(f"{path}/config.json is not a valid LLaVA config: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    stored, described = weight_parameters(files), config_parameters(LlavaForConditionalGeneration, config)
    if stored < described // 2:
        raise CheckpointError(f"the weights in {path} hold {stored:,} values but its config.json describes a "
                              f"model of {described:,} parameters: the folder's config and weights do not match")
    return config


def load(path: str | Path, device: str | torch.device = "cpu", attn_implementation: str = "sdpa",
         dtype: str | torch.dtype = "auto", device_map: str | None = None):
    """``(model, processor)`` from a folder written by :func:`save` (offline; model in ``eval()`` mode).

    The folder is checked first (:func:`check_folder`), so a wrong one is a ``CheckpointError`` (a
    ``ValueError``) before any weight is allocated. With ``device_map`` the model is placed by accelerate
    and ``device`` is ignored."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    config = check_folder(path)
    kwargs: dict[str, Any] = {"device_map": device_map} if device_map else {}
    model = LlavaForConditionalGeneration.from_pretrained(
        str(path), config=config, attn_implementation=attn_implementation, dtype=dtype, local_files_only=True,
        use_safetensors=True, **kwargs,
    )
    processor = AutoProcessor.from_pretrained(str(path), local_files_only=True)
    if not device_map:
        model = model.to(device)
    return model.eval(), processor
