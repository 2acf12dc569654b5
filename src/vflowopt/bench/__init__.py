"""Benchmark helpers: an analytic prefill-FLOPs model (:mod:`vflowopt.bench.flops`).

FLOPs are counted as 2 x multiply-adds of the matrix products, the convention of
``torch.utils.flop_counter.FlopCounterMode`` and of the token-pruning literature.
"""
