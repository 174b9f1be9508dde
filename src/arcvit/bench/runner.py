"""``arcvit bench``: every (task, method, seed) of a suite in its own resumable run folder, and the report.

Every method sees the same data, schedule and seeds; only what the suite config sets per method (its learning
rate, its rank) differs. A bench is safe to kill: a finished run is never trained again, an interrupted one
continues from its checkpoint, and the report is rebuilt after every run. A bench folder holds one recipe:
a rerun whose settings differ from a run already there stops before training anything.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from lightning_fabric.utilities import rank_zero_only

from arcvit.backends.timm.zoo import DEFAULT_BACKBONE
from arcvit.bench.executors import Executor, InProcess, Outcome, RunJob
from arcvit.bench.grid_progress import GridProgress
from arcvit.bench.provenance import check_bench_data
from arcvit.bench.report import (
    ERROR_FILE,
    PLAN_FILE,
    SUITES,
    build_report,
    check_runs_kept,
    collect_runs,
    read_json,
    run_dir,
)
from arcvit.bench.tuning import tune_row, tuned_recipe
from arcvit.bench.variants import split_variant
from arcvit.data.layouts import resolve_task
from arcvit.data.mini import build_mini_suite
from arcvit.errors import ConfigError
from arcvit.fileio import write_json, write_text
from arcvit.methods import METHODS
from arcvit.training.config import RUNTIME_FIELDS, DataSpec, TrainConfig
from arcvit.training.devices import require_devices
from arcvit.training.loop import train
from arcvit.training.recipes import Recipe, load_recipe, shared_settings, train_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
BENCH_SET_FIELDS = ("method", "seed")  # the bench sets these itself

# With devices > 1, Fabric starts the other processes by rerunning this same command: they train in step with
# the first, but only the first speaks and writes the plan and report.
_echo = rank_zero_only(partial(print, flush=True))
_report = rank_zero_only(partial(build_report, force=True))  # from the folders: the bench reruns what they lack


@dataclass(frozen=True)
class SuiteRun:
    """How the bench runs a suite: the layout of its data on disk and the backbone its recipe is for."""

    layout: str
    backbone: str
    needs_data: bool


SUITE_RUNS: dict[str, SuiteRun] = {
    "mini": SuiteRun("vtab", DEFAULT_BACKBONE, needs_data=False),
    "vtab1k": SuiteRun("vtab", "vit_base_patch16_224.augreg_in21k", needs_data=True),
    "fgvc": SuiteRun("fgvc", "vit_base_patch16_224.augreg_in21k", needs_data=True),
}


def canonical_task(suite: str, name: str) -> str:
    """A suite's task by its folder name or (VTAB-1k, FGVC) a usual alias such as 'cub' or 'pets'."""
    if suite == "mini":
        if name not in SUITES["mini"].tasks:
            raise ConfigError(f"unknown mini task {name!r}; choose from {', '.join(SUITES['mini'].tasks)}")
        return name
    return resolve_task(name, SUITE_RUNS[suite].layout).folder


def suite_recipe(path: str | Path, suite: str) -> Recipe:
    """A suite's recipe file: its tasks are the suite's, and method and seed are the bench's to set."""
    return load_recipe(path, partial(canonical_task, suite), reserved=BENCH_SET_FIELDS)


@dataclass(frozen=True)
class Run:
    """One planned (task, method, seed): its settings, resolved before anything trains, and its folder."""

    task: str
    method: str
    seed: int
    cfg: TrainConfig
    dir: Path


def _recipe(train_settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_settings.items() if k not in RUNTIME_FIELDS}


def _check_existing(run: Run, identity: Mapping[str, Any]) -> None:
    """Refuse to mix recipes in one bench folder: a run already there must have been made as planned now."""
    stored = read_json(run.dir / "settings.json")
    if stored is None:
        return
    want = {**identity, **_recipe(asdict(run.cfg))}
    have = {**{k: stored.get(k) for k in identity}, **_recipe(stored.get("train", {}))}
    diffs = [f"{k} {have.get(k)!r} -> {v!r}" for k, v in want.items() if have.get(k) != v]
    if diffs:
        raise ConfigError(f"{run.dir} was run with other settings ({', '.join(diffs)}); use another --out, "
                          "or delete that run folder to redo it")


def _prepare_data(suite: str, data: str | Path | None, out: Path, tasks: Sequence[str], test_size: int) -> Path:
    if suite == "mini":
        root = Path(data) if data else out / "data"
        _echo(f"mini suite: data under {root} (built once)")
        build_mini_suite(root, tasks, test_size=test_size)
        return root
    root = Path(data)
    missing = [t for t in tasks if not (root / t).is_dir()]
    if missing:
        raise ConfigError(f"{root}: no folder for task(s) {', '.join(missing)}; pass --tasks to run the others")
    return root


