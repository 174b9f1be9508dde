"""``arcvit data prepare`` and ``arcvit data verify``: the command-line side of arcvit.data.prepare/manifest."""
from __future__ import annotations

import argparse
import json
import sys

from arcvit.cli import command_help
from arcvit.cli.bounds import GIGABYTES, MEGABYTES
from arcvit.errors import ConfigError, DataError

SUITES = ("vtab1k", "fgvc")


def _log(args: argparse.Namespace):
    if args.quiet:
        return lambda line: None
    return lambda line: print(f"arcvit data: {line}", file=sys.stderr)


def _source(values: list[str]) -> tuple[str, str | None]:
    """``--source hub`` or ``--source archive PATH``."""
    kind, rest = values[0], values[1:]
    if kind == "archive" and len(rest) == 1:
        return kind, rest[0]
    if kind in ("hub", "tfds") and not rest:
        return kind, None
    raise ConfigError(f"--source {' '.join(values)}: use `--source hub`, `--source tfds` or `--source archive PATH` "
                      "(a zip, tar or folder)")


def cmd_prepare(args: argparse.Namespace) -> None:
    from arcvit.data.prepare import prepare
    source, path = _source(args.source)
    summary = prepare(args.suite, args.out, source, path=path, tasks=args.tasks, repo=args.repo,
                      revision=args.revision, files=args.files, cache_dir=args.cache_dir, force=args.force,
                      check_sizes=not args.any_size, max_member_bytes=int(args.max_member_mb * 2**20),
                      max_total_bytes=int(args.max_total_gb * 2**30),
                      image_format=args.format,
                      quiet=args.quiet, log=_log(args))
    print(json.dumps(summary, indent=2))


def _suite_of(root: str, suite: str | None) -> str:
    """``--suite``, or the one suite the root's manifest records."""
    from arcvit.data.manifest import read_manifest, require_root
    if suite:
        return suite
    recorded = {e.get("suite") for e in read_manifest(require_root(root))["tasks"].values()}
    if len(recorded) == 1 and recorded <= set(SUITES):
        return recorded.pop()
    raise ConfigError(f"{root}: pass --suite ({' or '.join(SUITES)}); the root's manifest does not say")


def cmd_verify(args: argparse.Namespace) -> None:
    from arcvit.data.manifest import MANIFEST, verify_root
    suite = _suite_of(args.root, args.suite)
    log = _log(args)
    problems, entries = verify_root(args.root, suite, args.tasks, check_sizes=not args.any_size,
                                    force=args.force, progress=lambda task: log(f"verifying {task}"))
    for line in problems:
        print(f"arcvit data: error: {line}", file=sys.stderr)
    if problems:
        raise DataError(f"{args.root}: {len(problems)} problem(s); {MANIFEST} left as it was")
    print(json.dumps({"root": args.root, "suite": suite, "tasks": {t: e["digest"] for t, e in entries.items()}},
                     indent=2))


def add_data_commands(sub: argparse._SubParsersAction) -> None:
    """The ``data`` command group (``sub`` makes arcvit's own parsers)."""
    group = sub.add_parser("data", help=command_help("data"))
    cmds = group.add_subparsers(dest="data_command", required=True, parser_class=type(group),
                                metavar="{prepare,verify}")

    p = cmds.add_parser("prepare", help="download or unpack a suite's tasks; each is verified, then placed")
    p.add_argument("suite", choices=SUITES)
    p.add_argument("--out", required=True, metavar="ROOT", help="data root to write the task folders into")
    p.add_argument("--source", nargs="+", default=["hub"], metavar="SOURCE",
                   help="hub (default: the public archives on the Hugging Face Hub), archive PATH (a zip, tar "
                        "or folder you have) or tfds (VTAB-1k tasks built from TensorFlow Datasets: arcvit[tfds])")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="a subset of the suite's tasks (default: all)")
    p.add_argument("--repo", help="hub: dataset repo id (default: XiN0919/VTAB-1k or XiN0919/FGVC)")
    p.add_argument("--revision", default="main", help="hub: branch, tag or commit (default: main)")
    p.add_argument("--files", nargs="+", metavar="FILE", help="hub: the repo's archives (vtab1k: vtab-1k.zip)")
    p.add_argument("--cache-dir", help="hub: huggingface_hub cache folder; tfds: its data_dir (default: their own)")
    p.add_argument("--format", default="png", choices=["png", "jpeg"],
                   help="tfds: image files written (png: lossless; jpeg: as NOAH's lossy export)")
    p.add_argument("--force", action="store_true", help="replace task folders that exist already")
    p.add_argument("--any-size", action="store_true", help="accept split sizes other than the public release's")
    p.add_argument("--max-member-mb", type=MEGABYTES, default=4096, help="refuse an archive member larger than this")
    p.add_argument("--max-total-gb", type=GIGABYTES, default=64,
                   help="stop, and write nothing, once prepare would write more than this in all (nested archives "
                        "counted; default 64: VTAB-1k needs a few GB, FGVC about 30)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_prepare)

    p = cmds.add_parser("verify", help="check every task folder, image and split; write or compare MANIFEST.json")
    p.add_argument("root", help="data root holding the task folders")
    p.add_argument("--suite", choices=SUITES, help="default: the suite the root's MANIFEST.json records")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="a subset of the suite's tasks (default: all)")
    p.add_argument("--any-size", action="store_true", help="accept split sizes other than the public release's")
    p.add_argument("--force", action="store_true", help="record the tasks' content anew, even where it differs "
                                                        "from MANIFEST.json")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_verify)
