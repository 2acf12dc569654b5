"""Model adapters, one file per family. Each family file registers its adapter at import
(`register_adapter`); this package imports them all, so `adapter_for` sees every family. `base` is the
contract and knows no family."""

from . import (  # noqa: F401  (registration)
    llava,
    llava_next,
    llava_next_video,
    llava_onevision,
    qwen2_5_vl,
    qwen2_vl,
    qwen3_vl,
    video_llava,
)
