"""The optimization-history figure written by `vflowopt optimize --plot`."""

from __future__ import annotations

import os

from ..config import ConfigError

__all__ = ["plot_history", "plot_ranking"]


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("--plot needs matplotlib: pip install 'vflowopt[plot]'") from None
    return matplotlib, plt


def _save(fig, plt, path) -> None:
    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    except OSError as exc:
        raise ConfigError(f"cannot write the plot to {path}: {exc}") from None
    finally:
        plt.close(fig)


def plot_history(result, path: str | os.PathLike) -> None:
    """PNG of every complete trial's objective, the best feasible value so far, and the default
    strategy's objective; infeasible trials (their penalty value) are drawn as grey crosses."""
    matplotlib, plt = _pyplot()

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
    if result.default_value is not None:
        ax.axhline(result.default_value, color="tab:green", linestyle="--", label="default strategy")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"objective: Σ cos over {result.n_samples} samples")
    ax.set_title(f"{result.study_name}: best {result.value:.4f} (trial {result.best_trial})")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.legend(loc="best", fontsize=8)
    _save(fig, plt, path)


def plot_ranking(result, path: str | os.PathLike) -> None:
    """PNG of the methods ranked by the objective (mean cosine over the samples): one bar per method
    that can meet the budget, best on top, tuned methods in blue and untuned ones in grey; refused
    methods are listed under the axis."""
    _, plt = _pyplot()
    ok = [r for r in result.ranking if r.status == "ok"]
    refused = [r.method for r in result.ranking if r.status != "ok"]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(ok) + 1.6), dpi=100)
    names = [r.method for r in ok][::-1]
    values = [r.mean_cosine for r in ok][::-1]
    colors = ["0.6" if r.source == "untuned" else "tab:blue" for r in ok][::-1]
    bars = ax.barh(names, values, color=colors)
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.4f}", va="center", fontsize=8)
    low = min(values)
    ax.set_xlim(max(-1.0, low - 0.1 * (1.0 - low) - 0.01), 1.0 + 0.15 * (1.0 - low) + 0.01)
    xlabel = f"mean cos of the last token's state over {result.n_samples} samples (blue: tuned, grey: nothing to tune)"
    if refused:
        xlabel += "\nrefused at this budget: " + ", ".join(refused)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_title(f"methods at budget {result.budget:g}: best {result.method}")
    _save(fig, plt, path)
