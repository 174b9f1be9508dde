"""``arcvit tune``: search a method's settings for one task on its validation split, never its test split.

Optuna drives the one training loop (``train``) under the ``select`` protocol: each trial trains on train800
(FGVC, ImageFolder: train) in its own folder ``STUDY_DIR/trials/NNNN``, reports validation top-1 after every
epoch (a median pruner stops poor trials early) and scores its best epoch's validation top-1. The test split is
never opened (``evaluate_test=False``). The study lives in Optuna's RDB storage, ``STUDY_DIR/study.db`` unless
``storage`` names a database, so a killed search resumes (``resume=True``) with its finished trials kept, and
several machines share one search by running tune against one storage URL. ``final=True`` then retrains the
best settings under the ``final`` protocol and evaluates test once.
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from arcvit.errors import ConfigError, TrainingDiverged
from arcvit.fileio import write_json, write_text
from arcvit.training.config import RUNTIME_FIELDS, DataSpec, TrainConfig
from arcvit.training.loop import train
from arcvit.training.search_space import SearchSpace, load_search_space
from arcvit.training.tune_outputs import recipe_toml, write_plots, write_trials_csv

STUDY_FILE = "study.db"
TUNE_SET_FIELDS = ("method", "protocol")  # tune sets these itself
PRUNER_STARTUP_TRIALS = 3  # the median pruner stops nothing before this many trials have finished


def sampler_startup_trials(trials: int) -> int:
    """Random draws before TPE models the results: a third of the budget, at least 4 and at most Optuna's
    default 10 (with its default, a 12-trial search would be 10 random draws and only 2 guided ones)."""
    return min(10, max(4, trials // 3))


def _optuna():
    """optuna, imported only when a search runs (``arcvit --help`` and ``report`` never need it)."""
    try:
        import optuna
    except ModuleNotFoundError:
        raise ConfigError("arcvit tune needs optuna: pip install 'arcvit[tune]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass(frozen=True)
class TuneJob:
    """One search: what trains (backbone, data, method), on which settings, and where the study lives.

    ``base``: recipe settings (e.g. a bench suite's layers for this task and method), beaten by the search
    space; ``fixed``: settings given as flags, never searched and beating everything.
    """

    backbone: str
    data: DataSpec
    method: str
    trials: int
    study_dir: Path
    base: Mapping[str, Any]
    fixed: Mapping[str, Any]
    space: SearchSpace
    storage: str | None = None
    study_name: str | None = None
    checkpoint: str | None = None
    pretrained: bool = True

    @property
    def task(self) -> str:
        return self.data.task or Path(self.data.root).name

    def settings(self, params: Mapping[str, Any] | None = None, protocol: str = "select") -> TrainConfig:
        """One trial's TrainConfig: base < the space's fixed values < ``params`` < flags."""
        settings = {**self.base, **self.space.fixed, **(params or {}), **self.fixed}
        settings |= {"method": self.method, "protocol": protocol}
        return TrainConfig.from_dict(settings, source=f"tune ({self.task}, {self.method})")

    def identity(self) -> dict[str, Any]:
        """What a study was started with: a resumed or shared study must go on with the same."""
        recipe = {k: v for k, v in asdict(self.settings()).items() if k not in RUNTIME_FIELDS}
        return {"task": self.task, "method": self.method, "backbone": self.backbone, "checkpoint": self.checkpoint,
                "pretrained": self.pretrained, "settings": recipe, "space": self.space.to_dict()}


def make_job(backbone: str, data: DataSpec, method: str, trials: int, study_dir: str | Path, *,
             base: Mapping[str, Any] | None = None, fixed: Mapping[str, Any] | None = None,
             space_file: str | Path | None = None, **options: Any) -> TuneJob:
    """A checked TuneJob: every input is validated here, before anything is written."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be a positive whole number, got {trials!r}")
    fixed = dict(fixed or {})
    set_here = [k for k in TUNE_SET_FIELDS if k in fixed]
    if set_here:
        raise ConfigError(f"{', '.join(set_here)}: set by tune (it always searches under the select protocol)")
    base = {k: v for k, v in (base or {}).items() if k not in TUNE_SET_FIELDS}  # a recipe's final protocol
    space = load_search_space(method, space_file).without(fixed)
    job = TuneJob(backbone, data, method, trials, Path(study_dir), base, fixed, space, **options)
    cfg = job.settings()
    if cfg.devices * cfg.num_nodes > 1:
        raise ConfigError("tune trains each trial in one process (devices 1, num_nodes 1); run several tune "
                          "processes against one --storage instead")
    for r in space.ranges.values():  # both ends of every range must make a valid run
        for end in r.ends():
            job.settings({r.name: end})
    return job


