"""``arcvit params``: trainable parameter counts and memory estimates of a method on a backbone."""
from __future__ import annotations

import argparse
import json

from arcvit.cli import _add_backbone, bounds, command_help


def add_params_parser(sub: argparse._SubParsersAction) -> None:
    from arcvit.methods import METHODS
    p = sub.add_parser("params", help=command_help("params"))
    _add_backbone(p)
    p.add_argument("--method", default="arc", choices=METHODS)
    p.add_argument("--rank", type=bounds.RANK, default=None)
    p.add_argument("--num-classes", type=bounds.NUM_CLASSES, default=100)
    p.add_argument("--batch-size", type=bounds.BATCH_SIZE, default=32)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
    p.set_defaults(func=cmd_params)


def cmd_params(args: argparse.Namespace) -> None:
    from arcvit.methods.describe import describe_backbone
    print(json.dumps(describe_backbone(args.backbone, args.num_classes, args.method, args.rank,
                                       args.batch_size, args.precision), indent=2))
