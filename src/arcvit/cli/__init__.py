"""The ``arcvit`` command line: a thin layer over the library. ``arcvit COMMAND --help`` for each command."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from arcvit.errors import ArcvitError, ConfigError
from arcvit.backends.timm.zoo import DEFAULT_BACKBONE


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one clear line rather than a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_backbone(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                   help=f"timm model name, with optional pretrained tag (default: {DEFAULT_BACKBONE}, "
                        "arcvit's shipped self-pretrained ViT)")
    p.add_argument("--checkpoint", help="local weights for the backbone: .npz (Google ViT), .safetensors, .pth")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (sanity baselines, tests)")


def _add_data(p: argparse.ArgumentParser, split: bool = False) -> None:
    p.add_argument("--data", required=True, help="data root (VTAB-1k NOAH folders, FGVC VPT folders, ImageFolder)")
    p.add_argument("--task", default="", help="task name under the data root, e.g. cifar, dtd, cub (aliases ok)")
    p.add_argument("--layout", default="auto", choices=["auto", "vtab", "fgvc", "folder"])
    p.add_argument("--skip-corrupt", action="store_true", help="drop unreadable images and report them")
    if split:
        p.add_argument("--split", default="test", help="split to evaluate (default: test)")


RECIPE_HELP = ("recipe (TOML/JSON): [defaults], [tasks.<task>], [methods.<method>], [tasks.<task>.methods.<method>], "
               "most specific last; flags beat it")


def _train_flags(p: argparse.ArgumentParser, config_help: str = RECIPE_HELP) -> None:
    """--method, --config and one flag per TrainConfig setting."""
    from arcvit.methods import METHODS
    from arcvit.training.config import TrainConfig
    defaults = TrainConfig()
    p.add_argument("--method", default=defaults.method, choices=METHODS)
    p.add_argument("--config", help=config_help)
    for f in fields(TrainConfig):
        if f.name == "method":
            continue
        flag = "--" + f.name.replace("_", "-")
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            kind = {"rank": int, "adapter_dropout": float}.get(f.name, type(value))
            p.add_argument(flag, type=kind, default=None, help=f"default: {value}")


def _train_config(args: argparse.Namespace):
    """The recipe file's layers for this task and method (``--config``), then every flag given."""
    from arcvit.data.layouts import task_key
    from arcvit.training.config import TrainConfig
    from arcvit.training.recipes import Recipe, load_recipe, train_config
    recipe = load_recipe(args.config) if args.config else Recipe()
    flags = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
             if f.name != "method" and getattr(args, f.name, None) is not None}
    return train_config(recipe, task_key(args.task), args.method, flags)


def cmd_train(args: argparse.Namespace) -> None:
    from arcvit.training.config import DataSpec
    from arcvit.training.loop import train
    results = train(args.backbone, DataSpec(args.data, args.task, args.layout, args.skip_corrupt),
                    _train_config(args), args.out, checkpoint=args.checkpoint, pretrained=not args.random_init,
                    resume=args.resume,
                    progress=not args.quiet)
    print(json.dumps(results, indent=2))


def _adapted_model(args: argparse.Namespace):
    """The backbone with the adapter from ``--adapter`` loaded (or a merged checkpoint from ``--merged``)."""
    import arcvit
    from arcvit.core.adapter_file import read_adapter_config
    from arcvit.backends.timm.create import create_backbone
    if args.merged:
        meta = _merged_meta(args.merged)
        return create_backbone(meta["backbone"], meta["num_classes"], checkpoint=args.merged), meta
    meta = read_adapter_config(args.adapter)
    model = create_backbone(args.backbone, meta["num_classes"], checkpoint=args.checkpoint,
                            pretrained=not args.random_init)
    arcvit.load_adapter(model, args.adapter)
    return model, meta


def _merged_meta(path: str) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"{path}: not a readable safetensors file ({e})") from None
    if "arcvit_merged" not in meta:
        raise ConfigError(f"{path}: not a merged arcvit checkpoint (write one with `arcvit merge`)")
    return json.loads(meta["arcvit_merged"])


def cmd_eval(args: argparse.Namespace) -> None:
    from lightning_fabric import Fabric

    import arcvit
    from arcvit.data.layouts import load_split
    from arcvit.data.transforms import build_transform
    from arcvit.training.loop import evaluate
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    model, meta = _adapted_model(args)
    if args.merge and not args.merged:
        model = arcvit.merge(model)
    dataset = load_split(args.data, args.task, args.split, build_transform(model, recipe=args.recipe, train=False),
                         layout=args.layout, skip_corrupt=args.skip_corrupt)
    if dataset.num_classes != meta["num_classes"]:
        raise ConfigError(f"{dataset.source}: {dataset.num_classes} classes, but the "
                          f"{'merged checkpoint' if args.merged else 'adapter'} has {meta['num_classes']}: "
                          "it was trained on another task")
    fabric = Fabric(accelerator="auto", devices=1)
    top1 = evaluate(fabric, fabric.setup_module(model), dataset, args.batch_size)
    print(json.dumps({"split": args.split, "images": len(dataset), "top1": round(top1, 6)}))


