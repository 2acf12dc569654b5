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


# -- generic helpers for the method × family matrix (tests/test_conformance.py) -------------------------
def reference_outputs(model, inputs, n_new: int):
    """The unpruned model's (logits of the prompt, generated sequences)."""
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, generate(model, inputs, n_new)


def check_identity_against(model, inputs, config, ref_logits, ref_tokens, n_new: int) -> None:
    """check_identity with precomputed unpruned outputs (`reference_outputs`), so a matrix of methods
    on one model computes them once."""
    with vflowopt.pruned(model, config) as h:
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = generate(model, inputs, n_new)
        assert h.stats.mean_retention == 1.0 and h.stats.recycled_tokens == 0
    assert torch.equal(logits, ref_logits)
    assert torch.equal(tokens, ref_tokens)


class PrunedRun:
    """What one pruned generate() left behind: the prefill's stats, each layer's KV length, the
    sequences, the logits of the last generated token and the method's decisions at prefill."""

    def __init__(self, stats, kv, sequences, last_logits, n_new, decisions):
        self.stats, self.kv, self.sequences, self.last_logits = stats, kv, sequences, last_logits
        self.n_new, self.decisions = n_new, decisions


def _cache_of(output):
    """generate()'s KV cache: the `cache` field from transformers 5.24 on, `past_key_values` before
    (read from the declared field, so 5.24's deprecated alias and its warning are not touched)."""
    fields = getattr(output, "__dataclass_fields__", {})
    return next(getattr(output, name) for name in ("cache", "past_key_values")
                if name in fields and getattr(output, name) is not None)


def pruned_generate(model, inputs, config, n_new: int = 4) -> PrunedRun:
    import copy

    with vflowopt.pruned(model, config) as h:
        decisions = record_decisions(h)
        out = generate(model, inputs, n_new, return_dict_in_generate=True, output_logits=True)
        stats = copy.deepcopy(h.stats)
    kv = [layer.keys.shape[-2] for layer in _cache_of(out).layers]
    return PrunedRun(stats, kv, out.sequences, out.logits[-1], n_new, decisions)


def check_kv_lengths(run: PrunedRun) -> None:
    """Each layer's KV cache holds what it saw at prefill plus the fed-back tokens (any method: pruned
    before the LLM, all layers alike; inside it, later layers shorter)."""
    assert run.kv == [n + run.n_new - 1 for n in run.stats.kv_tokens_per_layer]
    assert all(b <= a for a, b in zip(run.kv, run.kv[1:]))  # a layer never sees more than the one before


def check_decode_matches_no_cache(model, inputs, config, run: PrunedRun) -> dict:
    """The last decode step of `run` equals a no-cache forward of the same sequence (prompt + generated
    tokens but the last) pruned with the same decisions as the prefill. A method that scores with the
    text (FastV's last token, SparseVLM's raters, ...) would select differently on the longer sequence;
    replaying the prefill's decisions keeps the oracle about the caches, positions and masks only (for
    the causal LLM, the prompt's hidden states do not depend on the tokens after it). Returns how many
    decisions the method would have taken differently on its own, per (decision, layer)."""
    with vflowopt.pruned(model, config) as h:
        differ = replay_decisions(h, run.decisions)
        no_cache = no_cache_last_logits(model, inputs, run.sequences[:, :-1])
    assert torch.allclose(no_cache, run.last_logits, atol=1e-4)
    return differ


def vflowopt_leftovers(model) -> list[str]:
    """Everything prune() may install that is still on `model`: hooks whose function comes from vflowopt,
    tapped attention configs, instance-level wrappers and the handle attribute. Empty when restored."""

    def ours(obj) -> bool:
        obj = getattr(obj, "func", obj)  # functools.partial
        obj = getattr(obj, "__func__", obj)  # bound method
        # a wrapper object copies the wrapped function's __module__: its class tells where it comes from
        return any((m or "").startswith("vflowopt") for m in (getattr(obj, "__module__", None), type(obj).__module__))

    found = []
    for name, m in model.named_modules():
        for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks"):
            found += [f"{name or 'model'}.{kind}: {fn!r}" for fn in getattr(m, kind, {}).values() if ours(fn)]
        config = getattr(m, "config", None)
        if config is not None and any("vflowopt" in k for k in vars(config)):
            found.append(f"{name or 'model'}.config is tapped")
        impl = getattr(config, "_attn_implementation", None)
        if isinstance(impl, str) and impl.startswith("vflowopt"):
            found.append(f"{name or 'model'}.config._attn_implementation = {config._attn_implementation}")
        found += [f"{name or 'model'}.{k} = {v!r}" for k, v in vars(m).items()
                  if not k.startswith("_") and callable(v) and ours(v)]
    if any("vflowopt" in k for k in vars(model)):
        found.append("model has a vflowopt attribute")
    return found


# Where a method decides (the PruningMethod contract): which tokens stay, and merged features.
_DECISIONS = ("at_vision_layer", "before_llm", "at_layer")


def _decision_key(name: str, args) -> tuple:
    if name == "at_vision_layer":
        return name, args[0]
    if name == "at_layer":
        return name, args[1]
    return (name,)


def _cloned(out):
    if out is None:
        return None
    if torch.is_tensor(out):
        return out.detach().clone()
    import dataclasses

    return dataclasses.replace(out, **{f.name: _cloned(getattr(out, f.name)) for f in dataclasses.fields(out)})


def record_decisions(handle) -> dict:
    """Records (cloned) every decision the handle's method returns from now on, in call order per
    (decision, layer)."""
    method, record = handle._engine.method, {}
    for name in _DECISIONS:
        inner = getattr(method, name)

        def recording(*args, _inner=inner, _name=name):
            out = _inner(*args)
            record.setdefault(_decision_key(_name, args), []).append(_cloned(out))
            return out

        setattr(method, name, recording)
    return record


def replay_decisions(handle, record: dict) -> dict:
    """Makes the handle's method return the recorded decisions, in the same order (it still computes its
    own, so its internal state advances as usual). Returns {key: number of replayed decisions that
    differ from what the method computed this time}."""
    method, calls, differ = handle._engine.method, {}, {}

    def same(a, b) -> bool:
        if a is None or b is None:
            return a is b
        if torch.is_tensor(a):
            return a.shape == b.shape and bool((a == b).all())
        import dataclasses  # a Selection or a VisionMerge: every field

        return all(same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))

    for name in _DECISIONS:
        inner = getattr(method, name)

        def replaying(*args, _inner=inner, _name=name):
            own = _inner(*args)
            key = _decision_key(_name, args)
            i = calls[key] = calls.get(key, -1) + 1
            recorded = record[key][i]
            differ[key] = differ.get(key, 0) + (not same(own, recorded))
            return recorded

        setattr(method, name, replaying)
    return differ
