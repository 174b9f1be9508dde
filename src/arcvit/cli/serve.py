"""`arcvit serve`: many tasks on one frozen backbone over HTTP (a thin layer over arcvit.serving)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arcvit.errors import ConfigError


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from arcvit.cli import _add_backbone, command_help
    p = sub.add_parser("serve", help=command_help("serve"))
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapters", action="append", metavar="FOLDER_OR_TASK",
                        help="folder with one adapter folder per task (its name = task), or NAME=hf-hub:ORG/NAME"
                             "[@REVISION]: task NAME from a Hub repo (repeat for more; at most one folder)")
    source.add_argument("--onnx", metavar="FILE", help="an ONNX file written by `arcvit export`, run by ONNX Runtime "
                        "(its tasks are fixed: PUT/DELETE answer 409)")
    source.add_argument("--run", help="run folder of any mergeable method, written by `arcvit train`: merged, "
                                      "served as its one task (named as the run's task; PUT/DELETE answer 409)")
    _add_backbone(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", default="8000", help="0 to 65535 (default 8000)")
    p.add_argument("--token", help="bearer token required to load/unload tasks (PUT/DELETE /v1/tasks/NAME): "
                   "printable ASCII, no spaces")
    p.add_argument("--allowed-hosts", metavar="NAMES", help="comma-separated Host header names that may "
                   "load/unload tasks (default: the --host address and this machine's loopback names)")
    p.add_argument("--max-batch", default="32", help="most images in one backbone pass (1 to 4096)")
    p.add_argument("--max-wait-ms", default="5", help="how long a request waits for others to batch (0 to 10000)")
    p.add_argument("--max-upload-mb", default="10", help="largest accepted upload (0.01 to 1024)")
    p.add_argument("--decode-workers", default="2", help="uploads decoded at once (1 to 64; each needs up to "
                   "the per-request memory bound, README 'Serving')")
    p.add_argument("--merged", metavar="TASK", help="also keep TASK merged into its own backbone copy: its "
                   "requests run at the plain model's cost (for a task that carries most of the traffic)")
    p.set_defaults(func=cmd_serve)


def _check(args: argparse.Namespace) -> None:
    """Every option parsed by its kind's validator (ASCII digits within bounds), in place."""
    from arcvit.serving import options
    _adapter_entries(args)
    if args.adapters and not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters}: no such folder")
    if (args.onnx or args.run) and args.merged:
        raise ConfigError("--merged TASK applies to --adapters; an ONNX file or a --run is already one graph")
    args.port = options.whole_number(args.port, "--port", 0, 65535)
    args.max_batch = options.whole_number(args.max_batch, "--max-batch", 1, 4096)
    args.decode_workers = options.whole_number(args.decode_workers, "--decode-workers", 1, 64)
    args.max_wait_ms = options.decimal_number(args.max_wait_ms, "--max-wait-ms", 0, 10_000)
    args.max_upload_mb = options.decimal_number(args.max_upload_mb, "--max-upload-mb", 0.01, 1024)
    args.token = options.token(args.token)
    args.allowed_hosts = options.hosts(args.allowed_hosts) if args.allowed_hosts is not None else \
        options.default_hosts(args.host, args.token)


def _adapter_entries(args: argparse.Namespace) -> None:
    """--adapters entries split, in place: the one folder (PUT loads tasks by name from it) and the Hub tasks."""
    from arcvit.hub.refs import is_hub_ref
    from arcvit.serving.tasks import check_task_name
    entries = [(e, *e.partition("=")) for e in args.adapters or []]
    args.hub_tasks = {check_task_name(name): ref for _, name, _, ref in entries if is_hub_ref(ref)}
    folders = [entry for entry, _, _, ref in entries if not is_hub_ref(ref)]
    if len(folders) > 1:
        raise ConfigError(f"--adapters: {len(folders)} folders ({', '.join(folders)}); give one folder, and Hub "
                          "tasks as NAME=hf-hub:ORG/NAME")
    args.adapters = folders[0] if folders else None


def _hub_tasks(model, tasks: dict[str, str]) -> None:
    """Add each Hub task (an error ends the command: the task was asked for by name)."""
    from arcvit.serving.hub_tasks import add_from_hub
    for name, reference in tasks.items():
        _, pinned = add_from_hub(model, name, reference)
        print(f"arcvit serve: task {name} from {pinned}", file=sys.stderr)


def _multitask(args: argparse.Namespace):
    from arcvit.backends import create_backbone
    from arcvit.serving import MultiTask, load_tasks
    backbone = create_backbone(args.backbone, 0, checkpoint=args.checkpoint, pretrained=not args.random_init)
    model = MultiTask(backbone)
    for error in load_tasks(model, Path(args.adapters)) if args.adapters else ():
        print(f"arcvit serve: warning: {error}", file=sys.stderr)
    _hub_tasks(model, args.hub_tasks)
    if args.merged:
        model.set_merged(args.merged)
    print(f"arcvit serve: {len(model.tasks)} tasks on {args.backbone}: {', '.join(model.tasks) or '(none)'}",
          file=sys.stderr)
    return model


def _onnx_model(path: str):
    from arcvit.serving.onnx_model import OnnxTasks
    model = OnnxTasks(path)
    print(f"arcvit serve: {len(model.tasks)} tasks in {path} (ONNX Runtime): {', '.join(model.tasks)}",
          file=sys.stderr)
    return model


def _run_task(args: argparse.Namespace):
    """``--run``: the run's model merged, served as the run's task."""
    from arcvit.cli import _run_merged
    from arcvit.methods import method_spec
    from arcvit.serving.plain import PlainTask
    from arcvit.serving.tasks import TaskInfo, check_task_name
    from arcvit.training.runmodel import read_run_settings
    model, info = _run_merged(args)
    classes = info["num_classes"]
    names = info["class_names"] if len(info["class_names"] or ()) == classes else [str(i) for i in range(classes)]
    rank = (read_run_settings(args.run)[1].rank or method_spec(info["method"]).default_rank) or 0
    task = TaskInfo(check_task_name(str(info["task"])), classes, tuple(map(str, names)), info["method"], rank,
                    info["backbone"], Path(args.run))
    print(f"arcvit serve: task {task.name} ({task.method}, merged) from {args.run}", file=sys.stderr)
    return PlainTask(model, task)


def cmd_serve(args: argparse.Namespace) -> None:
    from arcvit.serving import ServeSettings, serve
    _check(args)
    model = _onnx_model(args.onnx) if args.onnx else _run_task(args) if args.run else _multitask(args)
    settings = ServeSettings(adapters=Path(args.adapters) if args.adapters else None, token=args.token,
                             max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb,
                             allowed_hosts=args.allowed_hosts, decode_workers=args.decode_workers)
    serve(model, settings, host=args.host, port=args.port)
