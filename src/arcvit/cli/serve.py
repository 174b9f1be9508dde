"""`arcvit serve`: many tasks on one frozen backbone over HTTP (a thin layer over arcvit.serving)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arcvit.errors import ConfigError


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    from arcvit.cli import _add_backbone
    p = sub.add_parser("serve", help="serve every adapter under a folder on one backbone (HTTP API + web page)")
    p.add_argument("--adapters", required=True, help="folder with one adapter folder per task (its name = task)")
    _add_backbone(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token", help="bearer token required to load/unload tasks (PUT/DELETE /v1/tasks/NAME)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one backbone pass")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest accepted upload")
    p.add_argument("--merged", metavar="TASK", help="also keep TASK merged into its own backbone copy: its "
                   "requests run at the plain model's cost (for a task that carries most of the traffic)")
    p.set_defaults(func=cmd_serve)


def _check(args: argparse.Namespace) -> None:
    if not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters}: no such folder")
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be positive, got {args.max_batch}")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0:
        raise ConfigError("--max-wait-ms must be >= 0 and --max-upload-mb > 0")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port}: not a port number")


def cmd_serve(args: argparse.Namespace) -> None:
    from arcvit.backends import create_backbone
    from arcvit.serving import MultiTask, ServeSettings, load_tasks, serve
    _check(args)
    backbone = create_backbone(args.backbone, 0, checkpoint=args.checkpoint, pretrained=not args.random_init)
    model = MultiTask(backbone)
    for error in load_tasks(model, Path(args.adapters)):
        print(f"arcvit serve: warning: {error}", file=sys.stderr)
    if args.merged:
        model.set_merged(args.merged)
    print(f"arcvit serve: {len(model.tasks)} tasks on {args.backbone}: {', '.join(model.tasks) or '(none)'}",
          file=sys.stderr)
    settings = ServeSettings(adapters=Path(args.adapters), token=args.token, max_batch=args.max_batch,
                             max_wait_ms=args.max_wait_ms, max_upload_mb=args.max_upload_mb)
    serve(model, settings, host=args.host, port=args.port)
