"""Hooks that prune visual tokens inside a stock transformers model, on this instance only.

Pruning points: between vision-encoder layers (vision_point.py, an object the engine owns), before the LLM
(a pre-hook on the language model: the merged `inputs_embeds`) and at the input of chosen decoder
layers (pre-hooks on the layers). Dropped tokens leave the hidden
states, the positions, the masks and so every later layer's KV cache. Decode steps select nothing:
each layer's cache already holds what that layer saw, and kept tokens keep their original positions.
"""

from __future__ import annotations

import functools
import inspect
import time
import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from ..errors import ConfigError, PruningError
from ..methods.base import PrefillContext, PruningMethod, Selection
from ..models.base import (
    FeatureCountMismatch,
    ModelAdapter,
    TokenLayout,
    VisualTokens,
    VitMaps,
    frame_units,
    image_mask_from,
    join_vit_maps,
    merge_layouts,
)
from ..ops.sequence import complement_keep, gather_mask, gather_seq, positions_after_drop
from ..signals.llm_attention import tap_attention
from ..signals.vision_keys import vision_keys
from .compat import cache_from_kwargs, cache_from_output
from .stats import KeptTokens, PruneStats
from .vision_point import VisionPoint


@dataclass
class _Stage:
    start: int  # first LLM layer of the stage (0 = from the LLM's input)
    rel1: torch.Tensor | None  # (B, S) indices into the LLM-input sequence; None = all of it
    visual: int  # prunable visual tokens present (per sample)


@dataclass
class _Plan:
    """The result of a prefill that decode steps rely on."""

    prompt_len: int  # L0: the full prompt, before pruning
    llm_len: int  # S1: tokens that entered the LLM
    keep1: torch.Tensor | None  # (B, S1) indices into the prompt; None when nothing was dropped
    stages: list[_Stage]
    shift: int  # L0 - S1, subtracted from positions in compact mode
    cache: weakref.ref | None = None
    # (B|1,) first position after the prompt in full-sequence coordinates (max rotary position + 1)
    next_pos: torch.Tensor | None = None


@dataclass
class _Run:
    """Per-forward scratch."""

    prefill: bool
    plan: _Plan
    ctx: PrefillContext | None = None
    cur_ids: torch.Tensor | None = None  # (B, n) indices into Nv of visual tokens present
    cur_pos: torch.Tensor | None = None  # (B, n) their positions in the current sequence
    cur_len: int = 0
    sliced: dict = field(default_factory=dict)
    pruning_s: float = 0.0


@dataclass
class _Pass:
    """The signals of one vision-tower pass (the images of a forward, or its videos), kept until the
    prefill that uses them: a prompt with images and videos has two passes, handed to the method as one."""

    kind: str | None  # "image", "video", or None for a vision-tower call outside get_*_features
    units: int  # rows the tower saw (batched towers: crops / frames), or images / videos (flat towers)
    vit_tokens: int  # flat towers: ViT tokens of the pass (0 for batched towers)
    adapter_state: object = None
    vit_keep: VitMaps | None = None  # methods pruning inside the ViT: the pass's ViT-level keep map
    method_state: object = None  # and what the method's before_llm needs of the pass (vision_pass_state)
    pixels: torch.Tensor | None = None
    attention: VitMaps | None = None
    keys: VitMaps | None = None


