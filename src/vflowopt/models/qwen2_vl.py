"""Qwen2-VL: a ViT without CLS over flattened patches, 2×2 patch merging, 3-D M-RoPE positions.

The processor flattens every image into patches in block-major order: each run of merge² (= 4)
consecutive patches is one 2×2 group, and the merger turns each group into one LLM token, row-major
on the merged grid. So a ViT-level map (one value per patch, image order) becomes one value per
visual token by averaging each group of 4; a token's pixel region is its 28×28 (2·patch) square.

Attention is recomputed per `cu_seqlens` segment (one per image) from the block's fused `qkv` with its
vision RoPE, giving one (N_i, N_i) map per image (signals/qwen_vision.py). Patch entropy is taken over
the whole 28×28 region of the patch's group (the pixels behind one LLM token), so after pooling the
entropy term is exactly a softmax over the image's tokens of their region entropy (scaled by 1/4, as
is the pooled attention, so the ranking equals "attention mass of the region + α·softmax").

Positions: the runtime keeps the kept tokens' columns of the full M-RoPE positions that the model
computes on the unpruned prompt (get_rope_index; it needs `mm_token_type_ids`), and continues decoding
at the full-sequence positions (generate() passes them; a manual decode loop gets them from the runtime).
Videos: the same layout over `video_grid_thw` (t temporal groups of 2 frames, each an h×w patch grid
merged 2×2); a video token's `frame` is its temporal group. Qwen3-VL's timestamp text between the frames
is ordinary text (never pruned). A prompt with images and videos has two vision passes; the runtime
joins their signals (images first) and this adapter describes both passes' grids as one.
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..signals.entropy import entropy_of_levels
from ..signals.qwen_vision import qwen_vision_attention_probs
from .base import ModelAdapter, TokenLayout, VitMaps, register_adapter, split_batch, tokens_from_flat

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class QwenVLAdapter(ModelAdapter):
    """What Qwen2-VL, Qwen2.5-VL and Qwen3-VL share."""

    image_kwargs = ("image_grid_thw",)
    video_kwargs = ("video_grid_thw",)

    def __init__(self, model):
        super().__init__(model)
        self._grid_thw: torch.Tensor | None = None  # of the last vision pass

    # -- structure ------------------------------------------------------------------------------
    @property
    def vision_tower(self):
        return self.base.visual

    @property
    def vision_layers(self):
        return self.vision_tower.blocks

    def vision_attention(self, layer: int):
        return self.vision_layers[layer].attn

    @property
    def merge_size(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    def feature_layer(self) -> int:
        return len(self.vision_layers) - 1

    def rotary_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        # generate() passes 4 rows [text; t; h; w]; only the last three are M-RoPE positions
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            return position_ids[1:]
        return position_ids

    # -- pruning inside the ViT ------------------------------------------------------------------
    vit_flat = True

    @property
    def vit_group(self) -> int:
        return self.merge_size**2

    def vision_projectors(self):
        return [self.vision_tower.merger]

    def vision_pruning_unsupported(self) -> str | None:
        return None

    def vit_image_lengths(self) -> list[int]:
        return self._image_lengths()

    def vit_running_maps(self, flat_map: torch.Tensor) -> list[torch.Tensor]:
        maps = list(torch.split(flat_map, self._image_lengths()))
        order = self._image_order()
        if order is not None:
            maps = [m[o.to(m.device)] for m, o in zip(maps, order)]
        return maps

    def slice_vision_layer_inputs(self, kwargs: dict, ids: torch.Tensor, cache: dict) -> None:
        for name in ("position_embeddings", "cu_seqlens"):
            value = kwargs.get(name)
            if value is None:
                continue
            key = (name, id(value) if not isinstance(value, tuple) else tuple(map(id, value)))
            if key not in cache:
                if name == "position_embeddings":
                    cache[key] = tuple(t[ids.to(t.device)] for t in value)
                else:  # segment bounds counted over the kept tokens; emptied segments vanish
                    bounds = torch.searchsorted(ids.to(value.device), value.to(torch.long))
                    bounds = torch.unique_consecutive(bounds).to(value.dtype)
                    cache[key] = bounds
                    cache[("max", key[1])] = int((bounds[1:] - bounds[:-1]).max()) if bounds.numel() > 1 else 0
            kwargs[name] = cache[key]
            if name == "cu_seqlens" and kwargs.get("max_seqlen") is not None:
                old = kwargs["max_seqlen"]
                new = cache[("max", key[1])]
                kwargs["max_seqlen"] = (torch.tensor(new, dtype=old.dtype, device=old.device)
                                        if torch.is_tensor(old) else new)

    # -- vision pass ----------------------------------------------------------------------------
    def on_vision_input(self, args: tuple, kwargs: dict) -> None:
        self._grid_thw = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)

    def vision_pass_state(self) -> torch.Tensor | None:
        return self._grid_thw

    def restore_vision_passes(self, states: list) -> None:
        grids = [g for g in states if g is not None]
        if grids:
            self._grid_thw = torch.cat([g.to(grids[0].device) for g in grids]) if len(grids) > 1 else grids[0]

    def _image_lengths(self) -> list[int]:
        if self._grid_thw is None:
            raise ConfigError("the Qwen vision tower ran without grid_thw; pass the processor's image_grid_thw")
        return [int(t * h * w) for t, h, w in self._grid_thw.tolist()]

    def _image_order(self) -> list[torch.Tensor] | None:
        """Per image, the index of each image-order patch in the ViT's running order (None: same)."""
        return None

    def vision_attention_probs(self, attn, args: tuple, kwargs: dict) -> VitMaps:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        maps = qwen_vision_attention_probs(
            attn, hidden, kwargs["cu_seqlens"], kwargs["position_embeddings"], self._image_lengths()
        )
        order = self._image_order()
        if order is not None:
            maps = [m[o][:, o] for m, o in zip(maps, order)]
        return maps

    def patch_entropy(self, pixel_values: torch.Tensor, mean, std) -> VitMaps:
        """Per image, each patch's value is the grey-level entropy of its merge group's pixel region."""
        n = pixel_values.shape[0]
        channels = int(self.config.vision_config.in_channels)
        px = pixel_values.detach().float().reshape(n, channels, -1)
        m = torch.tensor(mean, dtype=torch.float32, device=px.device).view(1, -1, 1)
        s = torch.tensor(std, dtype=torch.float32, device=px.device).view(1, -1, 1)
        levels = ((px * s + m).clamp(0.0, 1.0) * 255.0).mean(dim=1).round().clamp(0, 255).long()  # (n, T·p·p)
        group = self.merge_size**2
        region = entropy_of_levels(levels.reshape(n // group, -1)).repeat_interleave(group)
        return list(torch.split(region, self._image_lengths()))

    # -- layout ---------------------------------------------------------------------------------
    def layout(self, image_mask: torch.Tensor, forward_kwargs: dict, n_crops: int) -> TokenLayout:
        grid = forward_kwargs.get("image_grid_thw")
        if grid is None:
            raise ConfigError("Qwen-VL pruning needs `image_grid_thw` (as the processor returns it)")
        return self._grid_layout(image_mask, grid, video=False)

    def video_unsupported(self) -> str | None:
        return None

    def video_layout(self, video_mask: torch.Tensor, forward_kwargs: dict, n_frames: int) -> TokenLayout:
        grid = forward_kwargs.get("video_grid_thw")
        if grid is None:
            raise ConfigError("Qwen-VL video pruning needs `video_grid_thw` (as the processor returns it)")
        return self._grid_layout(video_mask, grid, video=True)

    def _grid_layout(self, mask: torch.Tensor, grid: torch.Tensor, video: bool) -> TokenLayout:
        """Tokens of the images (or videos) of `grid` (n, 3): t groups of (h/2)×(w/2) merged tokens each."""
        merge = self.merge_size
        unit = float(self.patch_size * merge)  # pixels per merged token side
        dev = mask.device
        rows, cols, images, frames = [], [], [], []
        for i, (t, h, w) in enumerate(grid.tolist()):
            gh, gw = int(h) // merge, int(w) // merge
            rows.append(torch.arange(gh, device=dev).repeat_interleave(gw).repeat(int(t)))
            cols.append(torch.arange(gw, device=dev).repeat(gh * int(t)))
            images.append(torch.full((int(t) * gh * gw,), i, dtype=torch.long, device=dev))
            frames.append(torch.arange(int(t), device=dev).repeat_interleave(gh * gw))
        row, col = torch.cat(rows), torch.cat(cols)
        region = torch.stack([row * unit, col * unit, (row + 1) * unit, (col + 1) * unit], -1).float()
        tokens = tokens_from_flat(mask, image=torch.cat(images), row=row, col=col, region=region)
        if video:
            tokens.video = torch.ones_like(tokens.prunable)
            tokens.frame = split_batch(torch.cat(frames), mask)
        group = merge * merge

        def pack(vit_map: VitMaps) -> torch.Tensor:
            flat = torch.cat([x.reshape(-1) for x in vit_map]) if isinstance(vit_map, list) else vit_map.reshape(-1)
            return split_batch(flat.float().view(-1, group).mean(-1), mask)

        return TokenLayout(tokens=tokens, pack=pack)


@register_adapter
class Qwen2VLAdapter(QwenVLAdapter):
    family = "qwen2_vl"
    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2VLModel")
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
