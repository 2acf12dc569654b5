"""Where transformers releases differ in what the hooks see; every difference lives here, keyed on the
feature (what the installed release does), never on a version number.

Supported and tested: transformers 5.19 through 5.24 (pyproject; CI runs both ends).

- The KV cache argument and output field. Up to 5.23 every forward takes `past_key_values=` and outputs
  carry `.past_key_values`; 5.24 renamed both to `cache` (the old keyword is still accepted through a
  deprecation shim until 5.40, and `output.past_key_values` is a property that logs a deprecation warning).
  Forward hooks see the keywords exactly as the caller passed them, so `generate()` on 5.24 hands the text
  model `cache=` and a hook that reads only `past_key_values` mistakes every decode step for a fresh
  prompt (decode positions and masks left unsliced, stats overwritten by a decode step).
"""

from __future__ import annotations

from typing import Any

CACHE_KWARGS = ("cache", "past_key_values")  # 5.24+ name first, then the name used up to 5.23


def cache_from_kwargs(kwargs: dict) -> Any:
    """The KV cache passed to a forward, under whichever name the caller used (None if absent)."""
    for name in CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None:
            return value
    return None


def cache_from_output(output: Any) -> Any:
    """The KV cache returned by a forward or by `generate(return_dict_in_generate=True)`.

    Reads the declared field, so 5.24's deprecation property (and its warning) is never touched."""
    fields = getattr(output, "__dataclass_fields__", None)
    for name in CACHE_KWARGS:
        if fields is not None and name not in fields:
            continue
        value = getattr(output, name, None)
        if value is not None:
            return value
    return None