class PruningEngine:
    def __init__(self, model: nn.Module, adapter: ModelAdapter, method: PruningMethod, positions: str = "keep"):
        self.model = model
        self.adapter = adapter
        self.method = method
        self.compact = positions == "compact"
        self.stats = PruneStats()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fwd: dict | None = None
        self._plan: _Plan | None = None
        self._run: _Run | None = None
        self._prune_layers = set(method.llm_layers)
        self._first_layer = min(method.llm_layers) if method.llm_layers else None
        if self._first_layer is not None and self._first_layer < adapter.min_llm_prune_layer:
            raise ConfigError(
                f"this {adapter.family} model can prune inside the LLM only from layer "
                f"{adapter.min_llm_prune_layer} on (earlier layers still add visual features at the image "
                f"positions); got pruning layers {sorted(method.llm_layers)}"
            )
        self._vision_s = 0.0
        self._pass_kind: str | None = None  # set while get_image_features / get_video_features runs
        self._media_kwargs: dict = {}
        self._passes: list[_Pass] = []
        self._unwraps: list = []
        self._untaps: list = []
        # the V point (dropping tokens between vision-encoder layers), for methods that declare one
        self.vision = VisionPoint(adapter, method) if method.vision_prune_layers or method.vision_tap_layers else None
        n_llm = adapter.num_llm_layers
        bad = [i for i in (*method.llm_layers, *method.llm_attention_layers) if not 0 <= i < n_llm]
        if bad:
            raise ConfigError(f"LLM layer indices {bad} are outside this model's {n_llm} decoder layers")

    # -- installation --------------------------------------------------------------------------
    def attach(self) -> None:
        a = self.adapter
        try:
            self._hook(a.base, self._on_base_pre, pre=True)
            self._wrap_image_features()
            for tower in a.vision_towers:
                self._hook(tower, self._on_vision_pre, pre=True)
                if self.method.vision_attention_layer is not None:
                    attn = a.vision_attention_of(tower, self.method.vision_attention_layer)
                    self._hook(attn, self._on_vision_attention, pre=True)
            self._hook(a.text_model, self._on_text_pre, pre=True)
            self._hook(a.text_model, self._on_text_post, pre=False)
            if self._first_layer is not None:
                for i in range(self._first_layer, a.num_llm_layers):
                    self._hook(a.decoder_layers[i], self._layer_hook(i), pre=True)
            for i in self.method.llm_attention_layers:
                self._untaps.append(tap_attention(a.decoder_layers[i].self_attn, self._attention_tap(i)))
            if self.vision is not None:
                self._untaps.extend(self.vision.install(self._hook))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for unwrap in self._unwraps:
            unwrap()
        self._unwraps.clear()
        self._passes = []
        for untap in self._untaps:
            untap()
        self._untaps.clear()
        self._fwd = self._plan = self._run = None
        if self.vision is not None:
            self.vision.reset()
        self.method.reset()

    def _wrap_image_features(self) -> None:
        """generate() encodes images and videos before prefill and then drops `image_sizes` & co from the
        forward; instance-level wrappers (signature kept, as generate() inspects it) record them and tell
        the vision-tower hooks which kind of pass runs."""
        base = self.adapter.base
        for kind, names in (("image", self.adapter.image_kwargs), ("video", self.adapter.video_kwargs)):
            attr = f"get_{kind}_features"
            if hasattr(base, attr):
                wrapper = _FeaturesWrapper(self, base, attr, kind, names)
                setattr(base, attr, wrapper)
                self._unwraps.append(wrapper.unwrap)

    def _hook(self, module: nn.Module, fn, pre: bool) -> None:
        if pre:
            self._handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(fn, with_kwargs=True))

    # -- signals from the vision side -------------------------------------------------------------
    def _on_base_pre(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        a = self.adapter
        images = image_mask_from(module, input_ids, embeds, a.image_token_id)
        videos = image_mask_from(module, input_ids, embeds, a.video_token_id) if a.video_token_id is not None else None
        if videos is not None and not bool(videos.any()):
            videos = None
        mask = images if videos is None else (videos if images is None else images | videos)
        self._fwd = {  # what get_*_features recorded fills the gaps at prefill (_layout)
            "image_mask": mask,
            "images": images,
            "videos": videos,
            "kwargs": {k: kwargs.get(k) for k in (*a.image_kwargs, *a.video_kwargs)},
        }
        return self._decode_positions(input_ids, args, kwargs)

    def _decode_positions(self, input_ids, args: tuple, kwargs: dict):
        """A decode step on a pruned cache without `position_ids` (a manual loop): the model would
        derive positions from the shorter cache (Qwen-VL: cache length + rope_deltas); give it the
        full-sequence positions instead, as generate() does."""
        plan = self._plan
        past = cache_from_kwargs(kwargs)
        if (self.compact or plan is None or plan.next_pos is None or past is None or plan.cache is None
                or plan.cache() is not past or kwargs.get("position_ids") is not None):
            return None
        past_len = past.get_seq_length()
        ref = input_ids if input_ids is not None else kwargs.get("inputs_embeds")
        if past_len == 0 or ref is None:
            return None
        b, q = ref.shape[0], ref.shape[1]
        start = plan.next_pos.to(ref.device) + (past_len - plan.llm_len)
        kwargs["position_ids"] = (start.view(-1, 1) + torch.arange(q, device=ref.device)).expand(b, q)
        return args, kwargs

    def _on_vision_pre(self, module, args, kwargs):
        pixel_values = kwargs.get("pixel_values", args[0] if args else None)
        kind = self._pass_kind
        if kind is None or any(p.kind == kind for p in self._passes):
            self._passes = []  # the passes of a new forward (or a direct call of the tower)
            self._vision_s = 0.0
        a = self.adapter
        self._end_vision_pass()
        a.on_vision_input(args, kwargs)
        units = len(a.vit_image_lengths()) if a.vit_flat else int(pixel_values.shape[0])
        vpass = _Pass(kind=kind, units=units, vit_tokens=int(pixel_values.shape[0]) if a.vit_flat else 0,
                      adapter_state=a.vision_pass_state())
        self._passes.append(vpass)
        if self.vision is not None:
            self.method.reset()  # a method pruning inside the ViT keeps per-pass state (one pass per prompt)
            self.vision.start(prune=kind is not None)
        if self.method.needs_pixels:
            vpass.pixels = pixel_values

    def _end_vision_pass(self) -> None:
        """A method pruning inside the ViT: keep what the last pass left (read while the adapter still
        describes that pass) before the method is reset for the next one."""
        if self.vision is None or not self._passes or self._passes[-1].vit_keep is not None:
            return
        last = self._passes[-1]
        last.vit_keep = self.vision.pass_keep_map()
        last.method_state = self.method.vision_pass_state()

    def _on_vision_attention(self, module, args, kwargs):
        if not self._passes:
            return
        t0 = time.perf_counter()
        vpass = self._passes[-1]
        if self.method.needs_vision_keys:
            vpass.keys = vision_keys(self.adapter, module, args, kwargs)
        vpass.attention = self.adapter.vision_attention_probs(module, args, kwargs)
        self._vision_s += time.perf_counter() - t0

    def _passes_for(self, images: bool, videos: bool) -> list[_Pass]:
        """The last image pass and the last video pass, as the prompt needs them (images first)."""
        out = []
        for kind, needed in (("image", images), ("video", videos)):
            if needed:
                found = [p for p in self._passes if p.kind == kind] or [p for p in self._passes if p.kind is None]
                out.append(found[-1] if found else None)
        return out

    def _deliver_signals(self, passes: list[_Pass]) -> None:
        """Hand the method the vision-side signals of this prompt's passes, joined in layout order."""
        m = self.method
        t0 = time.perf_counter()
        if self.vision is None:
            m.reset()
        else:
            m.join_vision_passes([p.method_state for p in passes])
        self.adapter.restore_vision_passes([p.adapter_state for p in passes])
        if m.needs_pixels:
            m.on_pixels(_join([p.pixels for p in passes]))
        if m.vision_attention_layer is not None:
            if m.needs_vision_keys:
                m.on_vision_keys(_join([p.keys for p in passes]))
            m.on_vision_attention(_join([p.attention for p in passes]))
        self._vision_s += time.perf_counter() - t0

    # -- the V point: dropping tokens between vision-encoder layers ------------------------------
    def _on_text_pre(self, module, args, kwargs):
        fwd, self._fwd = self._fwd, None
        self._run = None
        past = cache_from_kwargs(kwargs)
        past_len = past.get_seq_length() if past is not None else 0
        image_mask = fwd["image_mask"] if fwd else None
        # a decode step whose new token happens to be a placeholder id encodes nothing: not a prefill
        fresh = past_len == 0 or bool(self._passes)
        if image_mask is not None and bool(image_mask.any()) and fresh:
            if self._first_layer is not None and past is not None and not isinstance(past, DynamicCache):
                raise PruningError(
                    f"pruning inside the LLM needs the default dynamic KV cache, got {type(past).__name__} "
                    "(e.g. cache_implementation='static'); drop that option or use a method that prunes "
                    "only before the LLM"
                )
            if past_len > 0:
                raise PruningError(
                    "vflowopt cannot prune image tokens appended to a non-empty KV cache; start "
                    "generation from the full prompt (or call handle.remove() for this call)"
                )
            return args, self._prefill(kwargs, image_mask, fwd)
        if past_len == 0:  # a fresh prompt without images: nothing to prune
            self._plan = None
            self.method.reset()
            embeds = kwargs.get("inputs_embeds")
            n = int(embeds.shape[1]) if embeds is not None else 0
            self.stats = PruneStats(
                prompt_tokens=n, tokens_into_llm=n, batch_size=int(embeds.shape[0]) if embeds is not None else 0,
                visual_tokens_per_layer=[0] * self.adapter.num_llm_layers,
                kv_tokens_per_layer=[n] * self.adapter.num_llm_layers,
            )
            return None
        plan = self._plan
        if plan is None or plan.cache is None or plan.cache() is not past:
            return None  # a cache this engine did not prune
        return args, self._decode(kwargs, plan, past_len)

    def _prefill(self, kwargs: dict, image_mask: torch.Tensor, fwd: dict):
        """The pre-LLM point: select, then remove the dropped tokens from everything the LLM reads."""
        images, videos = fwd["images"], fwd["videos"]
        has_images = images is not None and bool(images.any())
        has_videos = videos is not None
        self._end_vision_pass()
        passes = self._passes_for(has_images, has_videos)
        self._passes = []
        self._check_signals_present(passes, has_images, has_videos)
        t0 = time.perf_counter()
        if all(p is not None for p in passes):
            self._deliver_signals(passes)
        ctx = self._context(kwargs, image_mask, fwd, passes)
        sel, keep_vis = self._select_before_llm(ctx)
        self._replace_merged(kwargs, ctx, sel, keep_vis)
        embeds = kwargs["inputs_embeds"]
        full_pos = kwargs.get("position_ids")  # the prompt's positions, before anything is dropped
        if full_pos is None:
            full_pos = torch.arange(embeds.shape[1], device=embeds.device).view(1, embeds.shape[1])
        keep1 = self._drop_from_llm_inputs(kwargs, ctx, keep_vis, full_pos)
        self._run = self._prefill_run(ctx, keep_vis, keep1, full_pos)
        vision_s = self.vision.seconds if self.vision is not None else 0.0
        self._run.pruning_s = self._vision_s + vision_s + time.perf_counter() - t0
        self.stats = self._prefill_stats(ctx, sel, keep_vis, self._run.plan)
        self.stats.method_info = dict(self.method.diagnostics())
        self.stats.kept = _kept_record(ctx, sel, keep_vis)
        return kwargs

    def _check_signals_present(self, passes: list, has_images: bool, has_videos: bool) -> None:
        """The vision-side signals a method declared can only come from the vision tower's own pass."""
        m = self.method
        if has_videos and (reason := self.adapter.video_unsupported()) is not None:
            raise PruningError(f"this prompt has video tokens, which cannot be pruned here: {reason}; run it "
                               "without pruning (handle.remove()) or give frames as images")
        missing = any(p is None for p in passes)
        if missing and m.vision_attention_layer is not None:
            raise PruningError(
                "this method scores tokens in the vision encoder, but the image features of this "
                "forward were not computed by the model's vision tower while pruning was attached; "
                "pass pixel_values (not precomputed features)"
            )
        if m.vision_prune_layers and (missing or any(p.vit_keep is None for p in passes)):
            raise PruningError(
                "this method prunes inside the vision encoder, but the image features of this forward were "
                "not computed by the model's vision tower (through get_image_features) while pruning was "
                "attached; pass pixel_values (not precomputed features)"
            )

    def _context(self, kwargs: dict, image_mask: torch.Tensor, fwd: dict, passes: list) -> PrefillContext:
        """The layout of the visual tokens and what the method may read about this prefill."""
        embeds = kwargs["inputs_embeds"]
        layout = self._layout(fwd, passes)
        if getattr(self.method.config, "video_scope", "video") == "frame" and bool(layout.tokens.video.any()):
            layout = TokenLayout(tokens=frame_units(layout.tokens), pack=layout.pack)
        mask2d = kwargs.get("attention_mask")
        mask2d = mask2d if isinstance(mask2d, torch.Tensor) and mask2d.dim() == 2 else None
        ctx = PrefillContext(layout=layout, features=gather_seq(embeds, layout.tokens.seq_index, 1),
                             image_mask=image_mask, embeds=embeds, attention_mask=mask2d)
        if self.vision is not None:
            ctx.vision_kept = self.vision.finish_passes([p.vit_keep if p else None for p in passes], layout)
        return ctx

    def _select_before_llm(self, ctx: PrefillContext) -> tuple[Selection, torch.Tensor]:
        """The method's selection and the (B, Nv) keep mask it implies: non-prunable tokens always
        kept, tokens dropped inside the ViT never."""
        tokens = ctx.layout.tokens
        sel = self.method.before_llm(ctx)
        keep_vis = sel.keep | ~tokens.prunable
        if ctx.vision_kept is not None:
            keep_vis = keep_vis & (ctx.vision_kept | ~tokens.prunable)
        return sel, keep_vis

    @staticmethod
    def _replace_merged(kwargs: dict, ctx: PrefillContext, sel: Selection, keep_vis: torch.Tensor) -> None:
        """Kept tokens that carry merged (recycled) features get them in the LLM's input embeddings."""
        if sel.replaced is None or not bool(sel.replaced.any()):
            return
        embeds, seq_index = kwargs["inputs_embeds"], ctx.layout.tokens.seq_index
        b_idx, v_idx = (sel.replaced & keep_vis).nonzero(as_tuple=True)
        embeds = embeds.clone()
        embeds[b_idx, seq_index[b_idx, v_idx]] = sel.features[b_idx, v_idx].to(embeds.dtype)
        kwargs["inputs_embeds"] = embeds

    def _drop_from_llm_inputs(self, kwargs: dict, ctx: PrefillContext, keep_vis: torch.Tensor,
                              full_pos: torch.Tensor) -> torch.Tensor | None:
        """Removes the dropped tokens from the embeddings, positions, mask and the family's extra
        inputs; returns the kept prompt indices (B, S1), or None when nothing was dropped."""
        embeds = kwargs["inputs_embeds"]
        b, l0, _ = embeds.shape
        drop = torch.zeros(b, l0, dtype=torch.bool, device=embeds.device)
        drop.scatter_(1, ctx.layout.tokens.seq_index, ~keep_vis)
        if not bool(drop.any()):
            return None
        keep1 = complement_keep(l0, drop, b)
        kwargs["inputs_embeds"] = gather_seq(embeds, keep1, 1)
        kwargs["position_ids"] = (positions_after_drop(full_pos, keep1) if self.compact
                                  else gather_seq(full_pos, keep1, -1, batch_dim=-2))
        mask = kwargs.get("attention_mask")
        if mask is None:
            # Gapped positions without a mask or cache look like packed sequences to transformers.
            kwargs["attention_mask"] = torch.ones(b, keep1.shape[1], dtype=torch.long, device=embeds.device)
        elif isinstance(mask, dict):
            raise PruningError(
                "pre-built attention masks (static caches / compiled generation) are not supported "
                "with pruning; use the default dynamic cache"
            )
        elif mask.dim() == 2:
            kwargs["attention_mask"] = gather_seq(mask, keep1, 1)
        else:
            kwargs["attention_mask"] = gather_mask(mask, keep1, keep1)
        self.adapter.slice_llm_inputs(kwargs, keep1)
        return keep1

    def _prefill_run(self, ctx: PrefillContext, keep_vis: torch.Tensor, keep1: torch.Tensor | None,
                     full_pos: torch.Tensor) -> _Run:
        """The plan decode steps rely on, and the per-forward state the in-LLM stages start from."""
        embeds, tokens = ctx.embeds, ctx.layout.tokens
        b, l0 = embeds.shape[:2]
        s1 = keep1.shape[1] if keep1 is not None else l0
        # the first position after the prompt, in full-sequence coordinates
        next_pos = self.adapter.rotary_positions(full_pos).amax(-1)
        while next_pos.dim() > 1:
            next_pos = next_pos.amax(0)
        ids = keep_vis.nonzero()[:, 1].view(b, -1)
        pos_now = torch.gather(tokens.seq_index, 1, ids)
        if keep1 is not None:
            inv = torch.full((b, l0), -1, dtype=torch.long, device=embeds.device)
            inv.scatter_(1, keep1, torch.arange(s1, device=embeds.device).expand(b, s1))
            pos_now = torch.gather(inv, 1, pos_now)
        kept_vis = int((keep_vis & tokens.prunable)[0].sum())
        plan = _Plan(prompt_len=l0, llm_len=s1, keep1=keep1, stages=[_Stage(0, None, kept_vis)], shift=l0 - s1,
                     next_pos=next_pos + 1)
        return _Run(prefill=True, plan=plan, ctx=ctx, cur_ids=ids, cur_pos=pos_now, cur_len=s1)

    @staticmethod
    def _prefill_stats(ctx: PrefillContext, sel: Selection, keep_vis: torch.Tensor, plan: _Plan) -> PruneStats:
        tokens = ctx.layout.tokens
        vision_stage = ([("vision encoder", int((ctx.vision_kept & tokens.prunable)[0].sum()))]
                        if ctx.vision_kept is not None else [])
        return PruneStats(
            visual_tokens=int(tokens.prunable[0].sum()), video_tokens=int((tokens.prunable & tokens.video)[0].sum()),
            prompt_tokens=plan.prompt_len,
            tokens_into_llm=plan.llm_len, batch_size=int(keep_vis.shape[0]),
            recycled_tokens=int((sel.replaced & keep_vis)[0].sum()) if sel.replaced is not None else 0,
            stages=vision_stage + [("before LLM", plan.stages[0].visual)],
        )

    def _layout(self, fwd: dict, passes: list) -> TokenLayout:
        """The adapter's layout of the prompt's images and videos; also when generate() expanded the batch
        after encoding them (beam search, num_return_sequences: each sample repeated k times in a row)."""
        images, videos = fwd["images"], fwd["videos"]
        # generate() encodes before the forward (and drops these arguments from it), a plain forward after
        # the base pre-hook: either way the wrappers' last record is this prompt's
        fwd_kwargs = {k: v if v is not None else self._media_kwargs.get(k) for k, v in fwd["kwargs"].items()}
        units = [p.units if p is not None else 0 for p in passes]  # 0: features given precomputed
        a = self.adapter

        def build(step: int) -> TokenLayout:
            img = images[::step] if images is not None and bool(images.any()) else None
            vid = videos[::step] if videos is not None else None
            if vid is None:
                return a.layout(img, fwd_kwargs, units[0])
            if img is None:
                return a.video_layout(vid, fwd_kwargs, units[-1])
            first = passes[0]
            return merge_layouts(a.layout(img, fwd_kwargs, units[0]), a.video_layout(vid, fwd_kwargs, units[1]),
                                 image_units=units[0], image_vit_tokens=first.vit_tokens if first else 0)

        try:
            return build(1)
        except FeatureCountMismatch:
            mask = fwd["image_mask"]
            b = mask.shape[0]
            for k in range(2, b + 1):
                if b % k or not bool((mask.view(b // k, k, -1) == mask[::k, None]).all()):
                    continue
                try:
                    layout = build(k)
                except FeatureCountMismatch:
                    continue
                t = layout.tokens
                tokens = VisualTokens(**{f: getattr(t, f).repeat_interleave(k, 0) for f in t.__dataclass_fields__})
                return TokenLayout(tokens=tokens, pack=lambda m, p=layout.pack, k=k: p(m).repeat_interleave(k, 0))
            raise

    def _decode(self, kwargs: dict, plan: _Plan, past_len: int):
        self._run = _Run(prefill=False, plan=plan)
        mask = kwargs.get("attention_mask")
        if plan.keep1 is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            head = gather_seq(mask[:, : plan.prompt_len], plan.keep1, 1)
            kwargs["attention_mask"] = torch.cat([head, mask[:, plan.prompt_len :]], dim=1)
        pos = kwargs.get("position_ids")
        if plan.shift:
            if pos is not None and self.compact:
                kwargs["position_ids"] = pos - plan.shift
            elif pos is None and not self.compact:
                q = kwargs["inputs_embeds"].shape[1]
                kwargs["position_ids"] = (
                    torch.arange(q, device=kwargs["inputs_embeds"].device) + past_len + plan.shift
                ).view(1, q)
        return kwargs

    def _on_text_post(self, module, args, kwargs, output):
        run, self._run = self._run, None
        if run is None or not run.prefill:
            return None
        plan = run.plan
        n_layers = self.adapter.num_llm_layers
        per_layer, kv = [], []
        for i in range(n_layers):
            stage = _stage_of(plan.stages, i)
            per_layer.append(stage.visual)
            kv.append(stage.rel1.shape[1] if stage.rel1 is not None else plan.llm_len)
        self.stats.visual_tokens_per_layer = per_layer
        self.stats.kv_tokens_per_layer = kv
        self.stats.pruning_ms = 1000.0 * run.pruning_s
        cache = cache_from_output(output)
        plan.cache = weakref.ref(cache) if cache is not None else None
        self._plan = plan if cache is not None else None
        self.method.reset()
        return None

    def _attention_tap(self, layer: int):
        # a partial of a bound method, not a closure: copy.deepcopy(model) then copies the engine too
        return functools.partial(self._attention_tap_call, layer)

    def _attention_tap_call(self, layer: int, module, query, key, value, mask, scaling):
        run = self._run
        if run is None or not run.prefill:
            return
        t0 = time.perf_counter()
        self._sync_ctx(run)
        self.method.on_llm_attention(run.ctx, layer, query, key, value, mask, scaling)
        run.pruning_s += time.perf_counter() - t0


    @staticmethod
    def _sync_ctx(run: _Run) -> None:
        run.ctx.visual_ids, run.ctx.visual_pos, run.ctx.seq_len = run.cur_ids, run.cur_pos, run.cur_len

    # -- decoder layers -------------------------------------------------------------------------------
    def _layer_hook(self, layer: int):
        # a partial of a bound method, not a closure: copy.deepcopy(model) then copies the engine too
        return functools.partial(self._layer_hook_call, layer)

    def _layer_hook_call(self, layer: int, module, args, kwargs):
        run = self._run
        if run is None:
            return None
        if run.prefill:
            return self._layer_prefill(layer, run, args, kwargs)
        return self._layer_decode(layer, run, args, kwargs)


    def _layer_prefill(self, layer: int, run: _Run, args: tuple, kwargs: dict):
        plan = run.plan
        if layer in self._prune_layers:
            t0 = time.perf_counter()
            hidden = args[0] if args else kwargs["hidden_states"]
            b = hidden.shape[0]
            prunable = torch.gather(run.ctx.layout.tokens.prunable, 1, run.cur_ids)
            cur_before = run.cur_ids
            self._sync_ctx(run)
            decision = self.method.at_layer(run.ctx, layer, run.cur_ids, hidden)
            if isinstance(decision, Selection):  # some kept rows carry new hidden states (merged tokens)
                keep = decision.keep | ~prunable
                if decision.replaced is not None and bool(decision.replaced.any()):
                    rep = decision.replaced & keep
                    b_idx, v_idx = rep.nonzero(as_tuple=True)
                    hidden = hidden.clone()
                    hidden[b_idx, run.cur_pos[b_idx, v_idx]] = decision.features[b_idx, v_idx].to(hidden.dtype)
                    if args:
                        args = (hidden, *args[1:])
                    else:
                        kwargs["hidden_states"] = hidden
                    self.stats.recycled_tokens += int(rep[0].sum())
            else:
                keep = decision | ~prunable
            visual = int((keep & prunable)[0].sum())
            if not bool(keep.all()):
                drop = torch.zeros(b, run.cur_len, dtype=torch.bool, device=hidden.device)
                drop.scatter_(1, run.cur_pos, ~keep)
                rel_prev = complement_keep(run.cur_len, drop, b)
                prev = plan.stages[-1].rel1
                rel1 = rel_prev if prev is None else torch.gather(prev, 1, rel_prev)
                inv = torch.full((b, run.cur_len), -1, dtype=torch.long, device=hidden.device)
                inv.scatter_(1, rel_prev, torch.arange(rel_prev.shape[1], device=hidden.device).expand_as(rel_prev))
                kept_ids = keep.nonzero()[:, 1].view(b, -1)
                run.cur_ids = torch.gather(run.cur_ids, 1, kept_ids)
                run.cur_pos = torch.gather(inv, 1, torch.gather(run.cur_pos, 1, kept_ids))
                run.cur_len = rel_prev.shape[1]
                plan.stages.append(_Stage(layer, rel1, visual))
                hidden = gather_seq(hidden, rel_prev, 1)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            self.stats.stages.append((f"layer {layer}", visual))
            kept = self.stats.kept
            if kept is not None:  # batch size 1: the tokens still present after this stage
                mask = torch.zeros_like(kept.stages[-1][1])
                mask[run.cur_ids[0]] = True
                kept.stages.append((f"layer {layer}", mask))
                if isinstance(decision, Selection) and decision.replaced is not None:
                    merged = torch.zeros_like(mask)
                    merged[cur_before[0][(decision.replaced & keep)[0]]] = True
                    kept.merged[f"layer {layer}"] = merged
            run.pruning_s += time.perf_counter() - t0
        stage_idx = len(plan.stages) - 1
        stage = plan.stages[stage_idx]
        if stage.rel1 is None:
            return args, kwargs
        for name in ("position_embeddings", "position_ids", "attention_mask"):
            value = kwargs.get(name)
            if value is None:
                continue
            key = (stage_idx, name, id(value) if not isinstance(value, tuple) else tuple(map(id, value)))
            if key not in run.sliced:
                run.sliced[key] = _slice_prefill(name, value, stage.rel1)
            kwargs[name] = run.sliced[key]
        return args, kwargs

    def _layer_decode(self, layer: int, run: _Run, args: tuple, kwargs: dict):
        stage = _stage_of(run.plan.stages, layer)
        mask = kwargs.get("attention_mask")
        if stage.rel1 is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
            return None
        key = (stage.start, id(mask))
        if key not in run.sliced:
            s1 = run.plan.llm_len
            tail = torch.arange(s1, mask.shape[-1], device=mask.device).expand(stage.rel1.shape[0], -1)
            cols = torch.cat([stage.rel1.to(mask.device), tail], dim=1)
            run.sliced[key] = gather_mask(mask, None, cols)
        kwargs["attention_mask"] = run.sliced[key]
        return args, kwargs


class _FeaturesWrapper:
    """Stands in for `base.get_image_features` / `base.get_video_features` on this instance while pruning
    is attached: it records the arguments the layout needs and marks the vision pass's kind.

    An object rather than a closure so that `copy.deepcopy(model)` copies it with the model: the copy's
    wrapper calls the copy's own method and reports to the copy's engine."""

    def __init__(self, engine: PruningEngine, base: nn.Module, attr: str, kind: str, names: tuple[str, ...]):
        self.engine = engine
        self.base = base
        self.attr = attr
        self.kind = kind
        self.names = names
        self.had_own = attr in vars(base)
        self.original = getattr(base, attr)
        self.signature = inspect.signature(self.original)
        self.__wrapped__ = self.original  # inspect.signature (used by generate()) sees the original's
        functools.update_wrapper(self, self.original, updated=())

    def __call__(self, *args, **kwargs):
        engine = self.engine
        if engine._pass_kind is not None:  # called from the other kind's method (Qwen3-VL videos): theirs
            return self.original(*args, **kwargs)
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        for name in self.names:  # "<argument>_shape" records only that tensor's shape
            value = bound.get(name.removesuffix("_shape"))
            engine._media_kwargs[name] = tuple(value.shape) if name.endswith("_shape") and value is not None else (
                value if not name.endswith("_shape") else None)
        engine._pass_kind = self.kind
        try:
            return self.original(*args, **kwargs)
        finally:
            engine._pass_kind = None

    def unwrap(self) -> None:
        if self.had_own:
            setattr(self.base, self.attr, self.original)
        else:
            self.base.__dict__.pop(self.attr, None)


def _join(parts: list) -> VitMaps | None:
    """The ViT-level signals of this prompt's passes as one (`join_vit_maps`), or a clear error."""
    joined = join_vit_maps(parts)
    if joined is None and any(p is not None for p in parts):
        raise PruningError(f"the image and video passes of this prompt gave signals of different shapes "
                           f"{[tuple(p.shape) for p in parts if p is not None]}; prune images and videos in "
                           "separate prompts")
    return joined


def _kept_record(ctx: PrefillContext, sel: Selection, keep_vis: torch.Tensor) -> KeptTokens | None:
    """What the pre-LLM point kept, for pictures; only for batch size 1 (None otherwise)."""
    if keep_vis.shape[0] != 1:
        return None
    n = keep_vis.shape[1]
    stages = []
    if ctx.vision_kept is not None:
        stages.append(("vision encoder", (ctx.vision_kept | ~ctx.layout.tokens.prunable)[0].detach().clone()))
    stages.append(("before LLM", keep_vis[0].detach().clone()))
    merged = {}
    if sel.replaced is not None:
        merged["before LLM"] = (sel.replaced & keep_vis)[0].detach().clone()
    maps = {k: v[0].detach().clone() for k, v in ctx.scratch.items()
            if torch.is_tensor(v) and v.dim() == 2 and tuple(v.shape) == (1, n) and v.is_floating_point()}
    return KeptTokens(layout=ctx.layout, stages=stages, merged=merged, maps=maps)


def _stage_of(stages: list[_Stage], layer: int) -> _Stage:
    current = stages[0]
    for stage in stages:
        if stage.start <= layer:
            current = stage
    return current


def _slice_prefill(name: str, value, rel1: torch.Tensor):
    if name == "position_embeddings":
        return tuple(gather_seq(t, rel1, 1) for t in value)
    if name == "position_ids":
        return gather_seq(value, rel1, -1, batch_dim=-2)
    if isinstance(value, dict):
        return {k: _slice_prefill(name, v, rel1) for k, v in value.items()}
    if value.dim() == 2:
        return gather_seq(value, rel1, 1)
    return gather_mask(value, rel1, rel1)
