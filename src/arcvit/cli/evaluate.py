"""``arcvit eval``: top-1 accuracy of an adapter, a merged checkpoint or a run (merged) on one split."""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from arcvit.cli import _adapted_model, _add_data, _add_model_source, bounds, command_help
from arcvit.cli.hubrefs import pulled
from arcvit.errors import ConfigError, DataWarning


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=command_help("eval"))
    _add_model_source(p)
    _add_data(p, split=True)
    p.add_argument("--batch-size", type=bounds.BATCH_SIZE, default=256)
    p.set_defaults(func=cmd_eval)


def _warn_other_task(meta: dict[str, Any], task: str, data: str) -> None:
    """An adapter records the task it was trained on; evaluating it on another one is worth a line."""
    from arcvit.data.layouts import task_key
    trained = (meta.get("extra") or {}).get("task") or meta.get("task")
    asked = task or Path(data).name
    if trained and task_key(trained) != task_key(asked):
        warnings.warn(f"the adapter was trained on task {trained!r}, evaluated here on {asked!r}", DataWarning)


def cmd_eval(args: argparse.Namespace) -> None:
    from lightning_fabric import Fabric

    import arcvit
    from arcvit.data.layouts import load_split
    from arcvit.data.transforms import build_transform
    from arcvit.training.devices import require_accelerator
    from arcvit.training.loop import evaluate
    require_accelerator(args.accelerator)
    model, meta = _adapted_model(args)
    if args.merge and not args.merged:
        model = arcvit.merge(model)
    dataset = load_split(args.data, args.task, args.split, build_transform(model, recipe=args.recipe, train=False),
                         layout=args.layout, skip_corrupt=args.skip_corrupt,
                         allow_outside_root=args.allow_outside_root)
    if dataset.num_classes != meta["num_classes"]:
        source = "run" if args.run else "merged checkpoint" if args.merged else "adapter"
        raise ConfigError(f"{dataset.source}: {dataset.num_classes} classes, but the {source} has "
                          f"{meta['num_classes']}: it was trained on another task")
    _warn_other_task(meta, args.task, args.data)
    fabric = Fabric(accelerator=args.accelerator, devices=1)
    top1 = evaluate(fabric, fabric.setup_module(model), dataset, args.batch_size)
    print(json.dumps({"split": args.split, "images": len(dataset), "top1": round(top1, 6), **pulled(args)}))
