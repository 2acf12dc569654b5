"""Benchmarks: efficiency and fidelity of pruning methods (``vflowopt bench``).

* :func:`run_bench` measures every (method, budget) on a model and one input and returns
  :class:`BenchRecord` objects (the first is the unpruned reference).
* :mod:`vflowopt.bench.flops` is the analytic prefill-FLOPs model. FLOPs are counted as 2 x multiply-adds
  of the matrix products, the convention of ``torch.utils.flop_counter.FlopCounterMode`` and of the
  token-pruning literature.
* :mod:`vflowopt.bench.report` writes the table, JSON, CSV and plot; :mod:`vflowopt.bench.realmodels`
  builds the shipped real architectures with random weights and offline processors.
"""

from .run import REFERENCE, BenchRecord, prefill_flops, run_bench

__all__ = ["REFERENCE", "BenchRecord", "prefill_flops", "run_bench"]
