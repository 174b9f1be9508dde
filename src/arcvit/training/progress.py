"""Terminal progress for training: one rich bar per epoch with loss, accuracy and images/s."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class _StepBar:
    def __init__(self, progress: Progress | None, task: int | None) -> None:
        self.progress, self.task = progress, task

    def update(self, loss: float, acc: float, ips: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, stats=f"loss {loss:.4f}  acc {acc:6.2%}  {ips:7.1f} img/s")


class EpochProgress:
    """Shows a bar while an epoch runs and prints one summary line when it ends (rank 0 only)."""

    def __init__(self, enabled: bool, total_epochs: int) -> None:
        self.enabled, self.total = enabled, total_epochs
        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def epoch(self, number: int, steps: int) -> Iterator[_StepBar]:
        if not self.enabled:
            yield _StepBar(None, None)
            return
        columns = (TextColumn(f"epoch {number}/{self.total}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[stats]}"))
        with Progress(*columns, console=self.console, transient=True) as progress:
            yield _StepBar(progress, progress.add_task("train", total=steps, stats=""))

    def log(self, row: dict[str, Any]) -> None:
        if self.enabled:
            text = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            self.console.print(text)
