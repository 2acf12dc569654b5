"""Analytic prefill FLOPs of a LLaVA-style model: vision encoder + projector + LLM.

Conventions (the same as ``torch.utils.flop_counter.FlopCounterMode``):

* FLOPs = 2 x multiply-adds, counted for matrix products only (linear layers, attention matmuls, the
  patch-embedding convolution). A linear layer mapping ``n`` tokens from ``d_in`` to ``d_out`` costs
  ``2 * n * d_in * d_out``.
* Bias additions, normalisation layers, activations, rotary embeddings, softmax, residual additions and
  embedding look-ups are ignored (they are O(n * hidden), negligible next to the matmuls).
* Attention scores (Q Kᵀ) and the weighted sum (A V) are counted over the full ``n_q x n_kv`` rectangle, a
  full ``n x n`` square in prefill, even though the causal mask zeroes half of it: eager attention and
  PyTorch's math/sdpa kernels compute the whole square, and so does FlopCounterMode's count.
* Grouped-query attention: K and V projections produce ``num_key_value_heads * head_dim`` features; the
  attention matmuls run over all ``num_attention_heads`` query heads.

All counts are per batch element unless a function takes a count of images/tokens explicitly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "head_dim",
    "llm_layer_flops",
    "llm_prefill_flops",
    "vision_layer_flops",
    "vision_flops",
    "vision_tokens_per_image",
    "projector_flops",
    "vision_scoring_flops",
    "qwen_vision_flops",
    "qwen_vision_segments",
    "qwen_vision_scoring_flops",
]


def _linear(n: int, d_in: int, d_out: int) -> int:
    """FLOPs of a linear layer on ``n`` tokens (2 x multiply-adds; bias ignored)."""
    return 2 * n * d_in * d_out


def head_dim(config: Any) -> int:
    """``config.head_dim`` if set, else ``hidden_size // num_attention_heads`` (as transformers does)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llm_layer_flops(text_config: Any, n_tokens: int, kv_tokens: int | None = None) -> int:
    """FLOPs of one decoder layer (Llama/Qwen2-style: GQA attention + SwiGLU MLP) on ``n_tokens`` queries.

    ``kv_tokens`` is the number of keys each query attends over (default ``n_tokens``, i.e. prefill; for a
    decode step with a cache of length L pass ``n_tokens=1, kv_tokens=L + 1``). Counted: q/k/v/o
    projections, Q Kᵀ and A V over the full ``n_tokens x kv_tokens`` rectangle (causal masking not
    exploited), and the three MLP matmuls (gate, up: hidden -> intermediate; down: intermediate -> hidden).
    Ignored: norms, rotary embeddings, softmax, the SiLU gate product, biases. FLOPs = 2 x multiply-adds.
    """
    n = int(n_tokens)
    kv = n if kv_tokens is None else int(kv_tokens)
    hidden = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    d = head_dim(text_config)
    inter = text_config.intermediate_size
    proj = _linear(n, hidden, heads * d)  # q
    proj += 2 * _linear(n, hidden, kv_heads * d)  # k, v
    proj += _linear(n, heads * d, hidden)  # o
    attn = 2 * (2 * heads * n * kv * d)  # Q Kᵀ and A V
    mlp = 3 * _linear(n, hidden, inter)
    return proj + attn + mlp


def llm_prefill_flops(text_config: Any, tokens_per_layer: Sequence[int], logits_tokens: int = 1) -> int:
    """Prefill FLOPs of a decoder-only LLM whose layer ``i`` processes ``tokens_per_layer[i]`` tokens.

    Every layer attends causally over its own tokens (KV length == query length), so with token pruning
    pass the per-layer sequence lengths (e.g. ``PruneStats.kv_tokens_per_layer``). Adds the LM head for
    ``logits_tokens`` positions (1 with ``logits_to_keep=1``; 0 to leave it out). See
    :func:`llm_layer_flops` for what is counted; FLOPs = 2 x multiply-adds, the full n x n attention
    square is counted, norms/rotary/softmax are ignored.
    """
    n_layers = text_config.num_hidden_layers
    if len(tokens_per_layer) != n_layers:
        raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries; the LLM has {n_layers} layers")
    total = sum(llm_layer_flops(text_config, n) for n in tokens_per_layer)
    total += _linear(int(logits_tokens), text_config.hidden_size, text_config.vocab_size)
    return total


def _is_clip(vision_config: Any) -> bool:
    return "clip" in str(getattr(vision_config, "model_type", "")).lower()


def vision_tokens_per_image(vision_config: Any) -> int:
    """Encoder sequence length per image: ``(image_size // patch_size)**2`` patches, +1 class token for CLIP."""
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    return patches + (1 if _is_clip(vision_config) else 0)


