"""Bench output: the terminal table (rich), JSON (with a schema version and a meta block), CSV, PNG plot.

JSON layout (``schema_version`` 1)::

    {"schema_version": 1, "kind": "vflowopt-bench",
     "meta": {"model", "model_class", "random_weights", "fidelity_meaningful", "fidelity_note",
              "device", "dtype", "machine": {...}, "versions": {...}, "flops_convention",
              "kl_definition", "peak_memory_method", "new_tokens", "repeats", "warmup", "inputs": {...}},
     "records": [{"method", "budget", "prefill_flops", "kv_cache_bytes", "prefill_ms", "e2e_ms",
                  "peak_memory_bytes", "pruning_overhead_ms", "mean_retention", "tokens_into_llm",
                  "cosine", "kl", "token_agreement", "fidelity_meaningful", "error", ...}, ...]}

The first record is the unpruned reference (method ``"unpruned"``). Files are written atomically
(a temporary file renamed over the target), so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..files import atomic_write_text
from ..version import __version__
from .run import REFERENCE, BenchRecord

__all__ = [
    "CSV_FIELDS",
    "FLOPS_CONVENTION",
    "KL_DEFINITION",
    "RANDOM_WEIGHTS_NOTE",
    "SCHEMA_VERSION",
    "bench_meta",
    "plot_bench",
    "print_table",
    "to_json",
    "write_csv",
    "write_json",
]

SCHEMA_VERSION = 1
FLOPS_CONVENTION = (
    "FLOPs = 2 x multiply-adds of the matmuls (linear layers, attention QK^T and AV over the full n x n square, "
    "patch embedding); vision encoder + projector/merger + LLM at the per-layer kept token counts + LM head on "
    "the last token; norms, activations, softmax, rotary and biases ignored; per sample"
)
KL_DEFINITION = "KL(P_unpruned || P_pruned) of the next-token distribution at the last prompt position, nats"
RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS: fidelity (cosine, KL, token agreement) is meaningless"

#: The per-record columns of the CSV (lists are left out; they are in the JSON).
CSV_FIELDS = (
    "method", "budget", "prefill_flops", "flops_ratio", "vision_flops", "llm_flops", "scoring_flops",
    "kv_cache_bytes", "prefill_ms", "prefill_ms_min", "prefill_ms_max", "prefill_speedup", "e2e_ms", "e2e_ms_min",
    "e2e_ms_max", "e2e_speedup", "new_tokens", "peak_memory_bytes", "pruning_overhead_ms", "mean_retention",
    "visual_tokens", "prompt_tokens", "tokens_into_llm", "cosine", "kl", "token_agreement", "fidelity_meaningful",
    "error",
)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_meta(model, *, model_name: str, device: str, random_weights: bool, new_tokens: int, repeats: int,
               warmup: int, inputs_info: dict | None = None) -> dict[str, Any]:
    """The meta block: model, machine, versions, dtype, device, conventions."""
    import torch
    import transformers

    from .memory import cpu_peak_method

    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    machine: dict[str, Any] = {"cpu": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                               "platform": platform.platform()}
    if device == "cuda" and torch.cuda.is_available():
        machine["gpu"] = torch.cuda.get_device_name()
    with contextlib.suppress(OSError):
        machine["loadavg_1min"] = os.getloadavg()[0]
    return {
        "model": model_name,
        "model_class": type(model).__name__,
        "random_weights": bool(random_weights),
        "fidelity_meaningful": not random_weights,
        "fidelity_note": RANDOM_WEIGHTS_NOTE if random_weights else "",
        "device": device,
        "dtype": dtype,
        "machine": machine,
        "versions": {"vflowopt": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "flops_convention": FLOPS_CONVENTION,
        "kl_definition": KL_DEFINITION,
        "peak_memory_method": "torch.cuda.max_memory_allocated (reset per cell)" if device == "cuda"
        else f"process peak RSS: {cpu_peak_method()}",
        "new_tokens": int(new_tokens),
        "repeats": int(repeats),
        "warmup": int(warmup),
        "inputs": dict(inputs_info or {}),
    }


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if value != value else round(value, 6)  # NaN -> null
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def to_json(records: Sequence[BenchRecord], meta: dict) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "vflowopt-bench",
        "meta": meta,
        "records": [{k: _clean(v) for k, v in r.to_dict().items()} for r in records],
    }


def _atomic_write(path: str | os.PathLike, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text, newline="")


def write_json(path: str | os.PathLike, records: Sequence[BenchRecord], meta: dict) -> None:
    _atomic_write(path, json.dumps(to_json(records, meta), indent=2) + "\n")


def write_csv(path: str | os.PathLike, records: Sequence[BenchRecord], meta: dict | None = None) -> None:
    """One row per record, :data:`CSV_FIELDS` columns (``fidelity_meaningful`` says whether to trust them)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS), lineterminator="\n")
    writer.writeheader()
    for r in records:
        d = r.to_dict()
        writer.writerow({k: _clean(d.get(k)) for k in CSV_FIELDS})
    _atomic_write(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------
# Terminal table
# ---------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def print_table(console, records: Sequence[BenchRecord], meta: dict) -> None:
    from rich.markup import escape
    from rich.table import Table

    random_weights = meta.get("random_weights", False)
    title = f"vflowopt bench: {meta.get('model')} ({meta.get('model_class')}), {meta.get('device')} {meta.get('dtype')}"
    caption = (f"Prefill FLOPs = 2 x multiply-adds (matmuls, vision + LLM at the kept tokens). Times: median of "
               f"{meta.get('repeats')} runs (min-max); e2e = prefill + {meta.get('new_tokens')} greedy tokens. "
               f"KL = {KL_DEFINITION}. Peak memory: {meta.get('peak_memory_method')}.")
    if random_weights:
        caption = f"[bold yellow]{RANDOM_WEIGHTS_NOTE}.[/bold yellow] " + escape(caption)
    else:
        caption = escape(caption)
    table = Table(title=escape(title), caption=caption, caption_justify="left", title_justify="left")
    for name in ("method", "budget", "retain", "into LLM", "GFLOPs (ratio)", "KV cache", "prefill ms (min-max)",
                 "speedup", "e2e ms", "peak mem", "prune ms", "cos", "KL", "agree"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for r in records:
        label = escape(r.method)
        if r.error:
            table.add_row(label, f"{r.budget:g}", f"[red]{escape(r.error)}[/red]")
            continue
        prefill = (f"{r.prefill_ms:.0f} ({r.prefill_ms_min:.0f}-{r.prefill_ms_max:.0f})"
                   if r.prefill_ms is not None else "-")
        flops = "-" if r.prefill_flops is None else f"{r.prefill_flops / 1e9:.2f} ({_fmt(r.flops_ratio, '.3f')})"
        table.add_row(
            label, f"{r.budget:g}", _fmt(r.mean_retention, ".3f"), _fmt(r.tokens_into_llm, "d"), flops,
            _bytes(r.kv_cache_bytes), prefill, _fmt(r.prefill_speedup, ".2f"), _fmt(r.e2e_ms, ".0f"),
            _bytes(r.peak_memory_bytes), _fmt(r.pruning_overhead_ms, ".1f"), _fmt(r.cosine, ".4f"),
            _fmt(r.kl, ".4f"), _fmt(r.token_agreement, ".2f"),
            style="dim" if r.method == REFERENCE else None,
        )
    console.print(table)


# ---------------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------------


def plot_bench(path: str | os.PathLike, records: Sequence[BenchRecord], meta: dict) -> None:
    """PNG: prefill speedup (measured, and the analytic 1/FLOPs ratio dashed) and fidelity (cosine, token
    agreement) against budget, one line per method. Uses matplotlib's Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: dict[str, list[BenchRecord]] = {}
    for r in records:
        if r.method != REFERENCE and r.error is None:
            methods.setdefault(r.method, []).append(r)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax_speed, ax_cos, ax_agree = axes
    for i, (name, rs) in enumerate(sorted(methods.items())):
        rs = sorted(rs, key=lambda r: r.budget)
        b = [r.budget for r in rs]
        color = f"C{i % 10}"
        ax_speed.plot(b, [r.prefill_speedup for r in rs], "o-", color=color, label=name)
        ax_speed.plot(b, [1.0 / r.flops_ratio if r.flops_ratio else None for r in rs], "--", color=color,
                      alpha=0.6)
        ax_cos.plot(b, [r.cosine for r in rs], "o-", color=color, label=name)
        ax_agree.plot(b, [r.token_agreement for r in rs], "o-", color=color, label=name)
    for ax, ylabel in ((ax_speed, "prefill speedup vs unpruned (x); dashed: 1 / FLOPs ratio"),
                       (ax_cos, "cosine of last hidden state"),
                       (ax_agree, f"greedy token agreement ({meta.get('new_tokens')} tokens)")):
        ax.set_xlabel("budget (mean fraction of visual tokens kept)")
        ax.set_ylabel(ylabel)
        ax.invert_xaxis()
        ax.grid(True, alpha=0.3)
        if methods:
            ax.legend(fontsize=7)
    title = f"vflowopt bench: {meta.get('model')} on {meta.get('device')} ({meta.get('dtype')})"
    if meta.get("random_weights"):
        title += f"\n{RANDOM_WEIGHTS_NOTE}"
    fig.suptitle(title, color="darkred" if meta.get("random_weights") else "black")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
