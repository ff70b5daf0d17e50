"""Matplotlib figures (imported only on demand: nothing in the package imports this module)."""

from __future__ import annotations

import math

__all__ = ["plot_losses"]


def plot_losses(losses, ax=None, smooth: int | None = None, ylabel="loss (negative ELBO)"):
    """The loss per step with its running mean; returns the ``Axes``.

    Example:
        >>> import matplotlib
        >>> matplotlib.use("Agg")
        >>> ax = plot_losses([3.0, 2.0, 1.5, 1.2, 1.1])
        >>> ax.get_ylabel()
        'loss (negative ELBO)'
    """
    import matplotlib.pyplot as plt
    import numpy as np

    losses = np.asarray(losses, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="0.75", linewidth=0.6, label="per step")
    smooth = smooth or max(1, min(len(losses) // 50, 500))
    if smooth > 1 and len(losses) >= smooth:
        kernel = np.ones(smooth) / smooth
        running = np.convolve(losses, kernel, mode="valid")
        ax.plot(steps[smooth - 1 :], running, color="C0", label=f"mean of {smooth}")
    finite = losses[np.isfinite(losses)]
    if finite.size:  # a few early, huge losses should not flatten the curve
        low, high = np.percentile(finite, [0, 95])
        pad = 0.05 * (high - low) if high > low else 1.0
        if math.isfinite(low) and math.isfinite(high):
            ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False)
    return ax