def vision_layer_flops(vision_config: Any, tokens: int) -> int:
    """FLOPs of one CLIP/SigLIP encoder layer on one image of ``tokens`` tokens.

    q/k/v/o projections (hidden -> hidden), Q Kᵀ and A V over the full tokens x tokens square (the encoder
    is bidirectional), and the 2-matmul GELU MLP (fc1, fc2). FLOPs = 2 x multiply-adds; norms, activations,
    softmax and biases are ignored.
    """
    n = int(tokens)
    hidden = vision_config.hidden_size
    heads = vision_config.num_attention_heads
    d = hidden // heads
    return 4 * _linear(n, hidden, hidden) + 2 * (2 * heads * n * n * d) + 2 * _linear(
        n, hidden, vision_config.intermediate_size
    )


def vision_flops(vision_config: Any, n_images: int, tokens: int | None = None,
                 num_layers: int | None = None) -> int:
    """FLOPs of a CLIP or SigLIP vision encoder on ``n_images`` images (crops) of ``tokens`` tokens each.

    ``tokens`` is the encoder sequence length per image: the patches, plus the class token for CLIP
    (default :func:`vision_tokens_per_image`). Counted: the patch-embedding convolution
    (``2 * patches * hidden * channels * patch_size**2``), every encoder layer (:func:`vision_layer_flops`;
    ``num_layers`` defaults to all of them, which is what transformers runs even when the features come
    from an earlier layer), and, for SigLIP with ``vision_use_head=True``, the attention-pooling head (one
    probe query over all tokens, plus its MLP on that single token). FLOPs = 2 x multiply-adds; norms,
    position embeddings, activations, softmax and biases are ignored.
    """
    n = vision_tokens_per_image(vision_config) if tokens is None else int(tokens)
    clip = _is_clip(vision_config)
    patches = n - (1 if clip else 0)
    hidden = vision_config.hidden_size
    channels = getattr(vision_config, "num_channels", 3)
    layers = vision_config.num_hidden_layers if num_layers is None else int(num_layers)
    per_image = 2 * patches * hidden * channels * vision_config.patch_size**2
    per_image += layers * vision_layer_flops(vision_config, n)
    if not clip and getattr(vision_config, "vision_use_head", False) and layers == vision_config.num_hidden_layers:
        per_image += _linear(1, hidden, hidden)  # probe query projection
        per_image += 2 * _linear(n, hidden, hidden)  # key and value projections
        per_image += 2 * (2 * 1 * n * hidden)  # probe scores and weighted sum, all heads together
        per_image += _linear(1, hidden, hidden)  # output projection
        per_image += 2 * _linear(1, hidden, vision_config.intermediate_size)  # MLP on the pooled token
    return int(n_images) * per_image


def projector_flops(config: Any, n_tokens: int) -> int:
    """FLOPs of the LLaVA / LLaVA-OneVision 2-layer MLP projector on ``n_tokens`` visual features.

    ``linear_1``: vision hidden (x number of feature layers when ``vision_feature_layer`` is a list) ->
    text hidden; ``linear_2``: text hidden -> text hidden. ``n_tokens`` counts the features that go through
    the projector (LLaVA-1.5: 576 per image after dropping CLS; LLaVA-OneVision: 729 per crop; the
    image-newline tokens are added after it). FLOPs = 2 x multiply-adds; GELU and biases are ignored.
    """
    layers = config.vision_feature_layer
    n_feature_layers = 1 if isinstance(layers, int) else len(layers)
    d_vision = config.vision_config.hidden_size * n_feature_layers
    d_text = config.text_config.hidden_size
    return _linear(int(n_tokens), d_vision, d_text) + _linear(int(n_tokens), d_text, d_text)


def vision_scoring_flops(vision_config: Any, n_images: int, tokens: int | None = None) -> int:
    """Extra FLOPs VFlowOpt spends recomputing one ViT layer's attention map for importance scoring.

    :func:`vflowopt.signals.attention.vision_attention_probs` re-runs the q and k projections of the scored
    layer and Q Kᵀ over the full square (the entropy term and the selection itself are not matmuls).
    FLOPs = 2 x multiply-adds.
    """
    n = vision_tokens_per_image(vision_config) if tokens is None else int(tokens)
    hidden = vision_config.hidden_size
    return int(n_images) * (2 * _linear(n, hidden, hidden) + 2 * n * n * hidden)


# --------------------------------------------------------------------------------------------------
# Qwen2-VL / Qwen2.5-VL / Qwen3-VL vision transformers (patch embedding, blocks, merger)
# --------------------------------------------------------------------------------------------------


def _qwen_kind(vision_config: Any) -> str:
    kind = str(getattr(vision_config, "model_type", "")).lower()
    for name in ("qwen3_vl", "qwen2_5_vl", "qwen2_vl"):
        if kind.startswith(name):
            return name
    raise ValueError(f"not a Qwen-VL vision config: model_type {kind!r}")


def _qwen_dim(vision_config: Any) -> int:
    # Qwen2-VL calls the ViT width `embed_dim` (its `hidden_size` is the LLM width the merger maps to).
    return int(vision_config.embed_dim if _qwen_kind(vision_config) == "qwen2_vl" else vision_config.hidden_size)


def _grid_rows(grid_thw: Any) -> list[tuple[int, int, int]]:
    rows = grid_thw.tolist() if hasattr(grid_thw, "tolist") else list(grid_thw)
    return [(int(t), int(h), int(w)) for t, h, w in rows]


