"""KV-cache bytes held after prefill, and peak memory of a block of work.

* :func:`kv_cache_bytes` sums the ``nbytes`` of every key and value tensor a returned cache holds, per
  decoder layer (so it is dtype-aware and sees exactly what pruning left in each layer).
* :class:`PeakMemory` measures the peak of a block. On CUDA: ``torch.cuda.max_memory_allocated`` after
  ``torch.cuda.reset_peak_memory_stats`` (tensor memory of the device, not the allocator's reserve). On
  CPU: the process's peak resident set size. ``getrusage`` only ever reports the maximum since the
  process started, so on Linux the kernel's own high-water mark (``VmHWM``) is reset before the block by
  writing ``5`` to ``/proc/self/clear_refs`` and read from ``/proc/self/status`` after it; where that is
  not possible a thread samples ``VmRSS`` every millisecond; without ``/proc`` the process-wide
  ``ru_maxrss`` is reported, which is monotonic (it never falls between runs). The method used is in
  :attr:`PeakMemory.method`. The CPU figure is the whole process (weights included), not a delta.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["PeakMemory", "available_bytes", "cpu_peak_method", "kv_cache_bytes"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _tensor_bytes(t: Any) -> int:
    return int(t.numel() * t.element_size()) if torch.is_tensor(t) else 0


def kv_cache_bytes(cache: Any) -> list[int]:
    """Bytes of key + value tensors held by ``cache``, one entry per decoder layer.

    Accepts a transformers 5.x ``Cache`` (``cache.layers[i].keys/.values``), an older cache with
    ``key_cache``/``value_cache`` lists, or the legacy tuple of ``(key, value)`` pairs.
    """
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [_tensor_bytes(getattr(layer, "keys", None)) + _tensor_bytes(getattr(layer, "values", None))
                for layer in layers]
    keys = getattr(cache, "key_cache", None)
    if keys is not None:
        return [_tensor_bytes(k) + _tensor_bytes(v) for k, v in zip(keys, cache.value_cache)]
    return [sum(_tensor_bytes(t) for t in layer[:2]) for layer in cache]


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory a new allocation can take: the kernel's MemAvailable on CPU (Linux), free memory on CUDA;
    None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kb("VmHWM") is not None


def cpu_peak_method() -> str:
    """Which CPU peak-RSS method :class:`PeakMemory` uses on this machine."""
    if _reset_hwm():
        return "VmHWM reset per run (/proc/self/clear_refs)"
    if _status_kb("VmRSS") is not None:
        return "VmRSS sampled every 1 ms"
    return "process max RSS since start (getrusage; monotonic across runs)"


class PeakMemory:
    """``with PeakMemory(device) as pm: ...``; then ``pm.peak_bytes`` and ``pm.method``."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "torch.cuda.max_memory_allocated"
        elif _reset_hwm():
            self.method = "VmHWM reset per run (/proc/self/clear_refs)"
        elif _status_kb("VmRSS") is not None:
            self.method = "VmRSS sampled every 1 ms"
            self._sampled = 1024 * (_status_kb("VmRSS") or 0)
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        else:
            self.method = "process max RSS since start (getrusage; monotonic across runs)"
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            kb = _status_kb("VmRSS")
            if kb is not None:
                self._sampled = max(self._sampled, 1024 * kb)
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = self._sampled
        elif self.method.startswith("VmHWM"):
            self.peak_bytes = 1024 * (_status_kb("VmHWM") or 0)
        else:
            import resource
            import sys

            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.peak_bytes = int(rss if sys.platform == "darwin" else rss * 1024)
