"""The vLLM model and processor subclasses that prune images, and the selection they run.

`ImagePruner` (Qwen-VL) and `CropImagePruner` (LLaVA-1.5, LLaVA-OneVision) are the engine-independent part: given one
vision pass's images (merged features, pixels, and the scored block's attention input) they call
`select_before_llm`, the method code the transformers path runs, image by image. `build_classes()` makes
the vLLM subclasses (imports vLLM; called lazily).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from types import SimpleNamespace
from typing import Any

import torch

from ..errors import ConfigError, PruningError
from ..methods.base import select_before_llm
from ..models.base import ModelAdapter, TokenLayout
from ..models.llava import LlavaAdapter
from ..models.llava_onevision import LlavaOnevisionAdapter
from ..models.qwen2_5_vl import Qwen2_5_VLAdapter
from ..models.qwen2_vl import Qwen2VLAdapter
from ..models.qwen3_vl import Qwen3VLAdapter
from ..registry import method_entry
from ..signals.vision_keys import vision_keys
from .plan import FAMILIES, ServingPlan, active_plan, check_tensor_parallel, warn_uncovered

logger = logging.getLogger("vflowopt.serving")

_ADAPTERS: dict[str, type[ModelAdapter]] = {
    "qwen2_5_vl": Qwen2_5_VLAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen3_vl": Qwen3VLAdapter,
}


class AttentionView:
    """A vLLM Qwen vision attention seen as the transformers module the signal code reads: `qkv(x)` -> the
    fused (N, 3·heads·head_dim) projection in the same [q | k | v] head-major layout, `num_heads` (this
    rank's heads) and `scaling`."""

    def __init__(self, attn: torch.nn.Module):
        self._attn = attn
        heads = getattr(attn, "num_attention_heads_per_partition", None)
        head_dim = getattr(attn, "hidden_size_per_attention_head", None)
        if heads is None or head_dim is None:
            raise ConfigError(f"unsupported vLLM vision attention module {type(attn).__name__}")
        self.num_heads = int(heads)
        self.head_dim = int(head_dim)
        self.scaling = self.head_dim**-0.5

    def qkv(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self._attn.qkv(hidden)
        return out[0] if isinstance(out, tuple) else out


def hf_rotary(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's vision rotary tables (N, head_dim/2), applied neox-style (halves), as transformers' full-width
    (N, head_dim) tables: the same rotation, `x·cos + rotate_half(x)·sin`."""
    if cos.shape[-1] * 2 == head_dim:
        cos, sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return cos, sin


class FusedQKVAttentionView:
    """A vLLM CLIP / SigLIP attention (one fused `qkv_proj`, [q | k | v] along the last dim) seen as the
    transformers module the signal code reads: `q_proj(x)`, `k_proj(x)`, `num_heads` (this rank's heads), `head_dim`,
    `scale`. The fused projection is computed once per input."""

    def __init__(self, attn: torch.nn.Module):
        self._attn = attn
        heads = getattr(attn, "num_heads_per_partition", None)
        head_dim = getattr(attn, "head_dim", None)
        if heads is None or head_dim is None or not hasattr(attn, "qkv_proj"):
            raise ConfigError(f"unsupported vLLM vision attention module {type(attn).__name__}")
        self.num_heads = int(heads)
        self.head_dim = int(head_dim)
        self.scale = float(attn.scale)
        self._last: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None

    def _split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._last is None or self._last[0] is not hidden:
            out = self._attn.qkv_proj(hidden)
            out = out[0] if isinstance(out, tuple) else out
            self._last = (hidden, out.chunk(3, dim=-1))
        return self._last[1]

    def q_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._split(hidden)[0]

    def k_proj(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._split(hidden)[1]

    def forget(self) -> None:
        self._last = None


class _Pruner:
    """What every engine-side pruner shares: the plan checked for the family, the method's declared
    signals, the scored block's hook, and the per-image selection with its placeholder-count check."""

    def __init__(self, plan: ServingPlan, family: str, adapter: ModelAdapter, tp_size: int = 1):
        self.plan = plan
        self.family = family
        plan.check_family(family)
        self.adapter = adapter
        self.tp_size = int(tp_size)
        self.config = plan.config.resolve(adapter)
        _, method_cls = method_entry(self.config.method)
        method = method_cls(self.config, adapter)
        self.attention_layer: int | None = method.vision_attention_layer
        self.needs_pixels = bool(method.needs_pixels)
        self.needs_keys = bool(method.needs_vision_keys)
        self._capturing = False
        self._maps: Any = None
        self._keys: Any = None
        self._hook = None
        #: kept token indices of each image of the last selections (tests compare them with transformers)
        self.last_kept: list[list[int]] = []
        #: (prunable, always kept) placeholder counts of each image of the last selections
        self.last_counts: list[tuple[int, int]] = []

    def _hook_attention(self, attn: torch.nn.Module, hook) -> None:
        self._hook = attn.register_forward_pre_hook(hook, with_kwargs=True)

    def _all_heads(self, parts: list[torch.Tensor], local_heads: int) -> list[torch.Tensor]:
        """Averages over this rank's vision heads -> averages over every head of the layer. With tensor
        parallelism vLLM shards the vision heads over the ranks (or, where they do not divide, gives every
        rank all of them): the heads-weighted sum of the ranks' averages over the ranks' head counts is the
        average over all heads in both cases, and the all-reduce gives every rank the same maps, so every
        rank selects the same tokens. One collective per captured signal (the maps; the keys when the method
        needs them) per vision pass; nothing at TP 1."""
        if self.tp_size <= 1 or not parts:
            return parts
        from vllm.distributed import tensor_model_parallel_all_reduce

        flat = torch.cat([x.reshape(-1).float() * local_heads for x in parts]
                         + [torch.full((1,), float(local_heads), device=parts[0].device)])
        flat = tensor_model_parallel_all_reduce(flat)
        flat = flat[:-1] / flat[-1]
        return [x.view_as(p) for x, p in zip(torch.split(flat, [p.numel() for p in parts]), parts)]

    def close(self) -> None:
        """Remove the attention hook (the plan changed)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    @property
    def needs_attention(self) -> bool:
        return self.attention_layer is not None

    def end(self) -> None:
        self._capturing = False

    def _check_signals(self, have_maps: bool, pixel_values) -> None:
        if self.needs_attention and not have_maps:
            raise PruningError(f"vflowopt: method '{self.plan.method}' needs the vision encoder's attention, but no "
                               "vision pass ran for these images (precomputed image embeddings cannot be pruned "
                               "with it; use random, pool or divprune)")
        if self.needs_pixels and pixel_values is None:
            raise PruningError(f"vflowopt: method '{self.plan.method}' (entropy_weight != 0) needs the images' "
                               "pixels; precomputed image embeddings cannot be pruned with it")

    def _select_one(self, emb: torch.Tensor, layout: TokenLayout, signals: dict[str, Any],
                    feature_width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's (kept embeddings, their indices among its tokens). `feature_width`: the leading columns
        the method sees (the rest, Qwen3-VL's deepstack rows, follow the token they belong to)."""
        n = emb.shape[0]
        prunable = layout.tokens.prunable[0]
        n_prunable = int(prunable.sum())
        k = n - n_prunable + self.plan.kept_tokens(n_prunable)  # what the processor left in the prompt
        self.last_counts.append((n_prunable, n - n_prunable))
        if k >= n:
            self.last_kept.append(list(range(n)))
            return emb, torch.arange(n, device=emb.device)
        main = emb[:, :feature_width] if feature_width else emb
        sel = select_before_llm(self.config, self.adapter, layout, main[None], signals=signals)
        keep = sel.keep[0].to(emb.device)
        feats = emb
        if sel.replaced is not None and sel.features is not None and bool(sel.replaced.any()):
            # a merged/pooled token replaces the features of the token it stands at; extra columns stay
            merged = torch.where(sel.replaced[0].to(emb.device)[:, None], sel.features[0].to(emb.dtype), main)
            feats = torch.cat([merged, emb[:, merged.shape[1]:]], dim=1)
        if int(keep.sum()) != k:  # the prompt holds k placeholders: any other count would corrupt it
            raise PruningError(f"vflowopt: method '{self.plan.method}' kept {int(keep.sum())} of {n} tokens of "
                               f"an image, but the prompt has {k} placeholders for it")
        idx = keep.nonzero().squeeze(-1)
        self.last_kept.append(idx.tolist())
        return feats[idx], idx


class ImagePruner(_Pruner):
    """Qwen-VL: selects each image's kept tokens with the plan's method, as `vflowopt.prune` would before the
    LLM, from the merger's output, the pixels and the scored block's (flat, all images) attention input."""

    def __init__(self, plan: ServingPlan, family: str, hf_config: Any, visual: torch.nn.Module,
                 feature_width: int | None = None, tp_size: int = 1):
        # The adapter reads the transformers config and the vision blocks; vLLM's hf_config is that config.
        super().__init__(plan, family, _ADAPTERS[family](SimpleNamespace(config=hf_config, visual=visual)),
                         tp_size)
        self.visual = visual
        self.feature_width = feature_width  # None: the whole embedding row is the feature
        self._grid: torch.Tensor | None = None
        if self.attention_layer is not None:
            block = self.adapter.vision_layers[self.attention_layer]
            self.view = AttentionView(block.attn)
            self._hook_attention(block.attn, self._on_attention)

    def normalised_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The pixels as transformers' processor returns them (normalised). vLLM >= 0.32 may leave rescaling
        and normalisation to the tower (`visual.input_norm`, `--mm-device-do-normalize`): apply it here too."""
        norm = getattr(self.visual, "input_norm", None)
        if norm is None:
            return pixel_values.float()
        with torch.no_grad():
            return norm(pixel_values, torch.float32).float()

    # -- capture during the vision pass -------------------------------------------------------------
    def begin(self, grid_thw: torch.Tensor) -> None:
        self._capturing = True
        self._grid = grid_thw.detach().to("cpu", torch.long)
        self._maps = self._keys = None

    def _on_attention(self, module, args, kwargs) -> None:
        if not self._capturing:
            return
        hidden = kwargs.get("x", args[0] if args else None)
        hidden = hidden.reshape(hidden.shape[0], -1)  # vLLM: (N, 1, C)
        cos, sin = hf_rotary(kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"], self.view.head_dim)
        self.adapter.on_vision_input((), {"grid_thw": self._grid})  # the adapter contract: this pass's images
        call = {"hidden_states": hidden, "cu_seqlens": kwargs["cu_seqlens"], "position_embeddings": (cos, sin)}
        with torch.no_grad():
            maps = self._all_heads(list(self.adapter.vision_attention_probs(self.view, (), call)),
                                   self.view.num_heads)
            self._maps = [m.cpu() for m in maps]
            if self.needs_keys:
                keys = self._all_heads(list(vision_keys(self.adapter, self.view, (), call)), self.view.num_heads)
                self._keys = [k.cpu() for k in keys]

    # -- selection ----------------------------------------------------------------------------------
    def select(self, embeds: tuple[torch.Tensor, ...], grid_thw: torch.Tensor,
               pixel_values: torch.Tensor | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image: (kept embeddings, their indices among the image's tokens)."""
        grid = grid_thw.detach().to("cpu", torch.long)
        self._check_signals(self._maps is not None and len(self._maps) == len(embeds), pixel_values)
        patches = grid.prod(-1).tolist()
        pixels: list[torch.Tensor | None] = [None] * len(embeds)
        if self.needs_pixels:
            pixels = list(torch.split(self.normalised_pixels(pixel_values), patches))
        out = []
        self.last_kept, self.last_counts = [], []
        for i, emb in enumerate(embeds):
            self.adapter.on_vision_input((), {"grid_thw": grid[i : i + 1]})  # this image alone
            signals: dict[str, Any] = {}
            if self.needs_pixels:
                signals["pixel_values"] = pixels[i]
            if self.needs_attention:
                signals["vision_attention"] = [self._maps[i].to(emb.device)]
            if self.needs_keys:
                signals["vision_keys"] = [self._keys[i].to(emb.device)]
            mask = torch.ones(1, emb.shape[0], dtype=torch.bool, device=emb.device)
            layout = self.adapter.layout(mask, {"image_grid_thw": grid[i : i + 1]}, 1)
            # Qwen3-VL: the tower's output is [features | deepstack features]; methods see the features, and a
            # recycled token keeps the deepstack rows of the token it replaces (as the transformers path does)
            out.append(self._select_one(emb, layout, signals, self.feature_width))
        return out


class CropImagePruner(_Pruner):
    """Towers that run every image as crops of one batch (CLIP / SigLIP: LLaVA-1.5, LLaVA-OneVision): the
    scored layer's attention input is (crops of every image, N, D); each image is selected from its
    projected (and, OneVision, packed) features with the transformers adapter's own layout."""

    def __init__(self, plan: ServingPlan, family: str, adapter: ModelAdapter, tp_size: int = 1):
        super().__init__(plan, family, adapter, tp_size)
        if self.attention_layer is not None:
            built = len(self.adapter.vision_layers)
            if self.attention_layer >= built:
                raise ConfigError(f"vflowopt: method '{plan.method}' scores vision layer {self.attention_layer}, but "
                                  f"vLLM builds only the {built} layers up to the feature layer; choose a "
                                  f"vision_layer below {built}")
            attn = self.adapter.vision_attention(self.attention_layer)
            self.view = FusedQKVAttentionView(attn)
            self._hook_attention(attn, self._on_attention)

    def crops_of(self, size: list[int]) -> int:
        """Crops of an image of (h, w) px as the model uses them."""
        return 1

    def layout_kwargs(self, sizes: torch.Tensor | None, i: int) -> dict:
        return {}

    def begin(self) -> None:
        self._capturing = True
        self._maps = self._keys = None

    def end(self) -> None:
        super().end()
        if self.attention_layer is not None:
            self.view.forget()

    def _on_attention(self, module, args, kwargs) -> None:
        if not self._capturing:
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)  # (crops of every image, N, D)
        with torch.no_grad():
            call = {"hidden_states": hidden}
            self._maps = self._all_heads([self.adapter.vision_attention_probs(self.view, (), call)],
                                         self.view.num_heads)[0].cpu()
            if self.needs_keys:
                self._keys = self._all_heads([vision_keys(self.adapter, self.view, (), call)],
                                             self.view.num_heads)[0].cpu()

    def select(self, features: list[torch.Tensor], image_sizes: torch.Tensor | list | None,
               pixel_values: torch.Tensor | list[torch.Tensor] | None) -> list[torch.Tensor]:
        """Per image: the kept rows of its features (OneVision: packed, newlines included), in order."""
        sizes = None
        if image_sizes is not None:  # vLLM batches (h, w) sizes as one (B, 2) tensor or a list of (2,) tensors
            sizes = torch.stack([torch.as_tensor(s).reshape(2) for s in image_sizes]).to("cpu", torch.long)
        self._check_signals(self._maps is not None, pixel_values)
        # crops as vLLM stacked them for the tower (a batched tensor may carry padding crops) ...
        stacks = None
        if pixel_values is not None:
            stacks = [x if x.dim() == 4 else x[None] for x in pixel_values]
        starts = [0] + torch.tensor([x.shape[0] for x in stacks]).cumsum(0).tolist() if stacks else None
        if self._maps is not None and stacks is not None and starts[-1] != self._maps.shape[0]:
            raise PruningError(f"vflowopt: the vision pass saw {self._maps.shape[0]} crops, the images have "
                               f"{starts[-1]}")
        out = []
        self.last_kept, self.last_counts = [], []
        for i, emb in enumerate(features):
            n_crops = int(self.crops_of(sizes[i].tolist())) if sizes is not None else 1  # ... as the model uses them
            signals: dict[str, Any] = {}
            if self.needs_pixels:
                signals["pixel_values"] = stacks[i][:n_crops].float()
            if self.needs_attention:
                signals["vision_attention"] = self._maps[starts[i] : starts[i] + n_crops].to(emb.device)
            if self.needs_keys:
                signals["vision_keys"] = self._keys[starts[i] : starts[i] + n_crops].to(emb.device)
            mask = torch.ones(1, emb.shape[0], dtype=torch.bool, device=emb.device)
            layout = self.adapter.layout(mask, self.layout_kwargs(sizes, i), n_crops)
            out.append(self._select_one(emb, layout, signals)[0])
        return out


class OnevisionImagePruner(CropImagePruner):
    """LLaVA-OneVision: each image is a base crop plus anyres crops through the SigLIP tower, packed by the
    model (unpadding, downscaling, one newline per row of the crop grid). The layout is the transformers
    adapter's own, with transformers' `pack_image_features` (it reads only the config); newlines are never
    pruned, so an image keeps its newlines plus `round(budget·n)` of its n other tokens."""

    def __init__(self, plan: ServingPlan, hf_config: Any, vision_model: torch.nn.Module, tp_size: int = 1):
        from transformers.models.llava_onevision import modeling_llava_onevision as hf_ov

        pack = functools.partial(hf_ov.LlavaOnevisionModel.pack_image_features, SimpleNamespace(config=hf_config))
        base = SimpleNamespace(vision_tower=vision_model, pack_image_features=pack)
        super().__init__(plan, "llava_onevision", LlavaOnevisionAdapter(SimpleNamespace(config=hf_config,
                                                                                        model=base)), tp_size)

    def crops_of(self, size: list[int]) -> int:
        return self.adapter._num_crops([size], None)[0]  # the adapter's rule (a single-image prompt: tiled)

    def layout_kwargs(self, sizes: torch.Tensor | None, i: int) -> dict:
        return {"image_sizes": sizes[i : i + 1]}


class LlavaImagePruner(CropImagePruner):
    """LLaVA-1.5: one crop per image through the CLIP (or SigLIP) tower, one square grid of tokens; the CLS
    token is in the scored layer's input and never a visual token ("default" feature strategy)."""

    def __init__(self, plan: ServingPlan, hf_config: Any, vision_model: torch.nn.Module, tp_size: int = 1):
        base = SimpleNamespace(vision_tower=vision_model)
        super().__init__(plan, "llava", LlavaAdapter(SimpleNamespace(config=hf_config, model=base)), tp_size)


#: Methods that need the vision pass itself (its attention), not only the merged features.
VISION_PASS_METHODS = ("vflowopt", "visionzip")

#: Qwen3-VL: fifth position channel of the images this plugin pruned (vLLM's own items carry 0 or 1 there).
QWEN3_IMAGE_MARK = -7


def media_positions(grid_thw: list[int], merge: int, extra_zero_channel: bool) -> torch.Tensor:
    """(n, 4) M-RoPE positions of an image's tokens as if it started the sequence ([t, h, w] from vLLM's
    `compute_mrope_for_media`) plus the offset at which the text after it continues: max + 1 over the whole
    image, where the unpruned prompt continues (vLLM's EVS puts the grid width there, which differs for tall
    images, and Qwen3-VL's 5-channel recompute takes the max over the kept tokens only). With
    `extra_zero_channel` (Qwen3-VL, whose runner strips 5 channels) a fifth channel `QWEN3_IMAGE_MARK` marks
    the item for `qwen3_recompute_positions`."""
    from vllm.multimodal.video_prune.evs import compute_mrope_for_media

    pos = compute_mrope_for_media(grid_thw, merge)
    pos[:, 3] = pos[:, :3].max() + 1
    if extra_zero_channel:
        return torch.cat([pos, torch.full_like(pos[:, :1], QWEN3_IMAGE_MARK)], 1)
    return pos


def onevision_newlines(info: Any, width: int, height: int) -> int:
    """Newline tokens of a LLaVA-OneVision image of `width`×`height` px: one per row of its (unpadded,
    possibly downscaled) crop grid, from the same vLLM arithmetic as its placeholder count
    (`LlavaNextProcessingInfo.get_num_image_tokens`)."""
    from vllm.model_executor.models.llava_next import get_anyres_image_grid_shape

    encoder = info.get_vision_encoder_info()
    rows, cols = get_anyres_image_grid_shape(image_size=(height, width),
                                             grid_pinpoints=info.get_hf_config().image_grid_pinpoints,
                                             patch_size=encoder.get_image_size())
    _, newlines = info._get_num_unpadded_features(original_height=height, original_width=width,
                                                  npatches=encoder.get_patch_grid_length(),
                                                  num_patch_height=rows, num_patch_width=cols)
    return int(newlines)


def build_classes(names: dict[str, str]) -> dict[str, type]:
    """The vLLM subclasses, keyed by the names in `names` ({vLLM architecture: class name})."""
    from vllm.distributed import parallel_state
    from vllm.model_executor.models import qwen2_5_vl as q25
    from vllm.multimodal import MULTIMODAL_REGISTRY


    def pruning_prompt_updates(updates, out_mm_kwargs, kept=None):
        """vLLM's prompt updates with each image's placeholders cut to the kept count: `kept(plan, item_idx, n)`
        (default: `plan.kept_tokens(n)`, every placeholder prunable). An image given as precomputed embeddings
        is refused here, as a request error, when the method needs the vision pass."""
        plan = active_plan()
        if plan is None or plan.is_identity:
            return updates
        count = kept or (lambda plan, item_idx, n: plan.kept_tokens(n))
        out = []
        for update in updates:
            if update.modality != "image":
                out.append(update)
                continue
            full_replacement = update.replacement

            def replacement(item_idx: int, _full=full_replacement):
                if plan.method in VISION_PASS_METHODS and "image_embeds" in out_mm_kwargs["image"][item_idx]:
                    raise ValueError(f"vflowopt: method '{plan.method}' scores images in the vision encoder, so it "
                                     "cannot prune precomputed image embeddings; send the image itself")
                tokens = _full(item_idx)
                if not isinstance(tokens, list):
                    raise PruningError(f"vflowopt: unexpected image replacement {type(tokens).__name__} from vLLM")
                return tokens[: count(plan, item_idx, len(tokens))]

            out.append(type(update)(modality=update.modality, target=update.target, replacement=replacement))
        return out

    class PruningMixin:
        """What the pruning subclasses share: set up the pruner, run the vision pass with capture, select."""

        vflowopt_family: str = ""
        vflowopt_extra_channel: bool = False
        #: M-RoPE model: pruned images carry their positions (the runner strips and recomputes them)
        vflowopt_mrope: bool = True

        def _vflowopt_init(self) -> None:
            self.vflowopt_pruner = None
            self._vflowopt_plan = None
            plan = active_plan()
            self.vflowopt_prunes_images = plan is not None and not plan.is_identity
            if self.vflowopt_prunes_images:
                self._vflowopt_current()  # a strategy this model cannot serve stops the server here
                if self.vflowopt_mrope:
                    # images (and videos, unpruned unless vLLM's own video pruning is on) carry their M-RoPE
                    # positions
                    self.is_multimodal_pruning_enabled = True

        def _vflowopt_new_pruner(self, plan: ServingPlan, tp_size: int = 1) -> _Pruner:
            return ImagePruner(plan, self.vflowopt_family, self.config, self.visual,
                               getattr(self, "visual_dim", None) if self.vflowopt_extra_channel else None, tp_size)

        def _vflowopt_current(self):
            """The pruner of the active plan (rebuilt when `set_plan` replaced it; None: keep every token)."""
            plan = active_plan()
            if plan is not self._vflowopt_plan:
                if self.vflowopt_pruner is not None:
                    self.vflowopt_pruner.close()
                self.vflowopt_pruner = None
                if plan is not None:
                    tp_size = parallel_state.get_tensor_model_parallel_world_size()
                    pruner = self._vflowopt_new_pruner(plan, tp_size)
                    try:
                        # Qwen-VL's data-parallel encoder mode runs each image on one rank only
                        check_tensor_parallel(plan, pruner.needs_attention, tp_size,
                                              images_split=bool(getattr(self, "use_data_parallel", False)))
                    except ConfigError:
                        pruner.close()
                        raise
                    self.vflowopt_pruner = pruner
                self._vflowopt_plan = plan
            return self.vflowopt_pruner

    class QwenPruningMixin(PruningMixin):
        """Qwen-VL: capture during the flat vision pass; select after the merger, positions appended (EVS)."""

        def _process_image_input(self, image_input):
            pruner = self._vflowopt_current() if self.vflowopt_prunes_images else None
            if pruner is None or image_input["type"] != "pixel_values":
                return super()._process_image_input(image_input)
            pruner.begin(image_input["image_grid_thw"])
            try:
                return super()._process_image_input(image_input)
            finally:
                pruner.end()

        def _postprocess_image_embeds_evs(self, image_embeds_split, image_input):
            if not self.vflowopt_prunes_images:
                return super()._postprocess_image_embeds_evs(image_embeds_split, image_input)
            pruner = self._vflowopt_current()
            grid = image_input["image_grid_thw"]
            merge = int(self.config.vision_config.spatial_merge_size)
            if pruner is None:
                selected = [(e, torch.arange(e.shape[0], device=e.device)) for e in image_embeds_split]
            else:
                pixels = image_input.get("pixel_values") if image_input["type"] == "pixel_values" else None
                selected = pruner.select(tuple(image_embeds_split), grid, pixels)
            out = []
            for (emb, idx), size in zip(selected, grid.tolist()):
                pos = media_positions(size, merge, self.vflowopt_extra_channel).to(emb.device)
                out.append(torch.cat([emb, pos[idx.to(emb.device)].to(emb.dtype)], dim=1))
            return tuple(out)

    def qwen2_5_video_positions(self, video_embeds_split, video_input):
        """Videos when only images are pruned: every token kept, positions appended like EVS does."""
        from vllm.multimodal.video_prune.evs import compute_mrope_for_media

        merge = self.visual.spatial_merge_size
        seconds = video_input.get("second_per_grid_ts")
        tps = float(self.config.vision_config.tokens_per_second)
        out = []
        for i, (emb, size) in enumerate(zip(video_embeds_split, video_input["video_grid_thw"].tolist())):
            per_grid = float(seconds[i]) if seconds is not None else 1.0  # as stock get_mrope_input_positions
            pos = compute_mrope_for_media(size, merge, tokens_per_second=tps, video_second_per_grid=per_grid)
            pos[:, 3] = pos[:, :3].max() + 1
            out.append(torch.cat([emb, pos.to(emb.device, emb.dtype)], dim=1))
        return tuple(out)

    class Qwen2_5Processor(q25.Qwen2_5_VLMultiModalProcessor):
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            return pruning_prompt_updates(
                list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)), out_mm_kwargs)

    @MULTIMODAL_REGISTRY.register_processor(Qwen2_5Processor, info=q25.Qwen2_5_VLProcessingInfo,
                                            dummy_inputs=q25.Qwen2_5_VLDummyInputsBuilder)
    class Qwen2_5Model(QwenPruningMixin, q25.Qwen2_5_VLForConditionalGeneration):
        vflowopt_family = FAMILIES["Qwen2_5_VLForConditionalGeneration"]

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._vflowopt_init()

        def _postprocess_video_embeds_evs(self, video_embeds_split, video_input):
            if self.video_pruning_rate:
                return super()._postprocess_video_embeds_evs(video_embeds_split, video_input)
            return qwen2_5_video_positions(self, video_embeds_split, video_input)

    from vllm.model_executor.models import qwen3_vl as q3
    from vllm.multimodal.video_prune.evs import recompute_mrope_positions

    def qwen3_recompute_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """Qwen3-VL's own recompute, except that the images this plugin pruned pass their 4 channels
        [t, h, w, offset] (vLLM's 4-channel form) so that the text after them continues at the unpruned
        prompt's positions; vLLM's own items (videos) keep their 5 channels."""
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids.to(dtype=torch.long)
        else:
            ids = torch.tensor(input_ids, dtype=torch.long, device=device)
        embeds, positions = [], []
        for mm in multimodal_embeddings:
            if mm.shape[0] == 0:
                embeds.append(mm)
                positions.append(torch.empty(5, 0, device=device, dtype=torch.long))
                continue
            pos = mm[:, -5:].permute(1, 0).long()
            embeds.append(mm[:, :-5])
            positions.append(pos[:4] if bool((pos[4] == QWEN3_IMAGE_MARK).all()) else pos)
        new_positions, delta = recompute_mrope_positions(
            ids, positions, mrope_positions, num_computed_tokens, self.config.vision_start_token_id,
            self.config.image_token_id, self.config.video_token_id)
        return embeds, new_positions, delta

    class Qwen3Processor(q3.Qwen3VLMultiModalProcessor):
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            return pruning_prompt_updates(
                list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)), out_mm_kwargs)

    @MULTIMODAL_REGISTRY.register_processor(Qwen3Processor, info=q3.Qwen3VLProcessingInfo,
                                            dummy_inputs=q3.Qwen3VLDummyInputsBuilder)
    class Qwen3Model(QwenPruningMixin, q3.Qwen3VLForConditionalGeneration):
        vflowopt_family = FAMILIES["Qwen3VLForConditionalGeneration"]
        vflowopt_extra_channel = True

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._vflowopt_init()
            if (self.vflowopt_prunes_images and not self.video_pruning_rate
                    and self.multimodal_config.get_limit_per_prompt("video") > 0):
                # vLLM 0.32's Qwen3-VL video path ties "positions appended" to its own video pruning (EVS):
                # refuse at start rather than fail the first video request
                raise ConfigError("vflowopt: pruning Qwen3-VL images needs either vLLM's own video pruning "
                                  "(--video-pruning-rate R) or no videos (--limit-mm-per-prompt '{\"video\": 0}')")

        def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
            if not self.vflowopt_prunes_images:
                return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                         num_computed_tokens)
            return qwen3_recompute_positions(self, input_ids, multimodal_embeddings, mrope_positions,
                                             num_computed_tokens)

    from vllm.model_executor.models import qwen2_vl as q2

    class Qwen2Processor(q2.Qwen2VLMultiModalProcessor):
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            return pruning_prompt_updates(
                list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)), out_mm_kwargs)

    @MULTIMODAL_REGISTRY.register_processor(Qwen2Processor, info=q2.Qwen2VLProcessingInfo,
                                            dummy_inputs=q2.Qwen2VLDummyInputsBuilder)
    class Qwen2Model(QwenPruningMixin, q2.Qwen2VLForConditionalGeneration):
        """vLLM 0.32's Qwen2-VL has no multimodal-pruning support (`SupportsMultiModalPruning`): this adds what
        the runner needs when images are pruned — embeddings with their M-RoPE positions appended (images
        selected, videos whole) and `recompute_mrope_positions` — in the form Qwen2.5-VL uses."""

        vflowopt_family = FAMILIES["Qwen2VLForConditionalGeneration"]

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self.is_multimodal_pruning_enabled = False
            self._vflowopt_init()

        def embed_multimodal(self, **kwargs):
            if not self.vflowopt_prunes_images:
                return super().embed_multimodal(**kwargs)
            modalities = self._parse_and_validate_multimodal_inputs(**kwargs)
            if not modalities:
                return []
            merge = int(self.config.vision_config.spatial_merge_size)
            out: tuple[torch.Tensor, ...] = ()
            for modality, mm_input in modalities.items():
                if modality == "images":
                    embeds = self._process_image_input(mm_input)
                    out += self._postprocess_image_embeds_evs(embeds, mm_input)
                elif modality == "videos":
                    for emb, size in zip(self._process_video_input(mm_input), mm_input["video_grid_thw"].tolist()):
                        pos = media_positions(size, merge, False).to(emb.device, emb.dtype)
                        out += (torch.cat([emb, pos], dim=1),)
            return out

        def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
            device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
            if isinstance(input_ids, torch.Tensor):
                ids = input_ids.to(dtype=torch.long)
            else:
                ids = torch.tensor(input_ids, dtype=torch.long, device=device)
            embeds = [mm[:, :-4] for mm in multimodal_embeddings]
            positions = [mm[:, -4:].permute(1, 0).long() for mm in multimodal_embeddings]
            new_positions, delta = recompute_mrope_positions(
                ids, positions, mrope_positions, num_computed_tokens, self.config.vision_start_token_id,
                self.config.image_token_id, self.config.video_token_id)
            return embeds, new_positions, delta

        def get_encoder_cudagraph_config(self):
            # the encoder CUDA-graph path would skip embed_multimodal's positions (as Qwen2.5-VL notes for EVS)
            config = super().get_encoder_cudagraph_config()
            if getattr(self, "vflowopt_prunes_images", False):
                config = dataclasses.replace(config, modalities=[])
            return config

    class CropPruningMixin(PruningMixin):
        """LLaVA / LLaVA-OneVision (1-D RoPE, nothing appended): capture the scored layer during vLLM's own image
        path, then select each image's projected (OneVision: packed) features."""

        vflowopt_mrope = False

        def _vflowopt_sizes(self, image_input, n_images: int):
            """The images' (h, w) sizes where the layout needs them (OneVision), else None."""
            return None

        def _process_image_input(self, image_input):
            pruner = self._vflowopt_current() if self.vflowopt_prunes_images else None
            if pruner is None or image_input["type"] != "pixel_values":
                return super()._process_image_input(image_input)
            pruner.begin()
            try:
                features = list(super()._process_image_input(image_input))
            finally:
                pruner.end()
            sizes = self._vflowopt_sizes(image_input, len(features))
            return tuple(pruner.select(features, sizes, image_input["pixel_values"]))

    from vllm.model_executor.models import llava_onevision as lov
    from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems

    def pixel_items(mm_items, model: str):
        """The request's images; precomputed embeddings are refused as a request error: the LLaVA-family
        models here select inside their pixel path (`CropPruningMixin`), which embeddings skip."""
        images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
        if isinstance(images, ImageEmbeddingItems):
            raise ValueError(f"vflowopt: precomputed {model} image embeddings are not pruned by the vLLM plugin; "
                             "send the image itself")
        return images

    class OnevisionProcessor(lov.LlavaOnevisionMultiModalProcessor):
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            info = self.info

            def kept(plan: ServingPlan, item_idx: int, n: int) -> int:
                """An image's newlines (never pruned) plus round(budget·m) of its m other tokens."""
                size = pixel_items(mm_items, "LLaVA-OneVision").get_image_size(item_idx)
                newlines = onevision_newlines(info, size.width, size.height)
                return newlines + plan.kept_tokens(n - newlines)

            return pruning_prompt_updates(
                list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)), out_mm_kwargs,
                kept)

    @MULTIMODAL_REGISTRY.register_processor(OnevisionProcessor, info=lov.LlavaOnevisionProcessingInfo,
                                            dummy_inputs=lov.LlavaOnevisionDummyInputsBuilder)
    class OnevisionModel(CropPruningMixin, lov.LlavaOnevisionForConditionalGeneration):
        """LLaVA-OneVision (no `SupportsMultiModalPruning` upstream): the packed image features (crops,
        newlines) are selected after packing; the LLM numbers the shorter prompt's positions 1..L as vLLM
        does for every 1-D RoPE model, which is `positions="compact"` on the transformers path. Videos are
        served as vLLM serves them."""

        vflowopt_family = FAMILIES["LlavaOnevisionForConditionalGeneration"]

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            self._vflowopt_init()

        def _vflowopt_new_pruner(self, plan: ServingPlan, tp_size: int = 1) -> _Pruner:
            return OnevisionImagePruner(plan, self.config, self.vision_tower.vision_model, tp_size)

        def _vflowopt_sizes(self, image_input, n_images: int):
            sizes = image_input.get("image_sizes")
            if sizes is None:  # as the parent: every image at the tower's size
                side = self.config.vision_config.image_size
                sizes = torch.tensor([[side, side]] * n_images)
            return sizes

    from vllm.model_executor.models import llava as llv

    class LlavaProcessor(llv.LlavaMultiModalProcessor):
        def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
            def kept(plan: ServingPlan, item_idx: int, n: int) -> int:
                pixel_items(mm_items, "LLaVA")
                return plan.kept_tokens(n)

            return pruning_prompt_updates(
                list(super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)), out_mm_kwargs,
                kept)

    def llava_processor(info, dummy_inputs):
        """vLLM's LLaVA factory, with the pruning processor for CLIP / SigLIP towers (Pixtral-HF: vLLM's own)."""
        if isinstance(info, llv.LlavaProcessingInfo):
            return LlavaProcessor(info, dummy_inputs)
        return llv._build_llava_or_pixtral_hf_processor(info, dummy_inputs)

    @MULTIMODAL_REGISTRY.register_processor(llava_processor, info=llv._build_llava_or_pixtral_hf_info,
                                            dummy_inputs=llv.LlavaDummyInputsBuilder)
    class LlavaModel(CropPruningMixin, llv.LlavaForConditionalGeneration):
        """LLaVA-1.5 (CLIP or SigLIP tower, one grid of tokens per image; no `SupportsMultiModalPruning`
        upstream): the projected features are selected image by image; like LLaVA-OneVision its 1-D RoPE LLM
        numbers the shorter prompt consecutively (`positions="compact"`). A Pixtral-HF tower (same vLLM class)
        is served unpruned with one warning."""

        vflowopt_family = FAMILIES["LlavaForConditionalGeneration"]

        def __init__(self, *, vllm_config, prefix: str = ""):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            if self.config.vision_config.model_type not in ("clip_vision_model", "siglip_vision_model"):
                warn_uncovered(f"LlavaForConditionalGeneration with a {self.config.vision_config.model_type} tower")
                self.vflowopt_pruner, self._vflowopt_plan, self.vflowopt_prunes_images = None, None, False
                return
            self._vflowopt_init()

        def _vflowopt_new_pruner(self, plan: ServingPlan, tp_size: int = 1) -> _Pruner:
            return LlavaImagePruner(plan, self.config, self.vision_tower.vision_model, tp_size)

    built = {"Qwen2_5_VLForConditionalGeneration": Qwen2_5Model, "Qwen3VLForConditionalGeneration": Qwen3Model,
             "Qwen2VLForConditionalGeneration": Qwen2Model,
             "LlavaOnevisionForConditionalGeneration": OnevisionModel, "LlavaForConditionalGeneration": LlavaModel}
    classes: dict[str, type] = {}
    for arch, cls in built.items():
        if arch in names:
            cls.__name__ = cls.__qualname__ = names[arch]
            classes[names[arch]] = cls
    return classes
