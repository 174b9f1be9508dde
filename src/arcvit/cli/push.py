"""``arcvit push``: an adapter, a mergeable run, a merged file or an ONNX file to a Hugging Face Hub repo, with a
generated model card (a thin layer over arcvit.hub)."""
from __future__ import annotations

import argparse
import json

from arcvit.cli import command_help


def add_push_parser(sub: argparse._SubParsersAction) -> None:
    """The ``push`` subcommand (``sub`` makes arcvit's own parsers)."""
    p = sub.add_parser("push", help=command_help("push"),
                       description="Upload with huggingface_hub (token: HF_TOKEN or `hf auth login`; endpoint: "
                                   "HF_ENDPOINT): the files (safetensors, JSON, ONNX; never a checkpoint or a "
                                   "pickle), arcvit.json (every file's SHA-256) and a model card whose numbers "
                                   "come from those files. Read it back anywhere a file is read: "
                                   "hf-hub:ORG/NAME[@REVISION].")
    p.add_argument("source", metavar="RUN_OR_ADAPTER",
                   help="adapter folder, run folder (a mergeable method's), merged .safetensors or .onnx file")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="the Hub model repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its "
                                                          "visibility)")
    p.add_argument("--revision", metavar="BRANCH", help="commit to this branch (created from main if missing)")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> None:
    """Push and print one JSON line: the pinned ``hf-hub:`` reference to read it back by, and what was sent."""
    from arcvit.hub.push import push
    pushed = push(args.source, args.repo, private=args.private, revision=args.revision)
    print(json.dumps({"pushed": str(pushed.ref), "kind": pushed.kind, "commit_url": pushed.url,
                      "files": pushed.files}))
