"""What a serving engine prunes: the strategy file read, checked and reduced to its pre-LLM stage.

A serving engine (vLLM) sizes every request's paged KV cache from the prompt length before the LLM
runs, so only a selection made before the LLM fits: the placeholders an image gets in the prompt must
be known from the image's grid alone, before its encoder runs. This module is pure (it imports no
engine), so the main test suite covers it: which methods are served, why the others are refused, the
strategy's family check, and the placeholder-count arithmetic.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, replace

from ..budget import keep_count
from ..config import PruneConfig, load_config
from ..errors import ConfigError

logger = logging.getLogger("vflowopt.serving")

#: The environment variable naming the strategy file (a JSON saved by `cfg.save()` / `vflowopt optimize`).
ENV_VAR = "VFLOWOPT_VLLM_CONFIG"

#: Methods whose pre-LLM selection needs only the vision side (features, pixels, vision attention).
SERVED_METHODS = ("random", "pool", "divprune", "visionzip", "vflowopt")

_IN_LLM = ("prunes inside the LLM, at decoder layer(s): vLLM allocates each request's paged KV cache for "
           "the full prompt before the LLM runs, so a layer cannot drop tokens")
#: Why each other built-in method is not served (one line each, shown to the user).
REFUSED_METHODS: dict[str, str] = {
    "fastv": _IN_LLM,
    "pdrop": _IN_LLM,
    "sparsevlm": _IN_LLM,
    "vtw": _IN_LLM,
    "dart": _IN_LLM,
    "flowcut": ("prunes inside the vision encoder and (its LLM phase) inside the LLM; the vision-encoder "
                "schedule needs the transformers runtime and the LLM phase does not fit vLLM's pre-sized KV "
                "cache"),
    "tome": "merges tokens inside the vision encoder layers, which the vLLM plugin does not hook",
    "cdpruner": ("conditions its selection on the prompt's text embeddings, which vLLM's encoder stage "
                 "(images only) does not see"),
    "trimtokenator": ("conditions its selection on the prompt's text embeddings, which vLLM's encoder stage "
                      "(images only) does not see"),
}

#: vLLM architecture name -> vflowopt family, for the models the plugin prunes.
FAMILIES: dict[str, str] = {
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "LlavaOnevisionForConditionalGeneration": "llava_onevision",
    "LlavaForConditionalGeneration": "llava",
}

#: The `positions` mode vLLM realises per family. Qwen-VL (M-RoPE): each kept token carries its original
#: position ("keep"). LLaVA-1.5 and LLaVA-OneVision (1-D RoPE): vLLM numbers the pruned prompt's tokens 1..L
#: and has no per-token position ids for these models, which is "compact".
SERVED_POSITIONS: dict[str, str] = {
    "qwen2_5_vl": "keep",
    "qwen3_vl": "keep",
    "qwen2_vl": "keep",
    "llava_onevision": "compact",
    "llava": "compact",
}


def serving_config(config: PruneConfig) -> PruneConfig:
    """`config` reduced to what vLLM can run: its pre-LLM stage. A method outside `SERVED_METHODS` is
    refused (ConfigError saying why); VFlowOpt keeps R1 = budget before the LLM and nothing inside it
    (retention (budget, 1, 1): its in-LLM stages keep every token)."""
    name = config.method
    if name not in SERVED_METHODS:
        why = REFUSED_METHODS.get(name, "has no pre-LLM selection the vLLM plugin can run")
        raise ConfigError(f"method '{name}' cannot be served by the vLLM plugin: it {why}; served methods: "
                          f"{', '.join(SERVED_METHODS)}")
    budget = config.budget
    if budget is None:
        raise ConfigError(f"the strategy for '{name}' has no budget; the vLLM plugin keeps round(budget·n) of each "
                          "image's n tokens, so the file needs a budget in (0, 1]")
    if name == "vflowopt":
        return replace(config, retention=(float(budget), 1.0, 1.0))
    return config


@dataclass(frozen=True)
class ServingPlan:
    """The strategy one vLLM server prunes with: a served method's config (pre-LLM stage only) and the
    file it came from. Checked at construction, so a plan that exists can be served."""

    config: PruneConfig
    source: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.config, PruneConfig):
            raise ConfigError(f"ServingPlan needs a vflowopt PruneConfig, got {type(self.config).__name__}")
        object.__setattr__(self, "config", serving_config(self.config))

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def budget(self) -> float:
        return float(self.config.budget)

    @property
    def is_identity(self) -> bool:
        """Budget 1.0 keeps every token: the plugin then leaves vLLM's own code path untouched."""
        return self.budget >= 1.0

    def kept_tokens(self, n: int) -> int:
        """Placeholders an image of n visual tokens gets: round(budget·n), at least 1 (0 for n = 0)."""
        return keep_count(int(n), self.budget)

    def check_family(self, family: str) -> None:
        """A strategy resolved for one family (its saved `model_family`) is refused on another, and so is a
        `positions` mode vLLM cannot realise for the family (`SERVED_POSITIONS`) below budget 1.0."""
        saved = self.config.model_family
        where = self.source or "(in memory)"
        if saved is not None and saved != family:
            raise ConfigError(f"strategy {where} was saved for a {saved} model, but vLLM serves a {family} model; "
                              f"save a strategy for {family} (vflowopt optimize) or drop its model_family field")
        served = SERVED_POSITIONS.get(family, "keep")
        asked = getattr(self.config, "positions", "keep")
        if asked != served and not self.is_identity:  # budget 1.0 keeps every token: both modes are the same
            how = ("gives kept tokens their original M-RoPE positions" if served == "keep" else
                   "numbers the pruned prompt's positions consecutively (vLLM has no per-token position ids for "
                   "this model's 1-D RoPE)")
            raise ConfigError(f"strategy {where} asks for positions={asked!r}, but on {family} the vLLM plugin {how}, "
                              f"which is positions={served!r}; save the strategy with positions={served!r}")