def qwen_vision_segments(vision_config: Any, grid_thw: Any, layer: int) -> list[int]:
    """Lengths of the attention segments of ViT block ``layer`` for the images ``grid_thw`` ((n, 3): t, h, w
    patches per image).

    Every block attends within one frame (``h * w`` patches) except Qwen2.5-VL's windowed blocks (those not
    in ``fullatt_block_indexes``), which attend within windows of ``window_size // spatial_merge_size //
    patch_size`` merged tokens a side (smaller windows at the right and bottom edges).
    """
    kind = _qwen_kind(vision_config)
    merge = int(vision_config.spatial_merge_size)
    segments: list[int] = []
    windowed = kind == "qwen2_5_vl" and int(layer) not in set(vision_config.fullatt_block_indexes)
    for t, h, w in _grid_rows(grid_thw):
        if not windowed:
            segments += [h * w] * t
            continue
        side = int(vision_config.window_size) // merge // int(vision_config.patch_size)
        llm_h, llm_w = h // merge, w // merge
        rows = [side] * (llm_h // side) + ([llm_h % side] if llm_h % side else [])
        cols = [side] * (llm_w // side) + ([llm_w % side] if llm_w % side else [])
        segments += [rh * rw * merge * merge for rh in rows for rw in cols] * t
    return segments


def qwen_vision_flops(vision_config: Any, grid_thw: Any) -> int:
    """FLOPs of a Qwen2-VL, Qwen2.5-VL or Qwen3-VL vision transformer on the images ``grid_thw``.

    ``grid_thw`` is what the processor returns as ``image_grid_thw`` ((n, 3): temporal, height, width in
    patches); all images of a prompt (or a batch) run as one flat sequence. Counted: the Conv3d patch
    embedding (``2 * N * dim * channels * temporal_patch * patch**2``), per block the fused qkv projection
    (dim -> 3 dim), the output projection, Q Kᵀ and A V within each attention segment
    (:func:`qwen_vision_segments`: per frame, or per window in Qwen2.5-VL's windowed blocks), and the MLP
    (Qwen2-VL: fc1/fc2 with ``dim * mlp_ratio``; Qwen2.5-VL: SwiGLU gate/up/down with
    ``intermediate_size``; Qwen3-VL: fc1/fc2 with ``intermediate_size``), then the patch merger on the
    ``N / merge**2`` merged tokens (``4 dim -> 4 dim -> LLM width``), for Qwen3-VL once more per deepstack
    merger. FLOPs = 2 x multiply-adds; norms, rotary and learned position embeddings, activations,
    softmax and biases are ignored.
    """
    kind = _qwen_kind(vision_config)
    dim = _qwen_dim(vision_config)
    heads = int(vision_config.num_heads)
    d = dim // heads
    merge = int(vision_config.spatial_merge_size)
    grids = _grid_rows(grid_thw)
    n = sum(t * h * w for t, h, w in grids)
    channels = int(getattr(vision_config, "in_channels", getattr(vision_config, "in_chans", 3)))
    patch = int(vision_config.patch_size)
    total = 2 * n * dim * channels * int(vision_config.temporal_patch_size) * patch * patch
    if kind == "qwen2_vl":
        mlp = 2 * _linear(n, dim, int(dim * vision_config.mlp_ratio))
    elif kind == "qwen2_5_vl":
        mlp = 3 * _linear(n, dim, int(vision_config.intermediate_size))
    else:
        mlp = 2 * _linear(n, dim, int(vision_config.intermediate_size))
    for layer in range(int(vision_config.depth)):
        attn = sum(2 * (2 * heads * s * s * d) for s in qwen_vision_segments(vision_config, grids, layer))
        total += _linear(n, dim, 3 * dim) + _linear(n, dim, dim) + attn + mlp
    merged = n // (merge * merge)
    wide = dim * merge * merge
    out = int(vision_config.hidden_size if kind == "qwen2_vl" else vision_config.out_hidden_size)
    mergers = 1 + (len(getattr(vision_config, "deepstack_visual_indexes", None) or ()) if kind == "qwen3_vl" else 0)
    total += mergers * (_linear(merged, wide, wide) + _linear(merged, wide, out))
    return total


def qwen_vision_scoring_flops(vision_config: Any, grid_thw: Any, layer: int) -> int:
    """Extra FLOPs of recomputing Qwen ViT block ``layer``'s attention map for importance scoring.

    :func:`vflowopt.signals.qwen_vision.qwen_vision_attention_probs` re-runs the fused qkv projection on all
    patches and Q Kᵀ within each attention segment of that block. FLOPs = 2 x multiply-adds.
    """
    dim = _qwen_dim(vision_config)
    n = sum(t * h * w for t, h, w in _grid_rows(grid_thw))
    layer = int(layer) % int(vision_config.depth)
    return _linear(n, dim, 3 * dim) + sum(2 * s * s * dim for s in qwen_vision_segments(vision_config, grid_thw, layer))
