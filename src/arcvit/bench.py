"""``arcvit bench``: every (task, method, seed) of a suite in its own resumable run folder, and the report.

Every method sees the same data, schedule and seeds; only what the suite config sets per method (its learning
rate, its rank) differs. A bench is safe to kill: a finished run is never trained again, an interrupted one
continues from its checkpoint, and the report is rebuilt after every run. A bench folder holds one recipe:
a rerun whose settings differ from a run already there stops before training anything.
"""
from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import partial
from pathlib import Path
from typing import Any

from lightning_fabric.utilities import rank_zero_only

from arcvit.data.layouts import resolve_task
from arcvit.data.mini import build_mini_suite
from arcvit.errors import ArcvitError, ConfigError
from arcvit.fileio import write_json, write_text
from arcvit.methods import METHODS, SPECS
from arcvit.report import (ADAPTER_FIELDS, ERROR_FILE, PLAN_FILE, SUITES, build_report, collect_runs, read_json,
                           run_dir)
from arcvit.train import DataSpec, TrainConfig, train
from arcvit.zoo import DEFAULT_BACKBONE

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# How a run executes rather than what it computes: may change when an interrupted run is resumed elsewhere.
EXECUTION_FIELDS = ("accelerator", "devices", "num_nodes", "strategy", "num_workers", "eval_batch_size")
BENCH_SET_FIELDS = ("method", "seed")  # the bench sets these itself

# With devices > 1, Fabric starts the other processes by rerunning this same command: they train in step with
# the first, but only the first speaks and writes the plan and report.
_echo = rank_zero_only(partial(print, flush=True))
_report = rank_zero_only(build_report)


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


@dataclass(frozen=True)
class BenchConfig:
    """A suite recipe: layers of TrainConfig settings, applied most specific last:
    ``[defaults]`` < ``[tasks.T]`` < ``[methods.M]`` < ``[tasks.T.methods.M]`` (< command-line overrides).

    A method's own layer beats a task's because learning rates live on a method's scale (full fine-tuning
    needs a far smaller one); a setting for one method on one task goes in ``[tasks.T.methods.M]``. Rank and
    adapter dropout in the shared layers reach only the methods that have an adapter.
    """

    source: str
    defaults: Mapping[str, Any]
    methods: Mapping[str, Mapping[str, Any]]
    tasks: Mapping[str, Mapping[str, Any]]
    task_methods: Mapping[tuple[str, str], Mapping[str, Any]]

    def settings(self, task: str, method: str) -> dict[str, Any]:
        shared = {**self.defaults, **self.tasks.get(task, {})}
        if SPECS[method].default_rank is None:
            shared = {k: v for k, v in shared.items() if k not in ADAPTER_FIELDS}
        return {**shared, **self.methods.get(method, {}), **self.task_methods.get((task, method), {})}


def _layer(value: Any, where: str) -> dict[str, Any]:
    """One table of settings, checked against TrainConfig's fields."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {value!r}")
    bench_set = [k for k in BENCH_SET_FIELDS if k in value]
    if bench_set:
        raise ConfigError(f"{where}: {', '.join(bench_set)}: set by the bench (--methods, --seeds), not a recipe")
    unknown = sorted(set(value) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    return dict(value)


def _methods_layers(value: Any, path: Path, section: str) -> dict[str, dict[str, Any]]:
    """The ``[<section>.<method>]`` tables."""
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected [{section}.<method>] tables")
    unknown = sorted(set(value) - set(METHODS))
    if unknown:
        raise ConfigError(f"{path}: [{section}]: unknown method(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(METHODS)}")
    return {m: _layer(v, f"{path}: [{section}.{m}]") for m, v in value.items()}


def load_config(path: str | Path, suite: str) -> BenchConfig:
    """Read a suite recipe (TOML); every name and setting is checked here, before anything trains."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: cannot parse ({e})") from None
    for section, value in data.items():
        if section not in ("defaults", "methods", "tasks") or not isinstance(value, dict):
            raise ConfigError(f"{path}: unexpected {section!r}; a recipe holds [defaults], [methods.<method>], "
                              "[tasks.<task>] and [tasks.<task>.methods.<method>] tables")
    tasks, task_methods = {}, {}
    for name, table in data.get("tasks", {}).items():
        try:
            task = canonical_task(suite, name)
        except ArcvitError as e:
            raise ConfigError(f"{path}: [tasks.{name}]: {e}") from None
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: [tasks.{name}]: expected a table of settings, got {table!r}")
        tasks[task] = _layer({k: v for k, v in table.items() if k != "methods"}, f"{path}: [tasks.{name}]")
        for method, layer in _methods_layers(table.get("methods", {}), path, f"tasks.{name}.methods").items():
            task_methods[(task, method)] = layer
    return BenchConfig(str(path), _layer(data.get("defaults", {}), f"{path}: [defaults]"),
                       _methods_layers(data.get("methods", {}), path, "methods"), tasks, task_methods)


