"""``arcvit train``: adapt a backbone to one task with ARC or a baseline (a thin layer over arcvit.training)."""
from __future__ import annotations

import argparse
import json
from dataclasses import fields

from arcvit.cli import _add_backbone, _add_data, _train_flags, command_help


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help=command_help("train"))
    _add_backbone(p)
    _add_data(p)
    _train_flags(p)
    p.add_argument("--out", required=True, help="run folder (settings, metrics, checkpoints, results, adapter)")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def train_config(args: argparse.Namespace):
    """The recipe file's layers for this task and method (``--config``), then every flag given."""
    from arcvit.data.layouts import task_key
    from arcvit.training.config import TrainConfig
    from arcvit.training.recipes import Recipe, load_recipe
    from arcvit.training.recipes import train_config as layered
    recipe = load_recipe(args.config) if args.config else Recipe()
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "method" and getattr(args, f.name, None) is not None}
    return layered(recipe, task_key(args.task), args.method, flags)


def cmd_train(args: argparse.Namespace) -> None:
    from arcvit.training.config import DataSpec
    from arcvit.training.loop import train
    results = train(args.backbone, DataSpec(args.data, args.task, args.layout, args.skip_corrupt,
                                            args.allow_outside_root),
                    train_config(args), args.out, checkpoint=args.checkpoint, pretrained=not args.random_init,
                    resume=args.resume,
                    progress=not args.quiet)
    print(json.dumps(results, indent=2))
