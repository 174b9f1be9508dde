"""``--ray``: every run of a grid is a Ray task, on a local cluster or one that already runs (SLURM, Kubernetes).

Ray is imported only here, and only when ``--ray`` is given. The driver (the process that runs ``arcvit bench``)
owns the output folder: unless the folder is shared with the workers (``shared=True``), a worker trains into a
temporary folder of its own and sends the run's small files back (results, metrics, settings, adapter; not the
checkpoints), which the driver writes, results.json last. A worker or node that dies mid-run makes Ray run the
task again (``max_retries``); in a shared folder the retry resumes from the run's last checkpoint, otherwise it
starts the run over, and since a run is seeded the outcome is the same. A run that fails for a user reason
(an ArcvitError: bad data, bad settings) is not retried and is reported by name. Memory: the driver holds one
finished run's files at a time (an adapter: kilobytes to megabytes; a ``full`` run's weights: the model's size).
A study's trials run the same way, as tune workers that each ask the study for their next trial (``tune``).
"""
from __future__ import annotations

import contextlib
import math
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from arcvit.bench.executors import Fit, Outcome, RunJob, run_job
from arcvit.errors import ConfigError, first_line
from arcvit.extras import require
from arcvit.fileio import atomic_path

CONNECT_TIMEOUT_S = 5.0  # an unreachable address fails in seconds, not after Ray's own minutes of retries
LEFT_ON_WORKER = ("checkpoints",)  # large, and only useful where the run trains


def import_ray() -> Any:
    """ray, imported on first use; its absence names the extra that installs it."""
    return require("ray", "ray", "--ray")


