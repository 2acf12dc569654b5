"""The vision-encoder pruning point (V): tokens dropped (FlowCut) or merged (ToMe) between ViT layers.

An object of its own, owned by the PruningEngine (which keeps the LLM side): it owns the state of one
image pass through the vision tower and installs its hooks through the engine. Hooks on the vision
layers drop rows (and, for Qwen ViTs, their rotary embeddings and cu_seqlens segments); a method that
merges (a `VisionMerge`) has the removed rows averaged into kept rows first, which keep their own
position, and may set a per-key attention bias that later layers receive through their additive
attention mask; a pre-hook on the projector scatters the survivors back to full length so the model's
placeholder count still matches, and the pre-LLM point then drops the tokens whose ViT tokens were
dropped.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ConfigError, PruningError
from ..methods.base import PruningMethod, VisionMerge, VisionState, merged_rows
from ..models.base import ModelAdapter, TokenLayout, VitMaps, join_vit_maps
from ..ops.sequence import gather_seq
from ..signals.llm_attention import tap_attention


@dataclass
class _VitRun:
    """One image pass through the vision encoder with tokens dropped inside it (the V point)."""

    state: VisionState | None = None
    stale: torch.Tensor | None = None  # full-length rows; a dropped row holds its value when dropped
    pruned: bool = False
    sliced: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)  # pending (layer, q, k, v) from the attention taps
    kept: object = None  # ViT-level keep map (image order, prefix removed), set at the end of the pass
    key_bias: torch.Tensor | None = None  # (n_crops, n) added to every later layer's attention logits per key


class VisionPoint:
    """The V pruning point of one attached method: its hooks and the state of the current image pass."""

    def __init__(self, adapter: ModelAdapter, method: PruningMethod):
        reason = adapter.vision_pruning_unsupported()
        if reason is not None:
            raise ConfigError(f"{type(method).__name__} prunes inside the vision encoder, which this "
                              f"{adapter.family} model does not allow: {reason}")
        n_vit = len(adapter.vision_layers)
        bad = [i for i in (*method.vision_prune_layers, *method.vision_tap_layers) if not 0 <= i < n_vit]
        if bad:
            raise ConfigError(f"vision layer indices {bad} are outside this vision encoder's {n_vit} layers")
        self.adapter = adapter
        self.method = method
        self._vit: _VitRun | None = None
        self.seconds = 0.0  # time spent scoring and dropping in the current image pass

    def install(self, hook: Callable[[nn.Module, Callable, bool], None]) -> list[Callable[[], None]]:
        """Registers the V point's hooks through `hook(module, fn, pre)`; returns the attention untaps."""
        a = self.adapter
        untaps = []
        for tower in a.vision_towers:
            untaps += [tap_attention(a.vision_attention_of(tower, i), self._vit_tap(i))
                       for i in self.method.vision_tap_layers]
            for i, layer in enumerate(a.vision_layers_of(tower)):
                hook(layer, self._vit_layer_hook(i), True)
        for module in a.vision_projectors():
            hook(module, self._on_projector_pre, True)
        return untaps

    def start(self, prune: bool) -> None:
        """A vision-tower pass begins: pruned when it encodes the prompt's images or videos (inside
        get_image_features / get_video_features), not when the tower is called directly."""
        self._vit = _VitRun() if prune else None
        self.seconds = 0.0

    def pass_keep_map(self) -> VitMaps | None:
        """The current pass's ViT-level keep map (1 = the token survived; image order, prefix removed),
        all ones when nothing was dropped, None when the pass did not go through the hooked layers. Read
        while the adapter still describes this pass (before the next pass starts)."""
        vit = self._vit
        if vit is None or vit.state is None:
            return None
        state = vit.state
        if state.flat:
            flat = torch.zeros(sum(state.full), device=state.ids.device)
            flat[state.ids] = 1.0
            return self.adapter.vit_running_maps(flat)
        vit_map = torch.zeros(state.ids.shape[0], state.full[0], device=state.ids.device)
        vit_map.scatter_(1, state.ids, 1.0)
        return vit_map[:, state.prefix :]

    def finish_passes(self, maps: list, layout: TokenLayout) -> torch.Tensor | None:
        """The (B, Nv) keep map of the visual tokens of several passes (images, then videos) from their
        `pass_keep_map`s; None when no pass dropped anything."""
        self._vit = None
        if any(m is None for m in maps) or all(_all_kept(m) for m in maps):
            return None
        joined = join_vit_maps(maps)
        if joined is None:
            raise PruningError("the image and video passes of this prompt ran different ViT sequence lengths; "
                               "prune images and videos in separate prompts")
        return torch.nan_to_num(layout.pack(joined), nan=1.0) >= 0.5

    def reset(self) -> None:
        self._vit = None
        self.seconds = 0.0

    def _vit_tap(self, layer: int):
        # a partial of a bound method, not a closure: copy.deepcopy(model) then copies the engine too
        return functools.partial(self._vit_tap_call, layer)

    def _vit_tap_call(self, layer: int, module, query, key, value, mask, scaling):
        vit = self._vit
        if vit is not None:
            vit.calls.append((layer, query, key, value))

    def _vit_flush(self, vit: _VitRun) -> None:
        """Hand the attention inputs collected since the last flush to the method (Qwen-VL's non-flash
        attention is called once per segment: the pieces are joined back along the sequence)."""
        if not vit.calls:
            return
        t0 = time.perf_counter()
        calls, vit.calls = vit.calls, []
        layer = calls[0][0]
        q, k, v = (torch.cat([c[i] for c in calls], dim=2) if len(calls) > 1 else calls[0][i] for i in (1, 2, 3))
        self.method.on_vision_qkv(layer, q, k, v, vit.state)
        self.seconds += time.perf_counter() - t0

    def _vit_layer_hook(self, layer: int):
        # a partial of a bound method, not a closure: copy.deepcopy(model) then copies the engine too
        return functools.partial(self._vit_layer_hook_call, layer)

    def _vit_layer_hook_call(self, layer: int, module, args, kwargs):
        vit = self._vit
        if vit is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if vit.state is None:
            a = self.adapter
            if a.vit_flat:
                lengths = a.vit_image_lengths()
                ids = torch.arange(hidden.shape[0], device=hidden.device)
                vit.state = VisionState(ids=ids, flat=True, group=a.vit_group, lengths=list(lengths),
                                        full=list(lengths))
            else:
                n_crops, n = hidden.shape[:2]
                ids = torch.arange(n, device=hidden.device).expand(n_crops, n)
                vit.state = VisionState(ids=ids, flat=False, prefix=a.vit_prefix_tokens, full=[n] * n_crops)
        self._vit_flush(vit)
        if layer in self.method.vision_prune_layers:
            t0 = time.perf_counter()
            decision = self.method.at_vision_layer(layer, vit.state)
            merge = decision if isinstance(decision, VisionMerge) else None
            keep = merge.keep if merge is not None else decision
            if keep is not None and not bool(keep.all()):
                if merge is not None:
                    hidden = _merge_rows(vit.state, hidden, merge)
                hidden = self._vit_drop(vit, hidden, keep)
                if merge is not None and merge.key_bias is not None:
                    vit.key_bias = self._checked_bias(vit.state, merge.key_bias)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            self.seconds += time.perf_counter() - t0
        if vit.pruned and vit.state.flat:
            self.adapter.slice_vision_layer_inputs(kwargs, vit.state.ids, vit.sliced)
        if vit.key_bias is not None:
            args, kwargs = _add_key_bias(module, args, kwargs, vit.key_bias, hidden)
        return args, kwargs

    @staticmethod
    def _checked_bias(state: VisionState, bias: torch.Tensor) -> torch.Tensor:
        if state.flat:
            raise PruningError("a per-key attention bias needs a batched vision tower (CLIP, SigLIP); this one runs "
                               "all images as one flat sequence")
        if tuple(bias.shape) != tuple(state.ids.shape):
            raise PruningError(f"vision key bias of shape {tuple(bias.shape)} for {tuple(state.ids.shape)} tokens")
        return bias.detach().float()

    def _vit_drop(self, vit: _VitRun, hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        state = vit.state
        keep = keep.to(hidden.device).bool()
        if keep.shape != state.ids.shape:
            raise PruningError(f"vision keep mask of shape {tuple(keep.shape)} for {tuple(state.ids.shape)} tokens")
        if vit.stale is None:
            vit.stale = hidden.detach().clone() if not vit.pruned else vit.stale
        if state.flat:
            g = state.group
            grouped = keep.view(-1, g)
            if not bool((grouped == grouped[:, :1]).all()):
                raise PruningError(f"pruning inside a merging ViT must keep or drop whole groups of {g} tokens")
            vit.stale[state.ids[~keep]] = hidden[~keep].detach()
            bounds = [0]
            for n in state.lengths:
                bounds.append(bounds[-1] + n)
            state.lengths = [int(keep[s:e].sum()) for s, e in zip(bounds[:-1], bounds[1:])]
            state.ids = state.ids[keep]
            hidden = hidden[keep]
        else:
            counts = keep.sum(-1)
            if not bool((counts == counts[0]).all()):
                raise PruningError("pruning inside a batched ViT must keep the same number of tokens in every crop")
            if state.prefix and not bool(keep[:, : state.prefix].all()):
                raise PruningError("the ViT's prefix (CLS) tokens must be kept")
            b_idx, r_idx = (~keep).nonzero(as_tuple=True)
            vit.stale[b_idx, state.ids[b_idx, r_idx]] = hidden[b_idx, r_idx].detach()
            sel = keep.nonzero()[:, 1].view(keep.shape[0], -1)
            state.ids = torch.gather(state.ids, 1, sel)
            hidden = gather_seq(hidden, sel, 1)
            if vit.key_bias is not None:  # an earlier bias follows the kept rows
                vit.key_bias = torch.gather(vit.key_bias, 1, sel.to(vit.key_bias.device))
        vit.pruned = True
        vit.sliced = {}
        return hidden

    def _on_projector_pre(self, module, args, kwargs):
        """The projector (or a merger) reads a ViT hidden state: scatter the surviving rows back to full
        length (dropped rows hold their last value; the LLM never sees them), so the features still match
        the image placeholders and every reshaping the model does (anyres packing, merging)."""
        vit = self._vit
        if vit is None or vit.state is None:
            return None
        self._vit_flush(vit)
        state = vit.state
        if not vit.pruned:
            return None
        x = args[0] if args else kwargs["hidden_states"]
        full = vit.stale.to(x.dtype)
        if state.flat:
            if x.shape[0] != state.ids.shape[0]:
                return None
            out = full.clone()
            out[state.ids.to(x.device)] = x
        else:
            ids, p = state.ids, state.prefix
            if x.shape[1] == ids.shape[1]:
                out = full.clone()
            elif p and x.shape[1] == ids.shape[1] - p:  # the model removed the CLS row ("default" strategy)
                out, ids = full[:, p:].clone(), ids[:, p:] - p
            else:
                return None
            if out.shape[-1] != x.shape[-1]:  # another hidden size (e.g. several layers): not ours
                return None
            out.scatter_(1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]).to(x.device), x)
        if args:
            return (out, *args[1:]), kwargs
        kwargs["hidden_states"] = out
        return args, kwargs

    # -- the LLM's input ----------------------------------------------------------------------------


