"""The ``arcvit`` command line: a thin layer over the library. ``arcvit COMMAND --help`` for each command."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence

from arcvit.backends import backbone_name
from arcvit.backends.timm.zoo import DEFAULT_BACKBONE
from arcvit.cli.hubrefs import hub_source, pulled, pulled_sources
from arcvit.errors import ArcvitError, ConfigError, DataWarning


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag ends in one clear line rather than a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_backbone(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", type=backbone_name, default=DEFAULT_BACKBONE,
                   help=f"timm model name, with optional pretrained tag (default: {DEFAULT_BACKBONE}, "
                        "arcvit's shipped self-pretrained ViT), or transformers:ORG/NAME (a Hugging Face hub id "
                        "or a local save_pretrained folder)")
    p.add_argument("--checkpoint", help="local weights for the backbone: .npz (Google ViT), .safetensors, .pth")
    p.add_argument("--random-init", action="store_true", help="no pretrained weights (sanity baselines, tests)")


def _add_data(p: argparse.ArgumentParser, split: bool = False) -> None:
    p.add_argument("--data", required=True, help="data root (VTAB-1k NOAH folders, FGVC VPT folders, ImageFolder)")
    p.add_argument("--task", default="", help="task name under the data root, e.g. cifar, dtd, cub (aliases ok)")
    p.add_argument("--layout", default="auto", choices=["auto", "vtab", "fgvc", "folder"])
    p.add_argument("--skip-corrupt", action="store_true", help="drop unreadable images and report them")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="let list files name images outside --data (absolute paths, '..', symlinks out)")
    if split:
        p.add_argument("--split", default="test", help="split to evaluate (default: test)")


RECIPE_HELP = ("recipe (TOML/JSON): [defaults], [tasks.<task>], [methods.<method>], [tasks.<task>.methods.<method>], "
               "most specific last; flags beat it")


def _train_flags(p: argparse.ArgumentParser, config_help: str = RECIPE_HELP) -> None:
    """--method, --config and one flag per TrainConfig setting."""
    from arcvit.cli.bounds import TRAIN_NUMBERS
    from arcvit.methods import METHODS
    from arcvit.training.config import ARC_IMPLS, TrainConfig
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
            kind = TRAIN_NUMBERS.get(f.name, str)  # every other setting is a string
            choices = ARC_IMPLS if f.name == "arc_impl" else None
            default = value if value is not None else "the method's own"
            p.add_argument(flag, type=kind, choices=choices, default=None, help=f"default: {default}")


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
    results = train(args.backbone, DataSpec(args.data, args.task, args.layout, args.skip_corrupt,
                                            args.allow_outside_root),
                    _train_config(args), args.out, checkpoint=args.checkpoint, pretrained=not args.random_init,
                    resume=args.resume,
                    progress=not args.quiet)
    print(json.dumps(results, indent=2))


def _adapted_model(args: argparse.Namespace):
    """The backbone with the adapter from ``--adapter`` loaded (or a merged checkpoint from ``--merged``)."""
    import arcvit
    from arcvit.backends import create_backbone
    from arcvit.backends.merged import load_merged
    from arcvit.core.adapter_file import read_adapter_config
    if args.merged:
        if args.checkpoint:  # the merged file holds every weight: a second source would be silently ignored
            raise ConfigError(f"--checkpoint {args.checkpoint}: not read with --merged (the merged file holds every "
                              "weight); drop one of them")
        model, info = load_merged(args.merged, allow_unverified=getattr(args, "allow_unverified", False))
        if args.backbone not in (DEFAULT_BACKBONE, info["backbone"]):
            raise ConfigError(f"--backbone {args.backbone}: {args.merged} was merged on {info['backbone']} and "
                              "builds that; drop --backbone")
        return model, info
    meta = read_adapter_config(args.adapter)
    model = create_backbone(args.backbone, meta["num_classes"], checkpoint=args.checkpoint,
                            pretrained=not args.random_init)
    arcvit.load_adapter(model, args.adapter)
    return model, meta


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
        raise ConfigError(f"{dataset.source}: {dataset.num_classes} classes, but the "
                          f"{'merged checkpoint' if args.merged else 'adapter'} has {meta['num_classes']}: "
                          "it was trained on another task")
    _warn_other_task(meta, args.task, args.data)
    fabric = Fabric(accelerator=args.accelerator, devices=1)
    top1 = evaluate(fabric, fabric.setup_module(model), dataset, args.batch_size)
    print(json.dumps({"split": args.split, "images": len(dataset), "top1": round(top1, 6), **pulled(args)}))


def _check_merge_out(out: Path, args: argparse.Namespace) -> None:
    """``--out`` is a new file, or an existing one with ``--force``; never a file that merge reads."""
    if out.is_dir():
        raise ConfigError(f"{out}: is a folder; --out names the merged .safetensors file to write")
    if not out.exists():
        return
    from arcvit.training.runmodel import run_inputs
    reads = run_inputs(args.run) if args.run else Path(args.adapter).glob("*")
    inputs = [*reads, *([Path(args.checkpoint)] if args.checkpoint else [])]
    if any(p.exists() and os.path.samefile(out, p) for p in inputs):
        raise ConfigError(f"{out}: is a file merge reads (in {'--run' if args.run else '--adapter'}, or "
                          "--checkpoint); it is never overwritten, even with --force: choose another --out")
    if not args.force:
        raise ConfigError(f"{out}: exists; pass --force to overwrite it")


def _run_model(args: argparse.Namespace):
    """``--run``: the run's trained model and method, and what the merged file records; the backbone and how it
    was made come from the run's settings.json, so a flag that says otherwise is refused."""
    from arcvit.training.runmodel import load_run, read_run_settings
    settings, _ = read_run_settings(args.run)
    if args.backbone not in (DEFAULT_BACKBONE, settings["backbone"]):
        raise ConfigError(f"--backbone {args.backbone}: {args.run} was trained on {settings['backbone']}; "
                          "drop --backbone")
    if args.random_init and settings.get("pretrained", True):
        raise ConfigError(f"--random-init: {args.run} was trained from pretrained weights; drop --random-init")
    if args.inplace:
        raise ConfigError("--inplace: only with --adapter (a run's model is merged into a copy)")
    model, method, info = load_run(args.run, args.checkpoint)
    return model, method, info | {"source_adapter": hub_source(args, "run")}