@rank_zero_only
def _write_plan(out: Path, plan: dict[str, Any]) -> None:
    """bench.json: what this folder benchmarks. A later bench into it may add tasks, methods and seeds; the
    methods it names come first, in its order (the report's row order), then those only earlier ones named."""
    old = read_json(out / PLAN_FILE) or {}
    for key in ("suite", "backbone", "checkpoint", "pretrained"):
        if key in old and old[key] != plan[key]:
            raise ConfigError(f"{out} benchmarks {key} {old[key]!r}, not {plan[key]!r}; use another --out")
    for key in ("tasks", "methods", "seeds"):
        plan[key] = list(dict.fromkeys([*plan[key], *old.get(key, [])]))
    tasks = SUITES[plan["suite"]].tasks
    plan["tasks"] = [t for t in tasks if t in plan["tasks"]]
    write_json(out / PLAN_FILE, plan)


def _selection(suite: str, tasks: Sequence[str] | None, methods: Sequence[str] | None,
               seeds: Sequence[int]) -> tuple[list[str], list[str], list[int]]:
    """The tasks (in the suite's order), methods and seeds to run, each checked and without repeats."""
    wanted = {canonical_task(suite, t) for t in tasks} if tasks else set(SUITES[suite].tasks)
    methods = list(dict.fromkeys(methods or METHODS))
    for name in methods:
        split_variant(name)
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be non-negative integers, got {list(seeds)}")
    return [t for t in SUITES[suite].tasks if t in wanted], methods, list(dict.fromkeys(seeds))


def _run_config(recipe: Recipe, task: str, name: str, seed: int, overrides: Mapping[str, Any]) -> TrainConfig:
    """One run's settings; a variant ``M@R`` runs method M with its rank fixed at R, above the recipe."""
    method, rank = split_variant(name)
    return train_config(recipe, task, method,
                        shared_settings(overrides, method) | {"seed": seed} | ({"rank": rank} if rank else {}))


def _plan(recipe: Recipe, tasks: Sequence[str], methods: Sequence[str], seeds: Sequence[int],
          overrides: Mapping[str, Any], out: Path, tuned: Mapping[str, Mapping[str, Any]]) -> list[Run]:
    """Every run, its settings resolved; a tuned (task, method) gets its searched settings as its own layer."""
    runs = []
    for t in tasks:
        for m in methods:
            mine = tuned_recipe(recipe, t, split_variant(m)[0], tuned[t][m]["settings"]) if tuned else recipe
            runs += [Run(t, m, s, _run_config(mine, t, m, s, overrides), run_dir(out, t, m, s)) for s in seeds]
    return runs


def _tune_all(recipe: Recipe, tasks: Sequence[str], methods: Sequence[str], overrides: Mapping[str, Any],
              trials: int, out: Path, data: DataSpec, backbone: str,
              **options: Any) -> dict[str, dict[str, Any]]:
    """Tune every (task, method) with the same ``trials`` on ``data`` (its task replaced by each of ``tasks``);
    returns task -> method -> the study's record."""
    tuned: dict[str, dict[str, Any]] = {}
    for i, (task, name) in enumerate([(t, m) for t in tasks for m in methods], 1):
        record = tune_row(recipe, task, name, overrides, trials, out, replace(data, task=task), backbone, **options)
        tuned.setdefault(task, {})[name] = record
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in record["settings"].items())
        _echo(f"tune [{i}/{len(tasks) * len(methods)}] {task} / {name}: val top-1 {100 * record['val_top1']:.2f}% "
              f"(best of {trials} trials): {shown}")
    return tuned


def _finished(out: Path, suite: str, grid: GridProgress, job: RunJob, outcome: Outcome) -> None:
    """A run ended (in this process or on a worker): its error in its folder, its line, the report rebuilt."""
    if outcome.error is not None:
        write_text(job.dir / ERROR_FILE, f"{outcome.error}\n")
        text = f"FAILED ({outcome.error})"
    else:
        r = outcome.results
        text = f"top-1 {100 * r['test_top1']:.2f}%, {r['trainable_params']:,} trainable, {r['wall_time_s']:.0f}s"
    _echo(f"{job.label}: {text}")
    _report(out, suite)
    grid.finished(failed=outcome.error is not None)


