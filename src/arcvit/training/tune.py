"""``arcvit tune``: search a method's settings for one task on its validation split, never its test split.

Optuna drives the one training loop (``train``) under the ``select`` protocol: each trial trains on train800
(FGVC, ImageFolder: train) in its own folder ``STUDY_DIR/trials/NNNN``, reports validation top-1 after every
epoch (a median pruner stops poor trials early) and scores its best epoch's validation top-1. The test split is
never opened (``evaluate_test=False``). The study lives in Optuna's RDB storage, ``STUDY_DIR/study.db`` unless
``storage`` names a database, so a killed search resumes (``resume=True``) with its finished trials kept, and
several machines share one search by running tune against one storage URL. ``final=True`` then retrains the
best settings under the ``final`` protocol and evaluates test once.

Everything a search needs is checked before the study is created (``make_job``): every corner of the search
space makes a valid run, the accelerator exists, the training and validation lists load (the test split's list
is never opened, so a class only the test split holds is reported by ``train``/``eval``, not here), the largest
batch fits the training split, the backbone loads with its weights, and the method fits it at every rank a trial
can get (built on the meta device: no memory). A study records what it was started with, the data's root and fingerprints included,
and a resumed or shared study must go on with the same. One process works in a study folder at a time (an OS
lock the OS releases when the process ends, however it ends); several processes share a search through one
``storage``, each with its own folder. An error raised inside Optuna or SQLAlchemy reaches the user as one line.
"""
from __future__ import annotations

import contextlib
import itertools
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from arcvit.errors import ConfigError, DataWarning, NonFiniteOutput, TrainingDiverged, first_line
from arcvit.fileio import write_json, write_text
from arcvit.training.config import PROTOCOL_SPLITS, RUNTIME_FIELDS, DataSpec, TrainConfig
from arcvit.training.devices import require_accelerator
from arcvit.training.loop import train
from arcvit.training.runfolder import run_lock
from arcvit.training.search_space import SearchSpace, at_edges, edges_text, load_search_space
from arcvit.training.storage_url import engine_options, parse_storage_url, shown_url
from arcvit.training.tune_outputs import recipe_toml, write_plots, write_trials_csv

STUDY_FILE = "study.db"
TUNE_SET_FIELDS = ("method", "protocol")  # tune sets these itself
PRUNER_STARTUP_TRIALS = 3  # the median pruner stops nothing before this many trials have finished
SCHEMA_RACE_TRIES = 4  # workers starting together on a new database race to create its tables: the losers retry
BUSY = ("another arcvit tune process is working in this study folder; wait for it to end, or join its search "
        "from another --out through a shared --storage")


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
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # its warnings repeat a failed trial's error with a traceback
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
    data_identity: Mapping[str, Any] | None = None  # root, layout, fingerprints: set by make_job

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
                "pretrained": self.pretrained, "data": self.data_identity, "settings": recipe,
                "space": self.space.to_dict()}


def make_job(backbone: str, data: DataSpec, method: str, trials: int, study_dir: str | Path, *,
             base: Mapping[str, Any] | None = None, fixed: Mapping[str, Any] | None = None,
             space_file: str | Path | None = None, **options: Any) -> TuneJob:
    """A checked TuneJob: every input is validated here, before anything is written: the settings at every
    corner of the space, the storage URL, the accelerator, the training and validation data (never the test
    split's list) and the method on the backbone at every rank a trial can get."""
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ConfigError(f"--trials must be a positive whole number, got {trials!r}")
    if Path(study_dir).exists() and not Path(study_dir).is_dir():
        raise ConfigError(f"{study_dir}: exists and is not a folder; --out names the study folder")
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
    _check_storage(job.storage)
    corners = [_corner_settings(job, corner) for corner in _corners(space)]
    require_accelerator(cfg.accelerator)
    data = _check_data(job)
    largest = max(c.batch_size for c in corners)
    if largest > data["train_images"]:
        raise ConfigError(f"batch_size {largest} (the largest a trial can get) is larger than the training split "
                          f"({data['train_images']} images)")
    _check_model(job, corners, data["num_classes"])
    return replace(job, data_identity={k: data[k] for k in ("root", "layout", "fingerprints")})


def _corners(space: SearchSpace) -> Iterator[dict[str, Any]]:
    """Every combination of the ranges' ends: the settings a trial can get at the edges of the space (a
    setting's validity only ever depends on its extremes, e.g. warmup_epochs below epochs)."""
    ranges = list(space.ranges.values())
    for ends in itertools.product(*(r.ends() for r in ranges)):
        yield {r.name: end for r, end in zip(ranges, ends)}


