"""Shared fixtures: tiny random models built from the package's configs (no downloads)."""

from __future__ import annotations

import functools

import pytest
import torch

from vflowopt.tiny import build_inputs, example_image, tiny_llava, tiny_llava_onevision

torch.set_num_threads(2)

BUILDERS = {"llava": tiny_llava, "llava_onevision": tiny_llava_onevision}


_BUILT: list = []


@functools.cache
def _cached(family: str, attn: str):
    pair = BUILDERS[family](attn_implementation=attn)
    _BUILT.append(pair[0])
    return pair


@pytest.fixture
def make_model():
    """make_model(family, attn) -> (model, processor); cached, so tests must leave models unpruned."""

    def make(family: str = "llava_onevision", attn: str = "sdpa"):
        return _cached(family, attn)

    return make


@pytest.fixture(autouse=True)
def _unprune_cached_models():
    yield
    import vflowopt

    for model in _BUILT:
        vflowopt.unprune(model)


def one_image_inputs(processor, seed: int = 0, prompt: str = "What is in the image?"):
    return build_inputs(processor, [example_image(seed=seed)], [prompt])


def all_hooks(model) -> int:
    return sum(
        len(m._forward_pre_hooks) + len(m._forward_hooks) + len(m._forward_hooks_with_kwargs)
        for m in model.modules()
    )


@pytest.fixture
def tiny(make_model):
    """The optimizer tests' model: the cached tiny LLaVA-OneVision (6 LLM layers)."""
    return make_model("llava_onevision")


@pytest.fixture
def samples(tiny):
    """Two calibration samples for `tiny`, of different image sizes."""
    _, processor = tiny
    prompt = "What is in the image?"
    return [build_inputs(processor, [example_image(seed=s, size=(56 + 24 * s, 80))], [prompt]) for s in range(2)]