def run_config(config: BenchConfig, task: str, method: str, seed: int,
               overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The TrainConfig of one run. An ``epochs`` override keeps the recipe's warm-up fraction (rounded down):
    10 warm-up epochs of 100 become 1 of 10."""
    settings = config.settings(task, method)
    if SPECS[method].default_rank is None and any(settings.get(k) is not None for k in ADAPTER_FIELDS):
        raise ConfigError(f"{config.source}: {method} has no rank or adapter dropout to set (task {task})")
    overrides = dict(overrides or {})
    if "epochs" in overrides:
        defaults = TrainConfig()
        warmup = settings.get("warmup_epochs", defaults.warmup_epochs)
        settings["warmup_epochs"] = warmup * overrides["epochs"] // max(1, settings.get("epochs", defaults.epochs))
    settings |= overrides | {"method": method, "seed": seed}
    return TrainConfig.from_dict(settings, source=f"{config.source} ({task}, {method})")


@dataclass(frozen=True)
class Run:
    """One planned (task, method, seed): its settings, resolved before anything trains, and its folder."""

    task: str
    method: str
    seed: int
    cfg: TrainConfig
    dir: Path


def _recipe(train_settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_settings.items() if k not in EXECUTION_FIELDS}


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
    """bench.json: what this folder benchmarks. A later bench into it may add tasks, methods and seeds."""
    old = read_json(out / PLAN_FILE) or {}
    for key in ("suite", "backbone", "checkpoint", "pretrained"):
        if key in old and old[key] != plan[key]:
            raise ConfigError(f"{out} benchmarks {key} {old[key]!r}, not {plan[key]!r}; use another --out")
    for key in ("tasks", "methods", "seeds"):
        plan[key] = list(dict.fromkeys([*old.get(key, []), *plan[key]]))
    tasks = SUITES[plan["suite"]].tasks
    plan["tasks"] = [t for t in tasks if t in plan["tasks"]]
    write_json(out / PLAN_FILE, plan)


def _selection(suite: str, tasks: Sequence[str] | None, methods: Sequence[str] | None,
               seeds: Sequence[int]) -> tuple[list[str], list[str], list[int]]:
    """The tasks (in the suite's order), methods and seeds to run, each checked and without repeats."""
    wanted = {canonical_task(suite, t) for t in tasks} if tasks else set(SUITES[suite].tasks)
    methods = list(dict.fromkeys(methods or METHODS))
    unknown = [m for m in methods if m not in SPECS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise ConfigError(f"seeds must be non-negative integers, got {list(seeds)}")
    return [t for t in SUITES[suite].tasks if t in wanted], methods, list(dict.fromkeys(seeds))


def run_bench(suite: str, out: str | Path, *, data: str | Path | None = None, tasks: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, seeds: Sequence[int] = (0,), backbone: str | None = None,
              checkpoint: str | Path | None = None, config: str | Path | None = None,
              overrides: Mapping[str, Any] | None = None, progress: bool = True, pretrained: bool = True,
              max_steps_per_epoch: int | None = None, mini_test_size: int = 500) -> Path:
    """Train every (task, method, seed) not yet finished into ``out/runs/<task>/<method>/seed<k>/``, rebuilding
    the report in ``out`` after each; returns ``out``.

    ``config`` defaults to ``configs/<suite>.toml``; ``overrides`` (TrainConfig fields, e.g. epochs, protocol,
    devices) beat it for every run. ``pretrained=False``, ``max_steps_per_epoch`` and ``mini_test_size`` make
    tiny benches for tests. A run failing with an ArcvitError leaves ``error.txt`` and the bench goes on; the
    next bench retries it.
    """
    if suite not in SUITE_RUNS:
        raise ConfigError(f"unknown suite {suite!r}; choose from {', '.join(SUITE_RUNS)}")
    spec, out = SUITE_RUNS[suite], Path(out)
    if spec.needs_data and data is None:
        raise ConfigError(f"suite {suite} needs --data, the folder holding its task folders")
    task_names, methods, seeds = _selection(suite, tasks, methods, seeds)
    config_path = Path(config) if config else CONFIG_DIR / f"{suite}.toml"
    recipe = load_config(config_path, suite)
    identity = {"backbone": backbone or spec.backbone, "checkpoint": str(checkpoint) if checkpoint else None,
                "pretrained": pretrained}
    runs = [Run(t, m, s, run_config(recipe, t, m, s, overrides), run_dir(out, t, m, s))
            for t in task_names for m in methods for s in seeds]
    for run in runs:
        _check_existing(run, identity)

    data_root = _prepare_data(suite, data, out, task_names, mini_test_size)
    _write_plan(out, {"suite": suite, **identity, "data": str(data_root), "config": str(config_path),
                      "overrides": dict(overrides or {}), "tasks": task_names, "methods": methods, "seeds": seeds})
    fit = partial(train, identity["backbone"], checkpoint=checkpoint, pretrained=pretrained, resume=True,
                  progress=progress, max_steps_per_epoch=max_steps_per_epoch)
    _report(out, suite)
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.task} / {run.method} / seed {run.seed}"
        if (run.dir / "results.json").exists():
            _echo(f"{label}: skip (done)")
            continue
        (run.dir / ERROR_FILE).unlink(missing_ok=True)
        try:
            results = fit(DataSpec(str(data_root), run.task, spec.layout), run.cfg, run.dir)
            outcome = (f"top-1 {100 * results['test_top1']:.2f}%, {results['trainable_params']:,} trainable, "
                       f"{results['wall_time_s']:.0f}s")
        except ArcvitError as e:
            write_text(run.dir / ERROR_FILE, f"{type(e).__name__}: {e}\n")
            outcome = f"FAILED ({type(e).__name__}: {e})"
        _echo(f"{label}: {outcome}")
        _report(out, suite)
    _echo(f"report: {out / 'report.md'}")
    return out


def cmd_bench(args: argparse.Namespace) -> None:
    overrides = {k: getattr(args, k) for k in ("epochs", "protocol", "devices", "precision", "accelerator")
                 if getattr(args, k) is not None}
    try:
        out = run_bench(args.suite, args.out or f"runs/bench_{args.suite}", data=args.data, tasks=args.tasks,
                        methods=args.methods, seeds=args.seeds, backbone=args.backbone, checkpoint=args.checkpoint,
                        config=args.config, overrides=overrides, progress=not args.quiet)
    except KeyboardInterrupt:
        print("arcvit bench: interrupted; run the same command again to resume (finished runs are kept)",
              file=sys.stderr)
        raise SystemExit(130) from None
    failed = sum(r["status"] == "failed" for r in collect_runs(out))
    if failed:  # a non-zero exit, so that scripts notice; the next bench retries them
        raise ArcvitError(f"{failed} run(s) failed: see {out / 'report.md'}")


def cmd_report(args: argparse.Namespace) -> None:
    build_report(args.dir, args.suite)
    for name in ("report.md", "results.csv", "results.json", "accuracy_vs_params.png"):
        if (Path(args.dir) / name).exists():
            print(Path(args.dir) / name)


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` and ``report`` subcommands (``sub`` makes arcvit's own parsers)."""
    p = sub.add_parser("bench", help="benchmark methods over a suite of tasks and seeds, with a VTAB-style report",
                       description=__doc__)
    p.add_argument("--suite", required=True, choices=SUITE_RUNS,
                   help="mini: offline, built under OUT/data (or --data); vtab1k: 19 NOAH folders; fgvc: 5 VPT folders")
    p.add_argument("--data", help="data root holding the task folders (required for vtab1k and fgvc)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="a subset of the suite's tasks (default: all)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help=f"default: all of {', '.join(METHODS)}")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="e.g. 0 1 2 (default: 0)")
    p.add_argument("--out", help="results folder (default: runs/bench_<suite>)")
    p.add_argument("--backbone", help=f"timm model name (default: {DEFAULT_BACKBONE} for mini, "
                                      f"{SUITE_RUNS['vtab1k'].backbone} otherwise)")
    p.add_argument("--checkpoint", help="local weights for the backbone: .npz (Google ViT), .safetensors, .pth")
    p.add_argument("--config", help="suite recipe (TOML): [defaults], [methods.M], [tasks.T], [tasks.T.methods.M] "
                                    "TrainConfig settings, most specific last (default: configs/<suite>.toml)")
    p.add_argument("--epochs", type=int, help="override the schedule's length, keeping its warm-up fraction")
    p.add_argument("--protocol", choices=["final", "select"],
                   help="final: train on train+val, test after the last epoch; select: pick the epoch on val")
    p.add_argument("--devices", type=int)
    p.add_argument("--precision", help="e.g. 32-true, bf16-mixed")
    p.add_argument("--accelerator", help="auto, cpu, cuda, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars (one line per run is still printed)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="rebuild a bench's table, CSV/JSON and plot from its run folders")
    p.add_argument("dir", help="a bench results folder (the --out of `arcvit bench`)")
    p.add_argument("--suite", choices=SUITES, help="default: the bench's own, from its bench.json")
    p.set_defaults(func=cmd_report)