def _corner_settings(job: TuneJob, corner: dict[str, Any]) -> TrainConfig:
    try:
        return job.settings(corner)
    except ConfigError as e:
        drawn = ", ".join(f"{k} = {v!r}" for k, v in corner.items())
        raise ConfigError(f"search space: a trial can draw {drawn}, which makes no valid run ({e})") from None


def _check_storage(url: str | None) -> None:
    """A storage URL that parses and outlives the process: a study in memory could be neither resumed nor
    shared, and its trial folders would be orphaned."""
    if url is None:
        return
    parsed = parse_storage_url(url)
    in_memory = parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"
    if parsed.get_backend_name() == "sqlite" and in_memory:
        raise ConfigError(f"--storage {shown_url(url)!r}: an in-memory SQLite database ends with the process, so the "
                          "study could be neither resumed nor shared; name a file (sqlite:////path/study.db) or drop "
                          "--storage")


def _check_data(job: TuneJob) -> dict[str, Any]:
    """The training and validation splits under the select protocol, loaded as lists (no image decoded; the
    test split's list is never opened): what identifies the study's data, and the class count. Their warnings
    (one class only, a class never trained on) are left to each trial's run."""
    from arcvit.data.layouts import detect_layout, load_split
    data = job.data
    layout = detect_layout(data.root, data.task) if data.layout == "auto" else data.layout
    roles = dict(zip(("train", "val"), PROTOCOL_SPLITS[layout]["select"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        splits = {role: load_split(data.root, data.task, split, None, layout=layout, skip_corrupt=data.skip_corrupt,
                                   allow_outside_root=data.allow_outside_root, open_test=False)
                  for role, split in roles.items()}
    return {"root": str(Path(data.root).resolve()), "layout": layout,
            "fingerprints": {role: ds.fingerprint() for role, ds in splits.items()},
            "num_classes": splits["train"].num_classes, "train_images": len(splits["train"])}


def _check_model(job: TuneJob, corners: list[TrainConfig], num_classes: int) -> None:
    """The backbone with its weights (``checkpoint`` or pretrained), built once as every trial builds it; then
    the method on it at every rank a trial can get, on the meta device (no memory): a checkpoint that does not
    load or a rank the model cannot take is refused before the study exists, not in a trial."""
    import torch

    from arcvit.backends import create_backbone
    from arcvit.methods import prepare_model
    create_backbone(job.backbone, num_classes=num_classes, checkpoint=job.checkpoint, pretrained=job.pretrained)
    for cfg in {(c.rank, c.arc_impl): c for c in corners}.values():
        with torch.device("meta"):
            model = create_backbone(job.backbone, num_classes=num_classes, pretrained=False)
            prepare_model(model, cfg.method, rank=cfg.rank, dropout=cfg.adapter_dropout, targets=cfg.targets,
                          impl=cfg.arc_impl, arc_options=cfg.arc_options)


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
    return f"sqlite:///{db.resolve()}"


def _open_storage(optuna: Any, url: str, create_dir: Path | None) -> Any:
    """Optuna's RDB storage with heartbeats, so that a trial whose process died is failed and retried."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError, SQLAlchemyError  # optuna's own dependency
    if create_dir is not None:
        create_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(SCHEMA_RACE_TRIES):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url, engine_kwargs=engine_options(url), heartbeat_interval=60, grace_period=180,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))
        except (IntegrityError, ProgrammingError) as e:  # another worker created the same tables at this moment
            error = e
            time.sleep(0.2 * (attempt + 1))
        except (SQLAlchemyError, ImportError, ValueError, OSError) as e:  # bad URL, no driver, cannot connect
            error = e
            break
    first = first_line(error) or type(error).__name__
    raise ConfigError(f"storage {shown_url(url)!r} cannot be opened ({first})") from None


def _retry_interrupted(job: TuneJob, study: Any) -> None:
    """A local study resumed: its RUNNING trials whose run folder is in this study folder died with the killed
    search (this process holds the folder's lock, so no live process trains there). Fail them and queue their
    settings again: the retry continues the run folder from its last checkpoint. A RUNNING trial of a process
    that joined through --storage (its run folder elsewhere) may be alive: its heartbeat decides."""
    from optuna.trial import TrialState
    here = (job.study_dir / "trials").resolve()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if "run_dir" in t.user_attrs and Path(t.user_attrs["run_dir"]).resolve().parent == here:
            study.tell(t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``: the dotted name of every value a study identity holds."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, Mapping) and value:
            flat |= _leaves(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _differences(stored: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    """What differs between a study's recorded identity and this job's, one ``name before -> now`` each."""
    before, now = _leaves(stored), _leaves(identity)
    return "; ".join(f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in {**before, **now}
                     if before.get(k) != now.get(k))


def _require_study(storage: Any, name: str, identity: Mapping[str, Any], url: str) -> None:
    """--resume continues a study that exists; asked under another name (another task or method), the one
    study a folder holds says what differs."""
    studies = storage.get_all_studies()
    if any(s.study_name == name for s in studies):
        return
    if len(studies) == 1:
        held = studies[0]
        diffs = _differences(held.user_attrs.get("arcvit") or {}, identity) or f"--study-name {held.study_name}"
        raise ConfigError(f"{url}: holds study {held.study_name!r}, not {name!r}: --resume goes on with what it "
                          f"was started with ({diffs})")
    held = ", ".join(repr(s.study_name) for s in studies) or "none"
    raise ConfigError(f"{url}: no study {name!r} to resume (it holds: {held}); drop --resume to start one")


def open_study(job: TuneJob, resume: bool = False) -> Any:
    """Create or load the study, checking that a loaded one was started with this job's settings."""
    optuna = _optuna()
    url = _storage_url(job, resume)
    storage = _open_storage(optuna, url, None if job.storage else job.study_dir)
    name = job.study_name or f"{job.task}.{job.method}"
    identity = job.identity()
    if resume:
        _require_study(storage, name, identity, shown_url(url))
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True,
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS))
    stored = study.user_attrs.get("arcvit")
    if stored is None:
        study.set_user_attr("arcvit", identity)
    elif stored != identity:
        raise ConfigError(f"study {name!r} in {shown_url(url)} was started with other settings "
                          f"({_differences(stored, identity)})")
    if resume and not job.storage:
        _retry_interrupted(job, study)
    return study


def draw_settings(job: TuneJob, trial: Any) -> dict[str, Any]:
    """The trial's settings, drawn by TPE seeded with the run seed plus the trial's number: numbers are unique
    across every process sharing the study, so workers that start together draw different settings, and a
    resumed search draws what an uninterrupted one would have drawn."""
    optuna = _optuna()
    trial.study.sampler = optuna.samplers.TPESampler(seed=job.settings().seed + trial.number,
                                                     n_startup_trials=sampler_startup_trials(job.trials))
    return {name: r.suggest(trial) for name, r in job.space.ranges.items()}


def _objective(job: TuneJob, run: Any, trial: Any) -> float:
    """One trial: train in its own folder on train800, score validation top-1, prune on its epochs."""
    optuna = _optuna()
    params = draw_settings(job, trial)
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
    except (TrainingDiverged, NonFiniteOutput) as e:  # a setting that diverges is a poor one, not a broken search
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
    written = {"trials_csv": str(write_trials_csv(study.trials, out / "trials.csv", job.space.ranges))}
    try:
        best, settings = best_settings(job, study)
    except ConfigError:
        return written
    header = (f"arcvit tune: the best of {len(study.trials)} trial(s) of study {study.study_name!r} "
              f"(trial {best.number}, val top-1 {best.value:.4f}),\nsearched on validation only. "
              f"Use: arcvit train --config best.toml --task {job.task} --method {job.method} ...")
    searched = {k: settings[k] for k in job.space.ranges}
    edges = edges_text(at_edges(job.space.ranges, searched))
    if edges:
        header += (f"\nAT THE EDGE of its search range (within 5 %): {edges}; the best value may lie beyond it: "
                   "widen the range and tune again.")
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
    with run_lock(job.study_dir, BUSY), optuna_errors(job):
        return _search(job, resume, final, progress, max_steps_per_epoch)


@contextlib.contextmanager
def optuna_errors(job: TuneJob) -> Iterator[None]:
    """An exception raised inside Optuna or SQLAlchemy (a storage that fails, a trial another process
    changed) as one line naming the study; errors from the trials' own code pass through unchanged."""
    try:
        yield
    except Exception as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = tb.tb_frame.f_globals.get("__name__", "") if tb is not None else ""
        if where.split(".")[0] not in ("optuna", "sqlalchemy"):
            raise
        first = first_line(e)
        study = shown_url(job.storage) if job.storage else job.study_dir / STUDY_FILE
        raise ConfigError(f"study storage {study}: {type(e).__name__}: {first}") from None


def _search(job: TuneJob, resume: bool, final: bool, progress: bool,
            max_steps_per_epoch: int | None) -> dict[str, Any]:
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
               "best_trial": best.number, "best_val_top1": best.value, "best_settings": settings,
               "at_edge": at_edges(job.space.ranges, settings), "outputs": outputs}
    if final:
        summary["final"] = run_final(job, study, run)
    return summary
