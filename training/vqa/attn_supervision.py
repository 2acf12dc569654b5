"""Attention supervision of the answer position (a training aid of ``train.py --attn-weight``; not saved).

Why: the second shipped model (0.840, question-first, trained without this loss) could not count past two
(val: answers "three" 0/13 right) and was at 0.66 on left/right, although its image tokens already marked
what a question is about (the match probe).
Reading those marks is one attention step: the answer position attends to the referred objects (one key per
object: its centre patch) and to ``<s>`` as a sink, so the share of attention that leaves the sink grows with
the number of objects, and a head that attends to the second object of a position question reads that
object's place. This loss teaches two heads of one LM layer exactly that, instead of waiting for the answer
loss to discover it.

Targets per question-first sequence, over its key positions (``<s>`` always included):

* head 0: the centre patches of the objects the question is about (``scenes.referents`` label 1); for a
  digit question every digit-plate patch;
* head 1: the centre patch of the second object of a position question (label 2); ``<s>`` alone otherwise.

The loss is the cross-entropy between that uniform target and the head's attention row at the position that
predicts the answer (the last ``:`` of ``ASSISTANT:``), recomputed from the layer's inputs (works with any
attention implementation).
"""

from __future__ import annotations

import sys

import torch

from vflowopt.vqa import scenes as S

__all__ = ["AttentionTap", "answer_positions", "attention_targets", "attention_loss"]

#: Heads of ``--attn-layer`` whose answer-position attention is supervised (see the module docstring).
SUPERVISED_HEADS = 2


class AttentionTap:
    """Keeps the inputs (hidden states, rotary cos/sin) of one LM layer's self-attention on each forward."""

    def __init__(self, model, layer: int):
        layers = model.model.language_model.layers
        if not 0 <= layer < len(layers):
            raise ValueError(f"--attn-layer {layer}: the LM has layers 0...{len(layers) - 1}")
        self.attn = layers[layer].self_attn
        if self.attn.config.num_attention_heads < SUPERVISED_HEADS:
            raise ValueError(f"attention supervision needs {SUPERVISED_HEADS} heads per layer")
        self.hidden: torch.Tensor | None = None
        self.rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._handle = self.attn.register_forward_pre_hook(self._grab, with_kwargs=True)

    def _grab(self, module, args, kwargs):
        self.hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self.rotary = kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1]

    def remove(self) -> None:
        self._handle.remove()

    def answer_log_attention(self, query_pos: torch.Tensor) -> torch.Tensor:
        """``(seq, SUPERVISED_HEADS, keys)`` log attention of the supervised heads at ``query_pos`` (causal)."""
        attn, hidden = self.attn, self.hidden
        rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        d = attn.head_dim
        n_kv = attn.config.num_key_value_heads
        group = attn.config.num_attention_heads // n_kv
        q = attn.q_proj(hidden[rows, query_pos])[:, : SUPERVISED_HEADS * d].view(-1, SUPERVISED_HEADS, 1, d)
        k = attn.k_proj(hidden).view(hidden.shape[0], hidden.shape[1], n_kv, d).transpose(1, 2)
        k = k[:, [h // group for h in range(SUPERVISED_HEADS)]]
        cos, sin = (t.expand(hidden.shape[0], -1, -1) for t in self.rotary)  # batch dim may be 1
        q, _ = rope(q, q, cos[rows, query_pos][:, None], sin[rows, query_pos][:, None])
        _, k = rope(k, k, cos, sin)
        scores = (q @ k.transpose(-1, -2)).squeeze(2).float() * attn.scaling
        future = torch.arange(hidden.shape[1], device=hidden.device)[None, :] > query_pos[:, None]
        return scores.masked_fill(future[:, None], float("-inf")).log_softmax(-1)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per sequence, the position whose next-token prediction is the (first) answer word."""
    has = labels != -100
    return has.float().argmax(-1) - 1


def attention_targets(batch: dict[str, torch.Tensor], image_token_id: int) -> torch.Tensor:
    """``(seq, SUPERVISED_HEADS, keys)`` target distributions (see the module docstring)."""
    ids = batch["input_ids"]
    image = ids == image_token_id
    n_seq, n_keys = ids.shape
    referent = batch["referent"]
    centre = batch["patch_centre"][batch["scene_index"]] > 0
    digit = (batch["answer_type"] == S.QUESTION_TYPES.index("digit")).any(-1, keepdim=True)
    on_image = torch.stack([(referent == 1) & (centre | digit), (referent == 2) & centre], dim=1)
    target = torch.zeros(n_seq, SUPERVISED_HEADS, n_keys, device=ids.device)
    target[:, :, 0] = 1.0  # <s>: the sink
    target.masked_scatter_(image[:, None].expand_as(target), on_image.to(target.dtype))
    return target / target.sum(-1, keepdim=True)


def attention_loss(tap: AttentionTap, batch: dict[str, torch.Tensor],
                   image_token_id: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy of the supervised heads' answer-position attention against :func:`attention_targets`, and
    the share of head 0's attention on its target keys."""
    logp = tap.answer_log_attention(answer_positions(batch["labels"]))
    target = attention_targets(batch, image_token_id)
    loss = -(target * logp.masked_fill(target == 0, 0.0)).sum(-1).mean()
    mass = (logp[:, 0].exp() * (target[:, 0] > 0)).sum(-1).mean()
    return loss, {"attn_loss": float(loss.detach()), "attn_target_mass": float(mass.detach())}
