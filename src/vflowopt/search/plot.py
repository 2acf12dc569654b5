"""The optimization-history figure written by `vflowopt optimize --plot`."""

from __future__ import annotations

import os

from ..config import ConfigError

__all__ = ["plot_history"]


def plot_history(result, path: str | os.PathLike) -> None:
    """PNG of every complete trial's objective, the best feasible value so far, and the default
    strategy's objective; infeasible trials (their penalty value) are drawn as grey crosses."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'vflowopt[plot]'") from None

    feasible = [(n, v) for n, v, ok in result.history if ok]
    infeasible = [(n, v) for n, v, ok in result.history if not ok]
    best, running = [], None
    for n, v in sorted(feasible):
        running = v if running is None else max(running, v)
        best.append((n, running))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if feasible:
        ax.scatter(*zip(*feasible), s=18, color="tab:blue", label="trial (feasible)")
        ax.step(*zip(*best), where="post", color="tab:red", label="best so far")
    if infeasible:
        ax.scatter(*zip(*infeasible), s=22, marker="x", color="0.6", label="infeasible (penalty)")
    ax.axhline(result.default_value, color="tab:green", linestyle="--", label="default strategy")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"objective: Σ cos over {result.n_samples} samples")
    ax.set_title(f"{result.study_name}: best {result.value:.4f} (trial {result.best_trial})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ConfigError(f"cannot write the plot to {path}: {exc}") from None
    finally:
        plt.close(fig)