def _all_kept(vit_map: VitMaps) -> bool:
    return all(bool((m >= 0.5).all()) for m in (vit_map if isinstance(vit_map, list) else [vit_map]))


# -- merging rows (VisionMerge) -------------------------------------------------------------------------
def _merge_rows(state: VisionState, hidden: torch.Tensor, merge: VisionMerge) -> torch.Tensor:
    """Each kept row that receives removed rows becomes the weighted mean Σ w·x / Σ w of itself and them
    (float32); every other row is returned untouched. Batched (n_crops, n, D) rows merge within their crop."""
    shape = tuple(state.ids.shape)
    for name in ("keep", "into", "weight"):
        if tuple(getattr(merge, name).shape) != shape:
            raise PruningError(f"VisionMerge.{name} of shape {tuple(getattr(merge, name).shape)} for {shape} tokens")
    dev = hidden.device
    keep = merge.keep.to(dev).bool().reshape(-1)
    into = merge.into.to(dev).long()
    weight = merge.weight.to(dev).float().reshape(-1)
    row = torch.arange(keep.numel(), device=dev)
    crop = row // shape[1] if not state.flat else torch.zeros_like(row)
    if not state.flat:  # crop-local targets -> indices into the (n_crops * n) rows
        into = torch.where(into >= 0, into + shape[1] * torch.arange(shape[0], device=dev).unsqueeze(1), into)
    into = into.reshape(-1)
    src = ~keep & (into >= 0)
    if not bool(src.any()):
        return hidden
    tgt = into[src]
    if bool((tgt >= keep.numel()).any()) or not bool(keep[tgt].all()) or bool((crop[tgt] != crop[src]).any()):
        raise PruningError("VisionMerge.into must name a kept row (of the same crop) for every merged row")
    if not bool((weight[src] > 0).all()) or not bool((weight[tgt] > 0).all()):
        raise PruningError("VisionMerge.weight must be positive for every merged and receiving row")
    rows = hidden.reshape(-1, hidden.shape[-1])
    received, means = merged_rows(rows, weight, torch.where(src, into, row))
    out = rows.clone()
    out[received] = means.to(rows.dtype)
    return out.view_as(hidden)


@functools.cache
def _mask_position(layer_type: type) -> int | None:
    """Index of `attention_mask` among the positional parameters of a vision layer's forward."""
    names = [p.name for p in inspect.signature(layer_type.forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return names.index("attention_mask") - 1 if "attention_mask" in names else None  # minus `self`


def _add_key_bias(module: nn.Module, args: tuple, kwargs: dict, bias: torch.Tensor, like: torch.Tensor):
    """The layer's additive attention mask plus `bias` (n_crops, n) on every query's logit for each key."""
    dtype = like.dtype
    add = bias.to(device=like.device, dtype=dtype)[:, None, None, :]
    pos = _mask_position(type(module))
    positional = "attention_mask" not in kwargs and pos is not None and pos < len(args)
    mask = args[pos] if positional else kwargs.get("attention_mask")
    if mask is None:
        mask = add
    elif mask.dtype == torch.bool:  # True = attend
        mask = torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype) + add
    else:
        mask = mask + add.to(mask.device)
    if positional:
        return (*args[:pos], mask, *args[pos + 1 :]), kwargs
    kwargs["attention_mask"] = mask
    return args, kwargs
