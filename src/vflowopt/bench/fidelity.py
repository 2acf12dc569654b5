"""Fidelity of a pruned forward to the unpruned one on the same inputs.

* :func:`cosine` - cosine similarity of the last prompt token's final (final-normed) hidden state.
* :func:`next_token_kl` - KL(P_full || P_pruned) of the next-token distributions at the last prompt
  position, in nats: ``sum_v p_full(v) * (log p_full(v) - log p_pruned(v))``, softmax of the logits in
  float32. The unpruned model is the reference distribution, so the number says how much information
  about the unpruned prediction is lost.
* :func:`token_agreement` - fraction of the N greedily generated tokens that equal the unpruned model's
  token at the same position (position by position; a missing token counts as a disagreement).
"""

from __future__ import annotations

import torch

__all__ = ["cosine", "next_token_kl", "token_agreement"]


def cosine(reference: torch.Tensor, other: torch.Tensor) -> float:
    a = reference.detach().float().flatten()
    b = other.detach().float().flatten().to(a.device)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def next_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(softmax(reference) || softmax(logits)) in nats, over the last dimension (float32)."""
    p_log = torch.log_softmax(reference_logits.detach().float().flatten(), dim=-1)
    q_log = torch.log_softmax(logits.detach().float().flatten().to(p_log.device), dim=-1)
    kl = torch.sum(p_log.exp() * (p_log - q_log))
    return max(0.0, float(kl))


def token_agreement(reference_tokens, tokens) -> float:
    ref = [int(t) for t in reference_tokens]
    other = [int(t) for t in tokens]
    if not ref:
        return 1.0 if not other else 0.0
    same = sum(1 for i, t in enumerate(ref) if i < len(other) and other[i] == t)
    return same / max(len(ref), len(other))