def qwen_tokens_per_image(grid_thw: tuple[int, int, int], merge_size: int) -> int:
    """Visual tokens a Qwen-VL image of patch grid (t, h, w) enters the LLM with: t·h·w / merge²."""
    t, h, w = (int(x) for x in grid_thw)
    if merge_size < 1 or h % merge_size or w % merge_size:
        raise ConfigError(f"image grid {grid_thw} is not a multiple of the spatial merge size {merge_size}")
    return t * (h // merge_size) * (w // merge_size)


def load_plan(environ: Mapping[str, str] | None = None) -> ServingPlan | None:
    """The plan named by `VFLOWOPT_VLLM_CONFIG`, or None when the variable is unset or empty (the plugin
    then does nothing). A bad file raises ConfigError naming what was wrong and what is accepted."""
    env = os.environ if environ is None else environ
    path = (env.get(ENV_VAR) or "").strip()
    if not path:
        return None
    try:
        config = load_config(path)
    except ConfigError as exc:
        raise ConfigError(f"{ENV_VAR}={path}: {exc}") from None
    try:
        return ServingPlan(config=config, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{ENV_VAR}={path}: {exc}") from None


# -- the plan of this process (vLLM calls the plugin in each of its processes) ---------------------------
_lock = threading.Lock()
_plan: ServingPlan | None = None
_loaded = False


def active_plan() -> ServingPlan | None:
    """The plan of this process: read from VFLOWOPT_VLLM_CONFIG once (None when unset)."""
    global _plan, _loaded
    with _lock:
        if not _loaded:
            _plan = load_plan()
            _loaded = True
        return _plan


def set_plan(plan: ServingPlan | None) -> None:
    """Replace this process's plan (tests, the bench: one in-process engine, several strategies)."""
    global _plan, _loaded
    with _lock:
        _plan, _loaded = plan, True


def check_tensor_parallel(plan: ServingPlan, needs_attention: bool, tp_size: int, *,
                          images_split: bool = False) -> None:
    """Methods scoring from the vision attention at tensor parallelism: the heads vLLM shards over the ranks
    are averaged across them (an all-reduce in the vision pass), so they are served; refused only where vLLM
    runs each image's vision pass on one rank (`--mm-encoder-tp-mode data` on Qwen-VL: `images_split`)."""
    if needs_attention and tp_size > 1 and images_split:
        raise ConfigError(
            f"method '{plan.method}' scores from the vision encoder's attention, but with --mm-encoder-tp-mode "
            f"data vLLM runs each image's vision pass on one of the {tp_size} ranks, so the others never see its "
            "attention: serve it with the default --mm-encoder-tp-mode weights (or use random, pool or divprune, "
            "which work in either mode)"
        )


_warned_uncovered: set[str] = set()


def warn_uncovered(class_name: str) -> None:
    """One warning per model class the plugin does not prune (it is then served unpruned)."""
    if class_name in _warned_uncovered:
        return
    _warned_uncovered.add(class_name)
    logger.warning("vflowopt: %s is set but the vLLM plugin does not prune %s (covered: %s); serving it unpruned",
                   ENV_VAR, class_name, ", ".join(FAMILIES))
