"""Measurements computed on the side of the model's own forward (never changing it)."""

from .attention import vision_attention_probs
from .entropy import patch_entropy

__all__ = ["patch_entropy", "vision_attention_probs"]
