"""``arcvit demo``: the offline demo, the shipped ViT adapted to real package data sets."""
from __future__ import annotations

import argparse

from arcvit.cli import bounds, command_help


def add_demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=command_help("demo"))
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=bounds.EPOCHS, default=None, help="override the demo's epoch count")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> None:
    from arcvit.bench.demo import run_demo
    run_demo(args.out, epochs=args.epochs, progress=not args.quiet)