def run_bench(suite: str, out: str | Path, *, data: str | Path | None = None, tasks: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, seeds: Sequence[int] = (0,), backbone: str | None = None,
              checkpoint: str | Path | None = None, config: str | Path | None = None,
              overrides: Mapping[str, Any] | None = None, progress: bool = True, pretrained: bool = True,
              max_steps_per_epoch: int | None = None, mini_test_size: int = 500, tune: int | None = None,
              search_space: str | Path | None = None, allow_outside_root: bool = False,
              executor: Executor | None = None, storage: str | None = None,
              allow_mixed_data: bool = False) -> Path:
    """Train every (task, method, seed) not yet finished into ``out/runs/<task>/<method>/seed<k>/``, rebuilding
    the report in ``out`` after each; returns ``out``.

    ``config`` defaults to ``configs/<suite>.toml``; ``overrides`` (TrainConfig fields, e.g. epochs, protocol,
    devices) beat it for every run. A method may be a variant ``M@R`` (method M at rank R). ``tune=N`` first
    tunes every (task, method) with N trials on validation (``search_space`` over the packaged one) and runs
    the tuned settings. ``pretrained=False``, ``max_steps_per_epoch`` and ``mini_test_size`` make tiny benches
    for tests. A run failing with an ArcvitError leaves ``error.txt`` and the bench goes on; the next bench
    retries it. ``allow_outside_root``: list files may name images outside ``data``. ``executor`` trains the
    runs and the tuning trials (default: one after another in this process; ``RayExecutor``: Ray tasks);
    ``storage``: with ``tune``, the studies' Optuna database (default: a SQLite file per study).
    ``allow_mixed_data`` (recorded in the plan): the report may hold runs of one task on data with different
    manifest digests; without it, a bench whose data differs from its folder's finished runs is refused
    before training.
    """
    if suite not in SUITE_RUNS:
        raise ConfigError(f"unknown suite {suite!r}; choose from {', '.join(SUITE_RUNS)}")
    spec, out = SUITE_RUNS[suite], Path(out)
    if spec.needs_data and data is None:
        raise ConfigError(f"suite {suite} needs --data, the folder holding its task folders")
    task_names, methods, seeds = _selection(suite, tasks, methods, seeds)
    config_path = Path(config) if config else CONFIG_DIR / f"{suite}.toml"
    recipe = suite_recipe(config_path, suite)
    identity = {"backbone": backbone or spec.backbone, "checkpoint": str(checkpoint) if checkpoint else None,
                "pretrained": pretrained}
    overrides = dict(overrides or {})
    if tune is not None and (isinstance(tune, bool) or not isinstance(tune, int) or tune < 1):
        raise ConfigError(f"--tune must be a positive whole number of trials, got {tune!r}")
    plan = partial(_plan, recipe, task_names, methods, seeds, overrides, out)
    check_runs_kept(out)
    if tune is None:  # settings known now: refuse a mixed bench folder before building any data
        for run in plan({}):
            _check_existing(run, identity)
            if executor is None:  # it trains here (another executor's workers check their own devices)
                require_devices(run.cfg.accelerator, run.cfg.devices)

    data_spec = DataSpec(str(_prepare_data(suite, data, out, task_names, mini_test_size)), "", spec.layout,
                         allow_outside_root=allow_outside_root)
    check_bench_data(collect_runs(out), data_spec.root, task_names, allow_mixed_data)  # before any training
    tuning, tuned = None, {}
    if tune is not None:
        tuned = _tune_all(recipe, task_names, methods, overrides, tune, out, data_spec,
                          identity["backbone"], checkpoint=checkpoint, pretrained=pretrained, progress=progress,
                          space_file=search_space, max_steps_per_epoch=max_steps_per_epoch, storage=storage,
                          executor=executor)
        tuning = {"trials": tune, "search_space": str(search_space or "packaged"), "tuned": tuned}
    runs = plan(tuned)
    for run in runs:
        _check_existing(run, identity)
    _write_plan(out, {"suite": suite, **identity, "data": data_spec.root, "config": str(config_path),
                      "overrides": overrides, "tasks": task_names, "methods": methods, "seeds": seeds,
                      "tuning": tuning, "allow_mixed_data": allow_mixed_data})
    fit = partial(train, identity["backbone"], checkpoint=checkpoint, pretrained=pretrained, resume=True,
                  progress=progress, max_steps_per_epoch=max_steps_per_epoch)
    _report(out, suite)
    todo = []
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.task} / {run.method} / seed {run.seed}"
        if (run.dir / "results.json").exists():
            _echo(f"{label}: skip (done)")
            continue
        (run.dir / ERROR_FILE).unlink(missing_ok=True)
        todo.append(RunJob(label, replace(data_spec, task=run.task), run.cfg, run.dir))
    grid = GridProgress(len(runs) - len(todo), len(todo), _echo)
    (executor or InProcess()).run(todo, fit, grid.started, partial(_finished, out, suite, grid))
    _echo(f"report: {out / 'report.md'}")
    return out
