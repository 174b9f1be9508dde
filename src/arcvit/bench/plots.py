"""The one plot arcvit draws: accuracy against trainable parameters (log scale), one line per method.

A method run at several ranks (variants ``arc@4``, ``arc@16``, ...) is one line through its points in order of
size: the accuracy-for-parameters frontier a PETL comparison is read from. A method at one size is a point.
matplotlib (the ``plots`` extra) is imported on first use; without it the plot is skipped with one warning.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from arcvit.bench.variants import line_of
from arcvit.extras import optional
from arcvit.fileio import atomic_path


def plot_accuracy_vs_params(points: Sequence[tuple[str, float, float, float]], path: str | Path, title: str,
                            ylabel: str = "mean top-1 accuracy (%)") -> Path | None:
    """``points``: (label, trainable parameters, accuracy %, std %) — std 0 draws no error bar. Labels
    ``M@R`` join method M's line; each point is annotated with its own label. None: matplotlib is missing."""
    path = Path(path)
    matplotlib = optional("matplotlib", "plots", path.name)
    if matplotlib is None:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    lines: dict[str, list[tuple[str, float, float, float]]] = {}
    for point in points:
        lines.setdefault(line_of(point[0]), []).append(point)
    for i, (method, members) in enumerate(lines.items()):
        members.sort(key=lambda p: p[1])
        _, xs, ys, stds = zip(*members)
        arc = method.startswith("arc")
        marker = "os^D"[i // 10 % 4]  # 10 colours, then the same colours with another marker: no two alike
        ax.errorbar(xs, ys, yerr=list(stds) if any(stds) else None, fmt=marker + ("-" if len(members) > 1 else ""),
                    color=f"C{i % 10}", markersize=8 if arc else 6, linewidth=2 if arc else 1.2, capsize=3,
                    label=method, zorder=3 if arc else 2)
        for label, x, y, _ in members:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 5), fontsize=8)
    ax.set_xscale("log")
    ax.margins(x=0.12, y=0.1)  # room for the labels of the outermost points
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: a dozen rows hide no point
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