def cmd_merge(args: argparse.Namespace) -> None:
    import torch

    import arcvit
    from arcvit.core.merged_file import write_merged
    from arcvit.methods import merge_for_inference
    from arcvit.training.finite import require_finite
    _check_merge_out(Path(args.out), args)
    if args.run:
        model, method, info = _run_model(args)
        merged = merge_for_inference(model, method).eval()
    else:
        model, meta = _adapted_model(args)
        model.eval()
        merged = arcvit.merge(model, inplace=args.inplace)
        info = {"backbone": args.backbone, "num_classes": meta["num_classes"],
                "class_names": meta.get("extra", {}).get("class_names"), "task": meta.get("extra", {}).get("task"),
                "source_adapter": hub_source(args, "adapter")}
    size = merged.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(4, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probe = {"merged": merged(x)} | ({} if args.inplace else {"adapted": model(x)})
    for which, logits in probe.items():  # else the file is written and the check prints NaN (invalid JSON)
        require_finite(logits, f"{args.out}: not written: the {which} model on a random probe batch")
    diff = (probe["merged"] - probe["adapted"]).abs().max().item() if not args.inplace else 0.0
    write_merged(args.out, merged.state_dict(), info)
    print(json.dumps({"out": args.out, "max_abs_logit_diff": diff, **info}))


def cmd_predict(args: argparse.Namespace) -> None:
    if args.onnx:
        from arcvit.cli.export import predict_onnx
        return predict_onnx(args)
    import torch

    import arcvit
    from arcvit.data.images import open_rgb
    from arcvit.data.transforms import build_transform
    from arcvit.training.devices import torch_device
    from arcvit.training.finite import require_finite
    device = torch_device(args.accelerator)
    model, meta = _adapted_model(args)
    if args.merge and not args.merged:
        model = arcvit.merge(model)
    model.eval().to(device)
    transform = build_transform(model, recipe=args.recipe, train=False)
    names = meta.get("class_names") or meta.get("extra", {}).get("class_names")
    for path in args.images:
        x = transform(open_rgb(path)).unsqueeze(0).to(device)
        with torch.no_grad():
            logits = model(x).float()
        require_finite(logits, path)
        probs = logits[0].softmax(-1)
        label = int(probs.argmax())
        print(json.dumps({"image": path, "label": label, "class": names[label] if names else str(label),
                          "prob": round(probs[label].item(), 4), **pulled(args)}))


def cmd_params(args: argparse.Namespace) -> None:
    from arcvit.methods.describe import describe_backbone
    print(json.dumps(describe_backbone(args.backbone, args.num_classes, args.method, args.rank,
                                       args.batch_size, args.precision), indent=2))


def cmd_demo(args: argparse.Namespace) -> None:
    from arcvit.bench.demo import run_demo
    run_demo(args.out, epochs=args.epochs, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    from arcvit.cli import bounds
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
                             ("merge", cmd_merge, "fold an adapter (or a run of any mergeable method) into the "
                                                  "backbone: a plain timm checkpoint")):
        p = sub.add_parser(name, help=text)
        _add_backbone(p)
        source = p.add_mutually_exclusive_group(required=True)
        source.add_argument("--adapter", help="adapter folder written by `arcvit train` (adapter/)")
        if name != "merge":
            source.add_argument("--merged", help="merged checkpoint written by `arcvit merge`")
            p.add_argument("--allow-unverified", action="store_true",
                           help="accept a --merged file whose header has no checksum (older arcvit); its fields "
                                "are still checked")
            p.add_argument("--merge", action="store_true", help="merge the adapter before running")
            p.add_argument("--recipe", default="timm", choices=["timm", "paper"])
            p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "gpu", "mps"])
        if name == "eval":
            _add_data(p, split=True)
            p.add_argument("--batch-size", type=bounds.BATCH_SIZE, default=256)
        if name == "predict":
            p.add_argument("images", nargs="+", help="image files")
            source.add_argument("--onnx", help="ONNX file written by `arcvit export`, run by ONNX Runtime")
        if name == "merge":
            p.set_defaults(merged=None, allow_unverified=False)
            source.add_argument("--run", help="run folder of any mergeable method, written by `arcvit train` "
                                              "(its backbone, settings and trained weights)")
            p.add_argument("--out", required=True, help="output .safetensors")
            p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
            p.add_argument("--inplace", action="store_true", help="merge without a second copy (large models)")
        p.set_defaults(func=func)

    p = sub.add_parser("params", help="trainable parameter counts and memory estimates")
    _add_backbone(p)
    from arcvit.methods import METHODS
    p.add_argument("--method", default="arc", choices=METHODS)
    p.add_argument("--rank", type=bounds.RANK, default=None)
    p.add_argument("--num-classes", type=bounds.NUM_CLASSES, default=100)
    p.add_argument("--batch-size", type=bounds.BATCH_SIZE, default=32)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed", "bf16-true"])
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("demo", help="offline demo: adapt the shipped ViT to real package data sets")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--epochs", type=bounds.EPOCHS, default=None, help="override the demo's epoch count")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    from arcvit.cli.bench import add_bench_commands
    from arcvit.cli.tune import add_tune_command
    add_tune_command(sub)
    add_bench_commands(sub)
    from arcvit.cli.serve import add_serve_parser
    add_serve_parser(sub)
    from arcvit.cli.data import add_data_commands
    add_data_commands(sub)
    from arcvit.cli.export import add_export_parser
    add_export_parser(sub)
    from arcvit.cli.push import add_push_parser
    add_push_parser(sub)
    return parser


def _check_out(args: argparse.Namespace) -> None:
    if getattr(args, "out", None) is not None and not str(args.out).strip():
        raise ConfigError("--out is empty; name the file or folder to write")


def _show_warning(command: str):
    """``warnings.showwarning`` for the CLI: arcvit's data warnings as one line each on stderr."""
    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, DataWarning):
            print(f"arcvit {command}: warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", DataWarning)
            warnings.showwarning = _show_warning(args.command)
            _check_out(args)
            with pulled_sources(args):
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
