"""What the runtime needs to know about a model family, and nothing about any method.

An adapter says where the vision tower, its layers, the language model and its decoder layers are,
and maps every visual token entering the LLM to (image, grid, row, col, pixel region, prunable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import ConfigError, PruningError
from ..signals.attention import vision_attention_probs
from ..signals.entropy import patch_entropy

# A ViT-level map: one row per crop (n_crops, n_patches), or one vector per image when images have
# different token counts (Qwen-VL).
VitMaps = torch.Tensor | list[torch.Tensor]


@dataclass
class VisualTokens:
    """All visual tokens of one forward, shape (B, Nv) each (every sample has the same Nv).

    `image` numbers the visual units of a sample, each with its own share of the budget: its images,
    then its videos (or, with `video_scope="frame"`, each frame of a video; see `frame_units`).
    `video` marks the tokens of videos; `frame` is a video token's frame (Qwen-VL: temporal group of
    2 frames), 0 for images. `grid` numbers the separate token grids of an image (0 = base grid,
    1 = anyres crop grid); `region` is (y0, x0, y1, x1) in pixels of that grid's processed canvas (of
    the frame, for videos); newline and CLS tokens have `prunable=False`: they are always kept and
    never counted in the budget.
    """

    seq_index: torch.Tensor
    image: torch.Tensor
    grid: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    region: torch.Tensor
    prunable: torch.Tensor
    video: torch.Tensor | None = None
    frame: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.video is None:
            self.video = torch.zeros_like(self.prunable, dtype=torch.bool)
        if self.frame is None:
            self.frame = torch.zeros_like(self.image)

    @property
    def batch_size(self) -> int:
        return self.seq_index.shape[0]

    @property
    def count(self) -> int:
        return self.seq_index.shape[1]


@dataclass
class TokenLayout:
    """The visual tokens of a forward plus the packing of ViT-level maps onto them."""

    tokens: VisualTokens
    # ViT-level map (one row per image/crop as fed to the vision tower, CLS removed; see VitMaps)
    # -> (B, Nv) map aligned with `tokens`; non-prunable tokens get NaN.
    pack: Callable[[VitMaps], torch.Tensor]


class FeatureCountMismatch(PruningError):
    """The visual tokens derived from the vision pass do not match the placeholders in the prompt."""


class ModelAdapter:
    """Base class: one subclass per model family (one file each in models/)."""

    family: str = ""
    # Model classes (by name) this adapter handles; matched on the model's class name.
    class_names: tuple[str, ...] = ()
    # Normalisation of the family's standard image processor, to undo it for patch entropy.
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    # Arguments of get_image_features that the layout needs (generate() drops them from the forward).
    image_kwargs: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.base = model.model if hasattr(model, "model") else model
        self.config = model.config

    # -- structure ---------------------------------------------------------------------------
    @property
    def text_model(self) -> nn.Module:
        return self.base.language_model

    @property
    def decoder_layers(self) -> Sequence[nn.Module]:
        return self.text_model.layers

    @property
    def num_llm_layers(self) -> int:
        return int(self.config.text_config.num_hidden_layers)

    @property
    def vision_tower(self) -> nn.Module:
        return self.base.vision_tower

    @property
    def vision_layers(self) -> Sequence[nn.Module]:
        return self.vision_tower.encoder.layers

    @property
    def vision_towers(self) -> list[nn.Module]:
        """Every vision tower the model runs (Video-LLaVA: one for images, one for videos); the runtime
        hooks them all the same way (`vision_layers_of`, `vision_attention_of`)."""
        return [self.vision_tower]

    def vision_layers_of(self, tower: nn.Module) -> Sequence[nn.Module]:
        return self.vision_layers

    def vision_attention_of(self, tower: nn.Module, layer: int) -> nn.Module:
        return self.vision_attention(layer)

    def vision_attention(self, layer: int) -> nn.Module:
        return self.vision_layers[layer].self_attn

    @property
    def patch_size(self) -> int:
        return int(self.config.vision_config.patch_size)

    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    @property
    def vit_prefix_tokens(self) -> int:
        """Tokens before the patches in the ViT sequence (1 for CLIP's CLS, 0 for SigLIP)."""
        return 0

    def vision_attention_probs(self, attn: nn.Module, args: tuple, kwargs: dict) -> VitMaps:
        """Head-averaged attention (rows = queries) of one vision layer, from its forward inputs:
        (n_crops, N, N), or a list of (N_i, N_i) when images have different token counts."""
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        return vision_attention_probs(attn, hidden)

    def patch_entropy(self, pixel_values: torch.Tensor, mean, std) -> VitMaps:
        """Entropy of the pixel region of every ViT token, shaped like the attention maps (no CLS)."""
        return patch_entropy(pixel_values, self.patch_size, mean, std)

    @property
    def num_vision_layers(self) -> int:
        """Layers of the vision encoder as configured: the count negative layer indices refer to (a serving
        engine may build only the layers up to the feature layer, so `len(vision_layers)` can be smaller)."""
        n = getattr(self.config.vision_config, "num_hidden_layers", None)
        return int(n) if isinstance(n, int) else len(self.vision_layers)

    def feature_layer(self) -> int:
        """Index of the vision-encoder layer whose output becomes the image features."""
        layer = self.config.vision_feature_layer
        if not isinstance(layer, int):
            layer = max(layer, key=lambda i: i % (self.num_vision_layers + 1))
        n_hidden = self.num_vision_layers + 1  # hidden_states[0] is the embeddings
        index = layer % n_hidden
        if index == 0:
            raise ConfigError("vision_feature_layer selects the patch embeddings; no attention layer to score")
        return index - 1

    def check_vision_layer(self, layer: int) -> int:
        n = self.num_vision_layers
        if not isinstance(layer, int) or isinstance(layer, bool) or not -n <= layer < n:
            raise ConfigError(
                f"vision_layer must be an integer in [{-n}, {n - 1}] for this vision tower, got {layer!r}"
            )
        return layer % n

    # -- pruning inside the vision encoder (the V point) -----------------------------------------
    #: True when the ViT runs all images as one flat sequence (Qwen-VL), False for (n_crops, N, D).
    vit_flat: bool = False

    @property
    def vit_group(self) -> int:
        """Consecutive ViT tokens that form one LLM token (the merge group); they are pruned together."""
        return 1

    def vision_projectors(self) -> list[nn.Module]:
        """Modules whose input is a ViT hidden state of the current image pass (the projector, Qwen's
        mergers): after pruning inside the ViT the runtime scatters their input back to full length."""
        return [self.base.multi_modal_projector]

    def vision_pruning_unsupported(self) -> str | None:
        """Why tokens cannot be dropped inside this model's vision encoder, or None when they can."""
        layer = getattr(self.config, "vision_feature_layer", -1)
        if not isinstance(layer, int):
            return (f"vision_feature_layer {layer} concatenates several ViT layers; pruning inside the vision "
                    "encoder needs a single feature layer")
        return None

    def vit_image_lengths(self) -> list[int] | None:
        """Flat towers: tokens per image of the last vision pass, in running order."""
        return None

    def vit_running_maps(self, flat_map: torch.Tensor) -> VitMaps:
        """Flat towers: a (N,) map in the ViT's running order -> one image-order vector per image."""
        raise NotImplementedError

    def slice_vision_layer_inputs(self, kwargs: dict, ids: torch.Tensor, cache: dict) -> None:
        """Slice, in place, a ViT layer's positional inputs to the tokens `ids` still present (Qwen-VL:
        rotary embeddings and cu_seqlens). CLIP/SigLIP layers have none."""

    # -- per forward -------------------------------------------------------------------------
    @property
    def min_llm_prune_layer(self) -> int:
        """The first LLM layer at whose input tokens may be pruned (later for Qwen3-VL's deepstack)."""
        return 0

    def on_vision_input(self, args: tuple, kwargs: dict) -> None:
        """Called with the vision tower's forward inputs before each vision pass (e.g. to record
        Qwen's `grid_thw`, needed to split and order its flattened patches)."""

    def slice_llm_inputs(self, kwargs: dict, keep: torch.Tensor) -> None:
        """Slice, in place, family-specific language-model inputs indexed by sequence position when
        only the prompt tokens `keep` (B, S) enter the LLM (e.g. Qwen3-VL's deepstack inputs)."""

    def rotary_positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """The rows of the language model's `position_ids` that feed its rotary embedding."""
        return position_ids

    def layout(self, image_mask: torch.Tensor, forward_kwargs: dict, n_crops: int) -> TokenLayout:
        """The visual tokens of a prefill; `image_mask` (B, L) marks image placeholder tokens and
        `forward_kwargs` are the base model's forward kwargs (image_sizes, ...)."""
        raise NotImplementedError

    # -- video ----------------------------------------------------------------------------------
    #: Arguments of get_video_features that the video layout needs (generate() drops them from the forward).
    video_kwargs: tuple[str, ...] = ()

    @property
    def video_token_id(self) -> int | None:
        """The video placeholder id, or None for families without video input."""
        for name in ("video_token_id", "video_token_index"):
            value = getattr(self.config, name, None)
            if value is not None:
                return int(value)
        return None

    def video_unsupported(self) -> str | None:
        """Why this family's video tokens cannot be pruned, or None when they can (`video_layout`)."""
        return f"vflowopt has no video token layout for the {self.family} family"

    def video_layout(self, video_mask: torch.Tensor, forward_kwargs: dict, n_frames: int) -> TokenLayout:
        """The video tokens of a prefill: `video_mask` (B, L) marks video placeholders, `n_frames` is the
        number of rows (frames) the vision tower saw in the video pass (flat towers: videos). Maps given
        to `pack` are ViT-level maps of the video pass, one row per frame (flat: one vector per video)."""
        raise NotImplementedError(self.video_unsupported())

    def vision_pass_state(self) -> object:
        """What the adapter recorded about the current vision pass (Qwen: its grid_thw), so that the runtime
        can hand a method the signals of several passes (images, then videos) as one."""
        return None

    def restore_vision_passes(self, states: list) -> None:
        """Make the adapter describe the given vision passes, in order, as one (see `vision_pass_state`)."""


_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    _ADAPTERS.append(cls)
    return cls


def supported_families() -> list[str]:
    """Families with a registered adapter (models/__init__.py imports every family file)."""
    return [a.family for a in _ADAPTERS]


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter of a loaded model, or a ConfigError naming the supported families."""
    families = supported_families()
    name = type(model).__name__
    for cls in _ADAPTERS:
        if name in cls.class_names:
            return cls(model)
    raise ConfigError(
        f"no vflowopt adapter for model class {name}; supported families: {', '.join(families)} "
        f"(classes: {', '.join(c for a in _ADAPTERS for c in a.class_names)})"
    )


def image_mask_from(base: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                    image_token_id: int) -> torch.Tensor | None:
    """(B, L) bool mask of image placeholders, from ids or (like transformers) from embeddings."""
    if input_ids is not None:
        return input_ids == image_token_id
    if inputs_embeds is None:
        return None
    embed = base.get_input_embeddings()(torch.tensor(image_token_id, device=inputs_embeds.device))
    return (inputs_embeds == embed).all(-1)


def grid_tokens(
    n_images: int, side_h: int, side_w: int, patch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row, col and pixel region of every token of `n_images` plain h×w patch grids, flattened."""
    rows = torch.arange(side_h, device=device).repeat_interleave(side_w)
    cols = torch.arange(side_w, device=device).repeat(side_h)
    region = torch.stack([rows * patch, cols * patch, (rows + 1) * patch, (cols + 1) * patch], -1).float()
    return rows.repeat(n_images), cols.repeat(n_images), region.repeat(n_images, 1)


def tokens_from_flat(image_mask: torch.Tensor, *, image: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                     region: torch.Tensor, grid: torch.Tensor | None = None,
                     prunable: torch.Tensor | None = None) -> VisualTokens:
    """VisualTokens from per-token values in flattened (B, L) placeholder order (all images of the
    batch in a row; `image` numbered over the batch): split per sample, images renumbered within
    their sample, grid 0 and every token prunable unless given."""
    image = split_batch(image, image_mask)
    everything = torch.ones_like(image, dtype=torch.bool)
    return VisualTokens(
        seq_index=split_batch(image_mask.nonzero()[:, 1], image_mask),
        image=image - image[:, :1],
        grid=split_batch(grid, image_mask) if grid is not None else torch.zeros_like(image),
        row=split_batch(row, image_mask),
        col=split_batch(col, image_mask),
        region=split_batch(region, image_mask),
        prunable=split_batch(prunable, image_mask) if prunable is not None else everything,
    )


def video_counts(video_mask: torch.Tensor, forward_kwargs: dict, n_frames: int, per_frame: int) -> tuple[int, int]:
    """(videos, frames per video) of a prompt whose videos are stacked in `pixel_values_videos` (V, F, ...),
    checked against the frames the tower saw and the video placeholders (`per_frame` tokens per frame)."""
    shape = forward_kwargs.get("pixel_values_videos_shape")
    if shape is None:
        raise FeatureCountMismatch("the video layout needs the shape of pixel_values_videos (videos, frames, ...)")
    n_videos, frames = int(shape[0]), int(shape[1])
    total = int(video_mask.sum())
    if n_videos * frames != n_frames or total != n_frames * per_frame:
        raise FeatureCountMismatch(
            f"{n_videos} videos of {frames} frames ({per_frame} tokens each) do not match the {total} video "
            f"placeholders of the prompt (the tower saw {n_frames} frames)"
        )
    return n_videos, frames


def join_vit_maps(parts: list) -> VitMaps | None:
    """ViT-level maps of several vision passes as one, in pass order (images, then videos), as a merged
    layout's `pack` takes them: rows of batched towers stacked, per-image vectors of flat towers listed.
    None when there is nothing to join or the passes' rows have different lengths."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, list) for p in parts):
        return [row for p in parts for row in (p if isinstance(p, list) else list(p))]
    if len({tuple(p.shape[1:]) for p in parts}) > 1:
        return None
    return torch.cat(parts, 0)


def frame_units(tokens: VisualTokens) -> VisualTokens:
    """The same tokens with every frame of a video as a unit of its own (`video_scope="frame"`): each
    frame then keeps its share of the budget, instead of the whole video competing for the video's."""
    frame = torch.where(tokens.video, tokens.frame, torch.full_like(tokens.frame, -1))  # images: one unit each
    pairs = torch.stack([tokens.image, frame], -1)  # (B, Nv, 2)
    units = [torch.unique(row, dim=0, return_inverse=True)[1] for row in pairs]
    return replace(tokens, image=torch.stack(units) if units else tokens.image)


def merge_layouts(image: TokenLayout, video: TokenLayout, image_units: int, image_vit_tokens: int = 0) -> TokenLayout:
    """One layout of a prompt with images and videos: the tokens of both in prompt order, the videos'
    units numbered after the sample's images. `pack` takes the ViT-level maps of the image pass followed by
    those of the video pass (`image_units` rows or vectors, or for a flat map `image_vit_tokens` values)."""
    ti, tv = image.tokens, video.tokens
    offset = ti.image.amax(1, keepdim=True) + 1 if ti.count else torch.zeros_like(tv.image[:, :1])
    joined = {f: torch.cat([getattr(ti, f), getattr(tv, f)], 1) for f in ti.__dataclass_fields__}
    joined["image"] = torch.cat([ti.image, tv.image + offset], 1)
    order = torch.argsort(joined["seq_index"], dim=1, stable=True)

    def reorder(x: torch.Tensor) -> torch.Tensor:
        index = order if x.dim() == 2 else order.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return torch.gather(x, 1, index.to(x.device))

    tokens = VisualTokens(**{f: reorder(v) for f, v in joined.items()})

    def pack(vit_map: VitMaps) -> torch.Tensor:
        if isinstance(vit_map, list):
            first, second = vit_map[:image_units], vit_map[image_units:]
        elif image_vit_tokens:  # a flat tower's map, one value per ViT token in running order
            flat = vit_map.reshape(-1)
            first, second = flat[:image_vit_tokens], flat[image_vit_tokens:]
        else:
            first, second = vit_map[:image_units], vit_map[image_units:]
        a = image.pack(first)
        both = torch.cat([a, video.pack(second).to(a.device)], 1)
        return torch.gather(both, 1, order.to(both.device))

    return TokenLayout(tokens=tokens, pack=pack)


def split_batch(flat: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """Reshape per-visual-token values in flattened (B, L) order into (B, Nv); refuses ragged batches."""
    counts = image_mask.sum(-1)
    if not bool((counts == counts[0]).all()):
        raise PruningError(
            "vflowopt prunes a batch only when every sample has the same number of visual tokens; "
            f"got {counts.tolist()} image tokens per sample. Run these samples one at a time, or give "
            "them images of the same size."
        )
    if flat.shape[0] != int(counts.sum()):
        raise FeatureCountMismatch(
            f"the image features ({flat.shape[0]} tokens) do not match the image placeholders in the "
            f"prompt ({int(counts.sum())})"
        )
    return flat.reshape(image_mask.shape[0], int(counts[0]), *flat.shape[1:])