def _storage_url(job: TuneJob, resume: bool) -> str:
    """The storage to open; the default SQLite file must exist for --resume and not exist without it."""
    if job.storage:
        return job.storage
    db = job.study_dir / STUDY_FILE
    if resume and not db.is_file():
        raise ConfigError(f"{db}: no study to resume; drop --resume to start one")
    if not resume and (db.exists() or (job.study_dir / "trials").exists()):
        raise ConfigError(f"{job.study_dir}: holds a study already; pass --resume to continue it, "
                          "or choose another --out")
    if job.study_dir.exists() and not job.study_dir.is_dir():
        raise ConfigError(f"{job.study_dir}: exists and is not a folder; --out names the study folder")
    return f"sqlite:///{db.resolve()}"


def _open_storage(optuna: Any, url: str, create_dir: Path | None) -> Any:
    """Optuna's RDB storage with heartbeats, so that a trial whose process died is failed and retried."""
    from sqlalchemy.exc import SQLAlchemyError  # optuna's own dependency
    if create_dir is not None:
        create_dir.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, heartbeat_interval=60, grace_period=180,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
    except (SQLAlchemyError, ImportError, ValueError, OSError) as e:  # bad URL, no driver, cannot connect
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"storage {url!r} cannot be opened ({first})") from None


def _retry_interrupted(study: Any) -> None:
    """A local study resumed: its RUNNING trials died with the killed search. Fail them, and queue the
    settings of one that had started training again: the retry continues its run folder from its last
    checkpoint."""
    from optuna.trial import TrialState
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
        if "run_dir" in t.user_attrs:  # set once every setting was drawn
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)


def open_study(job: TuneJob, resume: bool = False) -> Any:
    """Create or load the study, checking that a loaded one was started with this job's settings."""
    optuna = _optuna()
    url = _storage_url(job, resume)
    storage = _open_storage(optuna, url, None if job.storage else job.study_dir)
    name = job.study_name or f"{job.task}.{job.method}"
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS))
    identity, stored = job.identity(), study.user_attrs.get("arcvit")
    if stored is None:
        study.set_user_attr("arcvit", identity)
    elif stored != identity:
        diffs = [f"{k} {stored.get(k)!r} -> {v!r}" for k, v in identity.items() if stored.get(k) != v]
        raise ConfigError(f"study {name!r} in {url} was started with other settings ({'; '.join(diffs)})")
    if resume and not job.storage:
        _retry_interrupted(study)
    seed = job.settings().seed + len(study.trials)  # a resumed search does not replay the sampler's draws
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=sampler_startup_trials(job.trials))
    return study


def _objective(job: TuneJob, run: Any, trial: Any) -> float:
    """One trial: train in its own folder on train800, score validation top-1, prune on its epochs."""
    optuna = _optuna()
    params = {name: r.suggest(trial) for name, r in job.space.ranges.items()}
    retry_of = trial.user_attrs.get("retry_of")  # a killed trial's settings, queued again: continue its run
    folder = job.study_dir / "trials" / f"{trial.number if retry_of is None else retry_of:04d}"
    trial.set_user_attr("run_dir", str(folder))

    def report(epoch: int, row: dict) -> None:
        trial.report(row["val_top1"], epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch}")
    try:
        results = run(job.data, job.settings(params), folder, resume=retry_of is not None, on_epoch_end=report,
                      evaluate_test=False)
    except TrainingDiverged as e:  # a setting that diverges (too large a step) is a poor one, not a broken search
        trial.set_user_attr("note", str(e))
        raise optuna.TrialPruned(str(e)) from None
    trial.set_user_attr("selected_epoch", results["selected_epoch"])
    trial.set_user_attr("trainable_params", results["trainable_params"])
    return results["val_top1"]


