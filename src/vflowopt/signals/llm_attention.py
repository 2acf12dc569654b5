"""Attention rows of an LLM layer, taken from the tensors the layer's own attention call receives.

A layer chosen by a method gets a private copy of its config whose attention implementation is a
registered pass-through function: it hands the post-RoPE (and post q/k-norm) query and key to a
callback and then runs the original implementation unchanged, so outputs stay bit-identical and the
rest of the model keeps its own attention implementation. This works for every family without
re-implementing its rotary embedding.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

IMPLEMENTATION = "vflowopt_scores"

# The tap travels with the module: its private config carries (callback, original attention function),
# so copy.deepcopy(model) copies a working tap along with the module instead of leaving a dangling one.
_TAP_ATTR = "_vflowopt_tap"


def _original_function(module: nn.Module, name: str) -> Callable:
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(name, eager)


def _tapped_attention(module, query, key, value, attention_mask, **kwargs):
    callback, original = getattr(module.config, _TAP_ATTR)
    callback(module, query, key, value, attention_mask, kwargs.get("scaling"))
    return original(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(IMPLEMENTATION, _tapped_attention)


def tap_attention(module: nn.Module, callback: Callable) -> Callable[[], None]:
    """Route `module`'s attention call through `callback` first; returns the function that undoes it."""
    original_config = module.config
    name = original_config._attn_implementation
    if name == IMPLEMENTATION or hasattr(original_config, _TAP_ATTR):
        raise RuntimeError("this attention module is already tapped")
    private = copy.copy(original_config)
    private._attn_implementation = IMPLEMENTATION
    setattr(private, _TAP_ATTR, (callback, _original_function(module, name)))  # resolved once, not every call
    module.config = private
    return functools.partial(_untap, module, original_config)


def _untap(module: nn.Module, original_config) -> None:
    module.config = original_config


def attention_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    rows: torch.Tensor,
    scaling: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged attention probabilities of query positions `rows` (B, r) over all keys: (B, r, K).

    query (B, H, Q, d) and key (B, Hkv, K, d) as the attention function receives them (grouped-query
    heads are expanded). Causal by position (keys after a row's own position get no weight); a 4-D
    `mask` (bool: True = attend, or additive float) is applied on top. Computed in float32.
    """
    b, heads, _, dim = query.shape
    scaling = dim**-0.5 if scaling is None else scaling
    idx = rows.to(query.device)
    q = torch.gather(query, 2, idx[:, None, :, None].expand(b, heads, idx.shape[1], dim)).float()
    k = key.float()
    if k.shape[1] != heads:
        k = k.repeat_interleave(heads // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, r, K)
    n_keys = k.shape[2]
    offset = n_keys - query.shape[2]  # keys already in the cache before these queries
    key_pos = torch.arange(n_keys, device=query.device)
    allowed = key_pos[None, None, :] <= (idx[:, :, None] + offset)
    if mask is not None:
        m = mask if mask.shape[0] == b else mask.expand(b, *mask.shape[1:])
        m = torch.gather(m[:, :1], 2, idx[:, None, :, None].expand(b, 1, idx.shape[1], m.shape[-1]))
        if m.dtype == torch.bool:
            allowed = allowed[:, None] & m
        else:
            scores = scores + m.float()
            allowed = allowed[:, None]
    else:
        allowed = allowed[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=1)
