"""End-to-end checks every model family must pass, shared by the per-family test files."""

from __future__ import annotations

import torch

import vflowopt


def generate(model, inputs, n: int = 5, **kw):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False, **kw)


def full_sequence_inputs(inputs, ids):
    """Processor outputs for `ids` = prompt + generated tokens (Qwen: generated tokens are text)."""
    full = dict(inputs, input_ids=ids, attention_mask=torch.ones_like(ids))
    if "mm_token_type_ids" in inputs:
        mm = inputs["mm_token_type_ids"]
        pad = torch.zeros(mm.shape[0], ids.shape[1] - mm.shape[1], dtype=mm.dtype)
        full["mm_token_type_ids"] = torch.cat([mm, pad], 1)
    return full


def no_cache_last_logits(model, inputs, ids):
    with torch.no_grad():
        return model(**full_sequence_inputs(inputs, ids), use_cache=False).logits[:, -1]


def check_identity(model, inputs, config) -> None:
    """At budget 1.0, with every hook active, logits and generated tokens are bit-identical."""
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens = generate(model, inputs)
    with vflowopt.pruned(model, config) as h:
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = generate(model, inputs)
        assert h.stats.mean_retention == 1.0
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


def check_cache_and_decode(model, inputs, config, n_new: int = 4):
    """Each layer's KV cache holds what it saw at prefill plus the fed-back tokens, later layers hold
    fewer, and the last decode step equals a no-cache forward of the same sequence with pruning
    attached. Returns the prefill's stats."""
    with vflowopt.pruned(model, config) as h:
        out = generate(model, inputs, n_new, return_dict_in_generate=True, output_logits=True)
        stats = h.stats
        kv = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
        assert kv == [n + n_new - 1 for n in stats.kv_tokens_per_layer]
        assert kv[-1] < kv[0]
        no_cache = no_cache_last_logits(model, inputs, out.sequences[:, :-1])
    assert torch.allclose(no_cache, out.logits[-1], atol=1e-4)
    return stats


BATCH_PROMPTS = ("What is in the image?", "How many circles are there in this picture?")  # different lengths


def check_batch_equals_singles(model, processor, images, config, prompts=BATCH_PROMPTS, n_new: int = 4) -> None:
    """A left-padded batch of equal-size images gives each sample's logits and tokens run alone."""
    from vflowopt.tiny import build_inputs

    with vflowopt.pruned(model, config):
        batch = build_inputs(processor, images, prompts)
        with torch.no_grad():
            b_logits = model(**batch).logits[:, -1]
        b_tokens = generate(model, batch, n_new)[:, -n_new:]
        for i, (img, prompt) in enumerate(zip(images, prompts)):
            single = build_inputs(processor, [img], [prompt])
            with torch.no_grad():
                s_logits = model(**single).logits[:, -1]
            assert torch.allclose(b_logits[i], s_logits[0], atol=1e-4)
            assert torch.equal(b_tokens[i], generate(model, single, n_new)[0, -n_new:])
