"""``arcvit tune``: the command-line side of arcvit.training.tune (optuna is imported only when it runs)."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

from arcvit.cli import RECIPE_HELP, _add_backbone, _add_data, _train_flags, bounds, command_help
from arcvit.cli.bench import add_ray_flags, ray_executor
from arcvit.training.storage_url import storage_flag


def cmd_tune(args: argparse.Namespace) -> None:
    from arcvit.bench.executors import InProcess
    from arcvit.data.layouts import task_key
    from arcvit.training.config import DataSpec, TrainConfig
    from arcvit.training.recipes import load_recipe
    from arcvit.training.tune import make_job
    executor = ray_executor(args) or InProcess()  # --ray: a missing extra or a bad address fails first
    fixed = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "method" and getattr(args, f.name, None) is not None}
    base = load_recipe(args.train_config).settings(task_key(args.task), args.method) if args.train_config else {}
    job = make_job(args.backbone, DataSpec(args.data, args.task, args.layout, args.skip_corrupt, args.allow_outside_root), args.method,
                   args.trials, args.out, base=base, fixed=fixed, space_file=args.config, storage=args.storage,
                   study_name=args.study_name, checkpoint=args.checkpoint, pretrained=not args.random_init)
    summary = executor.tune(job, resume=args.resume, final=args.final, progress=not args.quiet)
    print(json.dumps(summary, indent=2))


def add_tune_command(sub: argparse._SubParsersAction) -> None:
    """The ``tune`` subcommand (``sub`` makes arcvit's own parsers)."""
    p = sub.add_parser("tune", help=command_help("tune"),
                       description="Train on train800 and score val200 (FGVC, ImageFolder: train -> val) for each "
                                   "trial; the test split is never opened. Every training flag given fixes that "
                                   "setting for all trials. Writes STUDY_DIR/study.db, trials.csv, best.toml (a "
                                   "recipe for `arcvit train --config` and `arcvit bench --config`) and plots.")
    _add_backbone(p)
    _add_data(p)
    _train_flags(p, config_help="search space (TOML) applied over the packaged configs/search_space.toml: "
                                "[defaults] and [methods.<method>] ranges {low, high, log} or {choices}; "
                                "a plain value fixes a setting")
    p.add_argument("--trials", type=bounds.TRIALS, required=True, help="finished (complete or pruned) trials the study needs")
    p.add_argument("--out", required=True, metavar="STUDY_DIR", help="study folder (trials/NNNN run folders, "
                                                                     "study.db, trials.csv, best.toml, plots)")
    p.add_argument("--resume", action="store_true", help="continue the study in STUDY_DIR (a killed search), with "
                                                         "the data, method, task and search space it started with")
    p.add_argument("--storage", metavar="URL", type=storage_flag, help="an Optuna RDB storage instead of STUDY_DIR/study.db, e.g. "
                                                    "postgresql://host/db: every process running tune against it "
                                                    "(each with its own --out) works on the same study")
    p.add_argument("--study-name", help="default: <task>.<method>")
    p.add_argument("--train-config", metavar="FILE", help=f"settings not searched, from a {RECIPE_HELP.replace('; flags beat it', '')}; "
                                    "the search space and flags beat it")
    p.add_argument("--final", action="store_true", help="then retrain the best settings on train800val200 "
                                                       "(FGVC: train+val) and evaluate test, once")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_ray_flags(p, "each tuning worker (as many as one run's resources fit, each asking the study for trials)")
    p.set_defaults(func=cmd_tune)
