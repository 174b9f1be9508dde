"""Where a bench's runs train: one after another in this process (``InProcess``), or as Ray tasks on a cluster
(``arcvit.bench.ray_executor.RayExecutor``), behind one small interface.

The runner plans the runs and owns the output folder; an executor only trains each ``RunJob`` with the ``fit``
it is given and says how each one ended; ``tune`` runs a study's search the same way (its trials here, or
on the cluster's workers). The training loop does not know which executor called it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from arcvit.errors import ArcvitError
from arcvit.training.config import DataSpec, TrainConfig

# train() with the bench's options bound: fit(data, cfg, run_folder) -> results
Fit = Callable[[DataSpec, TrainConfig, Path], dict[str, Any]]


@dataclass(frozen=True)
class RunJob:
    """One run to train: its data, its settings, its folder in the bench, and a label for messages."""

    label: str
    data: DataSpec
    cfg: TrainConfig
    dir: Path


@dataclass(frozen=True)
class Outcome:
    """How a run ended: its results, or the one line saying why it failed (a user error: not retried)."""

    results: dict[str, Any] | None = None
    error: str | None = None


class Executor(Protocol):
    """Trains every job. In this process, it calls ``started(job)`` when a job starts running (as far as it can
    tell) and ``finished(job, outcome)`` once the job's files are in ``job.dir``, in whatever order jobs end.
    On Ctrl-C it stops its runs and lets KeyboardInterrupt through: finished runs are kept."""

    def run(self, jobs: Sequence[RunJob], fit: Fit, started: Callable[[RunJob], None],
            finished: Callable[[RunJob, Outcome], None]) -> None: ...

    def tune(self, job: Any, **options: Any) -> dict[str, Any]:
        """Run a study's search (a TuneJob; ``options`` as ``arcvit.training.tune.tune`` takes them) until it
        holds its trials, write its outputs in ``job.study_dir`` and return the summary."""


def run_job(fit: Fit, job: RunJob) -> Outcome:
    """Train one job; an ArcvitError (bad data, bad settings) is the run's failure, anything else a bug."""
    try:
        return Outcome(results=fit(job.data, job.cfg, job.dir))
    except ArcvitError as e:
        return Outcome(error=f"{type(e).__name__}: {e}")


class InProcess:
    """The default executor: one run after another in this process, straight into the run folders."""

    def run(self, jobs: Sequence[RunJob], fit: Fit, started: Callable[[RunJob], None],
            finished: Callable[[RunJob, Outcome], None]) -> None:
        for job in jobs:
            started(job)
            finished(job, run_job(fit, job))

    def tune(self, job: Any, **options: Any) -> dict[str, Any]:
        """A study's search (``arcvit.training.tune.tune``), its trials one after another in this process."""
        from arcvit.training.tune import tune
        return tune(job, **options)