def cmd_merge(args: argparse.Namespace) -> None:
    import torch

    import arcvit
    from arcvit.fileio import write_safetensors
    if Path(args.out).is_dir():
        raise ConfigError(f"{args.out}: is a folder; --out names the merged .safetensors file to write")
    model, meta = _adapted_model(args)
    model.eval()
    merged = arcvit.merge(model, inplace=args.inplace)
    size = merged.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(4, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (merged(x) - model(x)).abs().max().item() if not args.inplace else 0.0
    info = {"backbone": args.backbone, "num_classes": meta["num_classes"],
            "class_names": meta.get("extra", {}).get("class_names"), "source_adapter": str(args.adapter)}
    write_safetensors(args.out, merged.state_dict(), metadata={"arcvit_merged": json.dumps(info)})
    print(json.dumps({"out": args.out, "max_abs_logit_diff": diff, **info}))


def cmd_predict(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image, UnidentifiedImageError

    import arcvit
    from arcvit.data.transforms import build_transform
    model, meta = _adapted_model(args)
    if args.merge and not args.merged:
        model = arcvit.merge(model)
    model.eval()
    transform = build_transform(model, recipe=args.recipe, train=False)
    names = meta.get("class_names") or meta.get("extra", {}).get("class_names")
    for path in args.images:
        try:
            with Image.open(path) as image:
                x = transform(image.convert("RGB")).unsqueeze(0)
        except (OSError, UnidentifiedImageError) as e:
            raise ConfigError(f"{path}: cannot read image ({e})") from None
        with torch.no_grad():
            probs = model(x).softmax(-1)[0]
        label = int(probs.argmax())
        print(json.dumps({"image": path, "label": label, "class": names[label] if names else str(label),
                          "prob": round(probs[label].item(), 4)}))


def cmd_params(args: argparse.Namespace) -> None:
    from arcvit.methods.describe import describe_backbone
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    print(json.dumps(describe_backbone(args.backbone, args.num_classes, args.method, args.rank,
                                       args.batch_size, args.precision), indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from arcvit.bench.demo import run_demo
    run_demo(args.out, epochs=args.epochs, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="arcvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="adapt a backbone to one task (ARC or a baseline)")
    _add_backbone(p)
    _add_data(p)
    _train_flags(p)
    p.add_argument("--out", required=True, help="run folder (settings, metrics, checkpoints, results, adapter)")
    p.add_argument("--resume", action="store_true", help="continue from the newest good checkpoint in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    for name, func, text in (("eval", cmd_eval, "top-1 accuracy of an adapter (or merged checkpoint) on a split"),
                             ("predict", cmd_predict, "label images"),
                             ("merge", cmd_merge, "fold an adapter into the backbone: a plain timm checkpoint")):
        p = sub.add_parser(name, help=text)
        _add_backbone(p)
        source = p.add_mutually_exclusive_group(required=name != "merge")
        source.add_argument("--adapter", help="adapter folder written by `arcvit train` (adapter/)")
        if name != "merge":
            source.add_argument("--merged", help="merged checkpoint written by `arcvit merge`")
            p.add_argument("--merge", action="store_true", help="merge the adapter before running")
            p.add_argument("--recipe", default="timm", choices=["timm", "paper"])
        if name == "eval":
            _add_data(p, split=True)
            p.add_argument("--batch-size", type=int, default=256)
        if name == "predict":
            p.add_argument("images", nargs="+", help="image files")
        if name == "merge":
            p.set_defaults(merged=None)
            p.add_argument("--out", required=True, help="output .safetensors")
            p.add_argument("--inplace", action="store_true", help="merge without a second copy (large models)")
        p.set_defaults(func=func)

    p = sub.add_parser("params", help="trainable parameter counts and memory estimates")
    _add_backbone(p)
    from arcvit.methods import METHODS
    p.add_argument("--method", default="arc", choices=METHODS)
    p.add_argument("--rank", type=int, default=None)
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("demo", help="offline demo: adapt the shipped ViT to real package data sets")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=int, default=None, help="override the demo's epoch count")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    from arcvit.cli.bench import add_bench_commands
    from arcvit.cli.tune import add_tune_command
    add_tune_command(sub)
    add_bench_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ArcvitError as e:
        print(f"arcvit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"arcvit {args.command}: interrupted (a run resumes with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
