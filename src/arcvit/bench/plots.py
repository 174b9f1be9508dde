"""The one plot arcvit draws: accuracy against trainable parameters (log scale), one point per method."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from arcvit.fileio import atomic_path  # noqa: E402


def plot_accuracy_vs_params(points: Sequence[tuple[str, float, float, float]], path: str | Path, title: str,
                            ylabel: str = "mean top-1 accuracy (%)") -> Path:
    """``points``: (method, trainable parameters, accuracy %, std %) — std 0 draws no error bar."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for method, params, acc, std in points:
        ax.errorbar(params, acc, yerr=std or None, fmt="o", markersize=8 if method.startswith("arc") else 6,
                    capsize=3, label=method, zorder=3 if method.startswith("arc") else 2)
        ax.annotate(method, (params, acc), textcoords="offset points", xytext=(6, 5), fontsize=9)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
