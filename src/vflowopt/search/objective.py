"""The objective of strategy optimization (VFlowOpt paper eq. 8 / Algorithm 1).

f(s) = Σ over samples of cos(h, h_s), where h is the last-layer, final-normed hidden state of the
last prompt token at prefill without pruning and h_s the same with strategy s. Only prefill runs: the
base model (`model.model`, whose `last_hidden_state` is already final-normed for the supported
families) is called without a KV cache, so neither generation nor the lm_head is computed. The
unpruned references are computed once per sample and cached (the official code recomputes them in
every trial). A NaN cosine counts as 0 and is reported in `Evaluation.nan_samples`.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..api import pruned
from ..config import ConfigError, PruneConfig
from ..errors import CalibrationWarning
from ..models.base import adapter_for

__all__ = ["Evaluation", "Objective", "model_fingerprint", "samples_fingerprint"]


@dataclass
class Evaluation:
    """One strategy evaluated on every sample."""

    value: float  # Σ cos, NaN counted as 0
    cosines: list[float]
    nan_samples: int = 0
    mean_retention: float = 0.0  # measured, averaged over the samples
    visual_tokens: list[int] = field(default_factory=list)  # prunable visual tokens produced, per sample
    seconds: float = 0.0


class Objective:
    """Evaluates strategies on a fixed list of samples (processor outputs, as given to `model(**x)`).

    `cache_references=False` recomputes the unpruned reference in every evaluation, as the official
    code does; it exists to measure what the cache saves.
    """

    def __init__(self, model: nn.Module, samples: Sequence[Mapping], *, cache_references: bool = True):
        self.model = model
        self.adapter = adapter_for(model)
        self.samples = check_samples(samples, self.adapter)
        self.cache_references = cache_references
        self._references: torch.Tensor | None = None
        self.reference_seconds = 0.0

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def device(self) -> torch.device:
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover - a model without parameters
            return torch.device("cpu")

    def _inputs(self, sample: Mapping) -> dict:
        device = self.device
        return {k: v.to(device) if torch.is_tensor(v) else v for k, v in sample.items()}

    def last_token_state(self, sample: Mapping) -> torch.Tensor:
        """(D,) final-normed last-layer hidden state of the last prompt token, prefill only."""
        with torch.inference_mode():
            out = self.adapter.base(**self._inputs(sample), use_cache=False)
        return out.last_hidden_state[0, -1].float()

    def references(self) -> torch.Tensor:
        """(n_samples, D) unpruned references, computed on the first call and cached."""
        if self._references is None or not self.cache_references:
            t0 = time.perf_counter()
            self._references = torch.stack([self.last_token_state(x) for x in self.samples])
            self.reference_seconds = time.perf_counter() - t0
        return self._references

    def evaluate(self, config: PruneConfig) -> Evaluation:
        """f(config): the sum over samples of cos(h, h_s), with pruning attached for the duration."""
        t0 = time.perf_counter()
        refs = self.references()
        cosines, retention, visual = [], [], []
        nan = 0
        # A search over VFlowOpt's threshold t meets empty calibration sets by design: not worth a warning
        # per trial (stats.method_info still reports them).
        with warnings.catch_warnings(), pruned(self.model, config) as handle:
            warnings.simplefilter("ignore", CalibrationWarning)
            for i, sample in enumerate(self.samples):
                h_s = self.last_token_state(sample)
                cos = float(torch.nn.functional.cosine_similarity(refs[i], h_s, dim=0))
                if cos != cos:  # NaN
                    nan += 1
                    cos = 0.0
                cosines.append(cos)
                retention.append(handle.stats.mean_retention)
                visual.append(handle.stats.visual_tokens)
        return Evaluation(
            value=float(sum(cosines)), cosines=cosines, nan_samples=nan,
            mean_retention=sum(retention) / len(retention), visual_tokens=visual,
            seconds=time.perf_counter() - t0,
        )


def check_samples(samples: Sequence[Mapping], adapter) -> list[dict]:
    """Samples must be processor outputs with `input_ids` (batch 1) and image placeholders."""
    if isinstance(samples, Mapping) or not isinstance(samples, Sequence):
        raise ConfigError("samples must be a list of processor outputs (one dict of tensors per sample)")
    if not samples:
        raise ConfigError("no samples: optimize needs at least one processor output with an image")
    out = []
    for i, x in enumerate(samples):
        if not isinstance(x, Mapping) or not torch.is_tensor(x.get("input_ids")):
            raise ConfigError(f"sample {i} is not a processor output with input_ids (got {type(x).__name__})")
        ids = x["input_ids"]
        if ids.dim() != 2 or ids.shape[0] != 1:
            raise ConfigError(f"sample {i} has input_ids of shape {tuple(ids.shape)}; give one prompt per sample")
        if not bool((ids == adapter.image_token_id).any()):
            raise ConfigError(f"sample {i} has no image placeholder tokens; every sample needs an image")
        out.append(dict(x))
    return out


def _digest_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def samples_fingerprint(samples: Sequence[Mapping]) -> str:
    """A short hash of the sample tensors: a study only ever mixes trials on the same samples."""
    h = hashlib.blake2b(digest_size=8)
    for x in samples:
        for key in sorted(x):
            value = x[key]
            h.update(key.encode())
            if torch.is_tensor(value):
                _digest_tensor(h, value)
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model class, its text config shape and a slice of its embedding weights,
    so that two checkpoints with the same architecture are told apart cheaply."""
    adapter = adapter_for(model)
    h = hashlib.blake2b(digest_size=8)
    text = adapter.config.get_text_config()
    h.update(f"{type(model).__name__}/{adapter.family}/{adapter.num_llm_layers}/{text.hidden_size}".encode())
    weight = model.get_input_embeddings().weight
    _digest_tensor(h, weight.reshape(-1)[:4096].float())
    return h.hexdigest()