def _check_reachable(address: str) -> None:
    """Open a TCP connection to ``host:port`` (or ``ray://host:port``) once, within CONNECT_TIMEOUT_S."""
    parts = urlsplit(address if "://" in address else f"//{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise ConfigError(f"--ray {address!r}: give 'auto', HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConfigError(f"--ray {address!r}: no Ray cluster reachable there ({e.strerror or e})") from None


def connect(address: str | None) -> None:
    """Join the cluster at ``address`` ('auto': the one running on this machine or named by RAY_ADDRESS), or
    start a local one when ``address`` is None. A local cluster started here lives until this process ends
    (Ray stops it then), so that a bench's studies and runs all use the one cluster."""
    ray = import_ray()
    if ray.is_initialized():
        return
    if address is None:
        ray.init(include_dashboard=False)
        return
    try:
        ray.init(address=address, include_dashboard=False)
    except (ConnectionError, ValueError, RuntimeError) as e:
        first = first_line(e) or type(e).__name__
        raise ConfigError(f"--ray {address!r}: cannot join that cluster ({first})") from None


def _pack(folder: Path) -> dict[str, bytes]:
    """The run folder's files, by path relative to it, less what stays on the worker."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in LEFT_ON_WORKER}


def _unpack(files: dict[str, bytes], folder: Path) -> None:
    """Write a run's files into its bench folder, each atomically, results.json last (it marks the run done)."""
    for rel in sorted(files, key=lambda r: r == "results.json"):
        with atomic_path(folder / rel) as tmp:
            tmp.write_bytes(files[rel])


def train_on_worker(fit: Fit, job: RunJob, shared: bool) -> tuple[Outcome, dict[str, bytes]]:
    """The Ray task: train in the bench folder itself when it is shared, else in a temporary folder whose
    files go back to the driver."""
    if shared:
        return run_job(fit, job), {}
    with tempfile.TemporaryDirectory(prefix="arcvit-run-") as tmp:
        here = replace(job, dir=Path(tmp) / "run")
        outcome = run_job(fit, here)
        return outcome, _pack(here.dir) if outcome.results is not None else {}


class RayExecutor:
    """Runs each job as a Ray task with ``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs (default: 1 where the
    cluster has GPUs, else 0). At most as many runs are in flight as the cluster's resources fit at once (read
    again as each run ends, so a cluster that grows gets more), so "running" and "queued" mean what they say."""

    def __init__(self, address: str | None = None, *, cpus_per_run: float = 1, gpus_per_run: float | None = None,
                 max_retries: int = 2, shared: bool = False) -> None:
        for name, value, low in (("--cpus-per-run", cpus_per_run, 1e-3), ("--gpus-per-run", gpus_per_run, 0)):
            if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= low):
                raise ConfigError(f"{name} must be a number {'>= 0' if low == 0 else '> 0'}, got {value!r}")
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise ConfigError(f"--max-retries must be a whole number >= 0, got {max_retries!r}")
        import_ray()  # a missing extra or an unreachable address fails now, before any data is built
        if address not in (None, "auto"):
            _check_reachable(address)
        self.address, self.cpus, self.gpus = address, cpus_per_run, gpus_per_run
        self.max_retries, self.shared = max_retries, shared

    def _resources(self, ray: Any) -> dict[str, float]:
        gpus = self.gpus if self.gpus is not None else (1 if ray.cluster_resources().get("GPU", 0) else 0)
        return {"CPU": self.cpus, "GPU": gpus}

    @staticmethod
    def _capacity(ray: Any, need: dict[str, float]) -> int:
        have = ray.cluster_resources()
        fits = [math.floor(have.get(k, 0) / v + 1e-9) for k, v in need.items() if v > 0]
        return min(fits)  # CPU is always needed

    @contextlib.contextmanager
    def _cluster(self, in_flight: dict[Any, Any]) -> Iterator[tuple[Any, Any]]:
        """Connected to the cluster: yields ray and the remote task maker with one run's resources. On leaving,
        however (Ctrl-C, a bug), the tasks still in ``in_flight`` are stopped."""
        ray = import_ray()
        connect(self.address)
        try:
            need = self._resources(ray)
            if self._capacity(ray, need) < 1:
                raise ConfigError(f"the Ray cluster ({ray.cluster_resources()}) has no room for one run "
                                  f"({need['CPU']} CPU, {need['GPU']} GPU); lower --cpus-per-run/--gpus-per-run")
            yield ray, partial(self._task, ray, need)
        finally:
            for ref in in_flight:  # what finished is on disk already
                ray.cancel(ref, force=True)

    def _task(self, ray: Any, need: dict[str, float], function: Callable[..., Any]) -> Any:
        return ray.remote(function).options(num_cpus=need["CPU"], num_gpus=need["GPU"],
                                            max_retries=self.max_retries, retry_exceptions=False)

    def run(self, jobs: Sequence[RunJob], fit: Fit, started: Callable[[RunJob], None],
            finished: Callable[[RunJob, Outcome], None]) -> None:
        if any(job.cfg.devices * job.cfg.num_nodes > 1 for job in jobs):
            raise ConfigError("--ray trains each run in one process (devices 1, num_nodes 1): drop --devices, "
                              "Ray places the runs on the cluster's devices")
        in_flight: dict[Any, RunJob] = {}
        with self._cluster(in_flight) as (ray, remote):
            task = remote(train_on_worker)
            fit, queue = partial(fit, progress=False), list(jobs)  # no progress bars from the workers
            while queue or in_flight:
                while queue and len(in_flight) < max(1, self._capacity(ray, self._resources(ray))):
                    job = queue.pop(0)
                    in_flight[task.remote(fit, job, self.shared)] = job
                    started(job)
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                job = in_flight.pop(ref)
                finished(job, self._collect(ray, ref, job))

    def tune(self, job: Any, *, resume: bool = False, **options: Any) -> dict[str, Any]:
        """A study's trials on the cluster: as many tune workers as one run's resources fit (at most one per
        trial), each a Ray task asking the study for its next trial until the study holds ``job.trials``
        finished ones; a worker that dies is started again and its trial, once its heartbeat is stale, is
        run again. The driver then writes the study's outputs (and with ``final``, runs it) in
        ``job.study_dir``. The study must be where every worker reaches it: ``--storage`` (PostgreSQL) on a
        cluster; the default SQLite file only on one machine."""
        from arcvit.training.tune import STUDY_FILE, open_study, optuna_errors, tune
        if job.storage is None and self.address is not None and not self.shared:
            raise ConfigError(f"--ray {self.address!r}: the study's default SQLite file is on this machine only; "
                              "give --storage with a database every worker reaches (e.g. postgresql://HOST/DB)")
        with optuna_errors(job):  # created or checked here, once, before any worker asks it for a trial
            open_study(job, resume)
        shared = replace(job, storage=job.storage or f"sqlite:///{(job.study_dir / STUDY_FILE).resolve()}")
        in_flight: dict[Any, int] = {}
        with self._cluster(in_flight) as (ray, remote):
            task = remote(tune_on_worker)
            workers = min(job.trials, self._capacity(ray, self._resources(ray)))
            steps = options.get("max_steps_per_epoch")
            in_flight.update({task.remote(shared, i, self.shared, steps): i for i in range(workers)})
            while in_flight:
                (ref,), _ = ray.wait(list(in_flight), num_returns=1)
                in_flight.pop(ref)
                ray.get(ref)  # a worker's error (a bug, a storage gone) ends the search here
        return tune(shared, resume=True, **{**options, "progress": False})

    def _collect(self, ray: Any, ref: Any, job: RunJob) -> Outcome:
        """A finished task's outcome, its files written into the bench; a worker that died every try fails the
        run (the next bench tries it again); an exception that is not the run's own fault propagates."""
        try:
            outcome, files = ray.get(ref)
        except ray.exceptions.RayTaskError:
            raise
        except ray.exceptions.RayError as e:
            first = first_line(e)
            return Outcome(error=f"{type(e).__name__}: the run's worker was lost {self.max_retries + 1} time(s)"
                                 f" ({first})")
        _unpack(files, job.dir)
        return outcome


def tune_on_worker(job: Any, index: int, shared: bool, max_steps_per_epoch: int | None) -> None:
    """One tune worker (a Ray task): trials until the study holds its trials, in a folder of its own (the
    study folder's ``workers/<i>`` when it is shared, else a temporary one; the study's records are in its
    storage)."""
    from arcvit.training.tune import tune
    if shared:
        tune(replace(job, study_dir=job.study_dir / "workers" / str(index)), resume=True, progress=False,
             max_steps_per_epoch=max_steps_per_epoch)
        return
    with tempfile.TemporaryDirectory(prefix="arcvit-tune-") as tmp:
        tune(replace(job, study_dir=Path(tmp)), resume=True, progress=False, max_steps_per_epoch=max_steps_per_epoch)