def best_settings(job: TuneJob, study: Any) -> tuple[Any, dict[str, Any]]:
    """The best finished trial and its recipe settings (protocol, seed and execution settings left out)."""
    from optuna.trial import TrialState
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConfigError(f"study {study.study_name!r}: no trial has finished, so there is no best setting")
    best = study.best_trial
    params = {k: v for k, v in best.params.items() if k in job.space.ranges}
    settings = asdict(job.settings(params))
    return best, {k: v for k, v in settings.items()
                  if k not in (*RUNTIME_FIELDS, *TUNE_SET_FIELDS, "seed")}


def write_outputs(job: TuneJob, study: Any, plots: bool = False) -> dict[str, str]:
    """trials.csv, best.toml (once a trial has finished) and, with ``plots``, the two figures."""
    out = job.study_dir
    written = {"trials_csv": str(write_trials_csv(study.trials, out / "trials.csv"))}
    try:
        best, settings = best_settings(job, study)
    except ConfigError:
        return written
    header = (f"arcvit tune: the best of {len(study.trials)} trial(s) of study {study.study_name!r} "
              f"(trial {best.number}, val top-1 {best.value:.4f}),\nsearched on validation only. "
              f"Use: arcvit train --config best.toml --task {job.task} --method {job.method} ...")
    searched = {k: settings[k] for k in job.space.ranges}
    write_text(out / "best.toml", recipe_toml(job.task, job.method, settings, searched, header))
    written["best_toml"] = str(out / "best.toml")
    if plots:
        for path in write_plots(study, out):
            written[path.stem] = str(path)
    return written


def _finished(study: Any) -> int:
    from optuna.trial import TrialState
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def run_final(job: TuneJob, study: Any, run: Any) -> dict[str, Any]:
    """Retrain the best settings under the final protocol (train800val200) and evaluate test once: a finished
    final run is never trained or tested again."""
    best, settings = best_settings(job, study)
    cfg = job.settings({k: v for k, v in best.params.items() if k in job.space.ranges}, protocol="final")
    results = run(job.data, cfg, job.study_dir / "final", resume=True)
    record = {"protocol": "final", "test_top1": results["test_top1"], "best_trial": best.number,
              "val_top1": best.value, "trials": len(study.trials), "settings": settings,
              "note": "test evaluated once, after the search, with the settings chosen on validation"}
    write_json(job.study_dir / "final.json", record)
    return record


def tune(job: TuneJob, *, resume: bool = False, final: bool = False, progress: bool = True,
         max_steps_per_epoch: int | None = None) -> dict[str, Any]:
    """Run the search until the study holds ``job.trials`` finished (complete or pruned) trials, write its
    outputs, and with ``final`` run the final protocol once. Returns a summary."""
    optuna = _optuna()
    study = open_study(job, resume)
    run = partial(train, job.backbone, checkpoint=job.checkpoint, pretrained=job.pretrained, progress=progress,
                  max_steps_per_epoch=max_steps_per_epoch)
    remaining = job.trials - _finished(study)
    if remaining > 0:
        done = optuna.study.MaxTrialsCallback(job.trials, states=(optuna.trial.TrialState.COMPLETE,
                                                                  optuna.trial.TrialState.PRUNED))
        study.optimize(partial(_objective, job, run), n_trials=remaining, catch=(),
                       callbacks=[done, lambda s, t: write_outputs(job, s)])
    else:
        print(f"study {study.study_name!r}: {job.trials} trial(s) finished already", file=sys.stderr)
    outputs = write_outputs(job, study, plots=True)
    best, settings = best_settings(job, study)
    summary = {"study": study.study_name, "trials": len(study.trials), "finished": _finished(study),
               "best_trial": best.number, "best_val_top1": best.value, "best_settings": settings, "outputs": outputs}
    if final:
        summary["final"] = run_final(job, study, run)
    return summary
