"""The ``arcvit`` command line: a thin layer over the library. ``arcvit COMMAND --help`` for each command."""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields
from typing import Sequence

from arcvit.backends import DEFAULT_BACKBONE, backbone_name
from arcvit.cli.hubrefs import pulled_sources
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


MAX_JSON_FLAG = 4096  # far above any real ARCConfig table


def _json_table(text: str) -> dict:
    """A flag whose value is a JSON object (``--arc-options '{"channel_scale": true}'``), at most
    ``MAX_JSON_FLAG`` characters (deep nesting would otherwise exhaust the parser's recursion)."""
    import json
    if len(text) > MAX_JSON_FLAG:
        raise argparse.ArgumentTypeError(f"expected a JSON object of at most {MAX_JSON_FLAG} characters, got "
                                         f"{len(text)}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text[:60]!r} ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text[:60]!r}")
    return value


def _setting_help(f) -> str:
    """A TrainConfig field's help, default and range, as its declaration states them."""
    meta, default = f.metadata, f.default
    shown = "the method's own" if default is None else default
    bounds = f"; {meta['bounds'].describe()}" if meta["bounds"] else ""
    return f"{meta['help']} (default: {shown}{bounds})".replace("%", "%%")


def setting_flags(p: argparse.ArgumentParser, names: Sequence[str] | None = None) -> None:
    """One flag per TrainConfig setting (``names``, default all), its type, choices and help from the field's
    declaration; unset flags are None so that a recipe's value stands."""
    from arcvit.training.config import TrainConfig
    for f in fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=_setting_help(f))
            continue
        kind = meta["bounds"].flag() if meta["bounds"] else _json_table if "dict" in str(f.type) else str
        default = f.default if f.name == "method" else None  # the method picks the recipe's [methods.X] tables
        p.add_argument(flag, type=kind, choices=meta["choices"], default=default, help=_setting_help(f))


def _train_flags(p: argparse.ArgumentParser, config_help: str = RECIPE_HELP) -> None:
    """--config and one flag per TrainConfig setting."""
    p.add_argument("--config", help=config_help)
    setting_flags(p)


def check_run_flags(args: argparse.Namespace) -> dict:
    """``--run``'s settings.json; the backbone and how it was made come from it, so a flag that says otherwise is
    refused."""
    from arcvit.training.runmodel import read_run_settings
    settings, _ = read_run_settings(args.run)
    if args.backbone not in (DEFAULT_BACKBONE, settings["backbone"]):
        raise ConfigError(f"--backbone {args.backbone}: {args.run} was trained on {settings['backbone']}; "
                          "drop --backbone")
    if args.random_init and settings.get("pretrained", True):
        raise ConfigError(f"--random-init: {args.run} was trained from pretrained weights; drop --random-init")
    return settings


def _run_merged(args: argparse.Namespace):
    """``--run``: the run's model merged (any mergeable method), and what a merged file records of it."""
    from arcvit.cli.hubrefs import hub_source
    from arcvit.training.runmodel import merged_run
    check_run_flags(args)
    if getattr(args, "merge", False):
        raise ConfigError("--merge: a --run is always merged before it runs; drop --merge")
    model, info = merged_run(args.run, args.checkpoint)
    return model, info | {"source_adapter": hub_source(args, "run")}


def _adapted_model(args: argparse.Namespace):
    """The backbone with the adapter from ``--adapter`` loaded, a merged checkpoint from ``--merged``, or a run
    of any mergeable method from ``--run``, merged."""
    import arcvit
    from arcvit.backends import create_backbone
    from arcvit.backends.merged import load_merged
    from arcvit.core.adapter_file import read_adapter_config
    if getattr(args, "run", None):
        return _run_merged(args)
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


def _add_model_source(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """The model a command runs (eval, predict): --backbone with --adapter, --merged or --run, and how it runs."""
    _add_backbone(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="adapter folder written by `arcvit train` (adapter/)")
    source.add_argument("--merged", help="merged checkpoint written by `arcvit merge`")
    add_run_option(source)
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept a --merged file whose header has no checksum (older arcvit); its fields "
                        "are still checked")
    p.add_argument("--merge", action="store_true", help="merge the adapter before running")
    p.add_argument("--recipe", default="timm", choices=["timm", "paper"])
    p.add_argument("--accelerator", default="auto", choices=["auto", "cpu", "cuda", "gpu", "mps"])
    return source


def add_run_option(source: argparse._MutuallyExclusiveGroup) -> None:
    source.add_argument("--run", help="run folder of any mergeable method, written by `arcvit train` (its "
                                      "backbone, settings and trained weights): merged, then run as --merged")


COMMANDS = {  # command -> (module under arcvit.cli, the function there that adds its parser, its line in --help)
    "train": ("train", "add_train_parser", "adapt a backbone to one task (ARC or a baseline)"),
    "eval": ("evaluate", "add_eval_parser", "top-1 accuracy of an adapter (or merged checkpoint) on a split"),
    "predict": ("predict", "add_predict_parser", "label images"),
    "merge": ("merge", "add_merge_parser", "fold an adapter (or a run of any mergeable method) into the backbone: a "
                                           "plain timm checkpoint"),
    "params": ("params", "add_params_parser", "trainable parameter counts and memory estimates"),
    "demo": ("demo", "add_demo_parser", "offline demo: adapt the shipped ViT to real package data sets"),
    "tune": ("tune", "add_tune_command", "search a method's settings for a task on its validation split (Optuna)"),
    "bench": ("bench", "add_bench_parser", "benchmark methods over a suite of tasks and seeds, with a VTAB-style "
                                           "report"),
    "report": ("bench", "add_report_parser", "rebuild a bench's table, CSV/JSON and plot from its run folders"),
    "serve": ("serve", "add_serve_parser", "serve every adapter under a folder on one backbone (HTTP API + web page)"),
    "data": ("data", "add_data_commands", "prepare and verify VTAB-1k / FGVC data roots (MANIFEST.json)"),
    "export": ("export", "add_export_parser", "the merged model, or many tasks in one graph, as a checked ONNX file"),
    "push": ("push", "add_push_parser", "upload an adapter, run, merged file or ONNX file to the Hugging Face Hub"),
}


def command_help(command: str) -> str:
    """The command's line in ``arcvit --help``, for the module that adds its parser."""
    return COMMANDS[command][2]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; with ``only``, that command's alone and just a help line for each other one, so a
    command's options (and all they import: torch, timm, ...) are built only when it runs (``""``: none)."""
    from importlib import import_module
    parser = _Parser(prog="arcvit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command, (module, add, text) in COMMANDS.items():
        if only is None or only == command:
            getattr(import_module(f"arcvit.cli.{module}"), add)(sub)
        else:
            sub.add_parser(command, help=text)
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
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(only=argv[0] if argv and argv[0] in COMMANDS else "")
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
