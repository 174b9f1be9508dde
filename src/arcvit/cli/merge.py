"""``arcvit merge``: fold an adapter, or a run of any mergeable method, into the backbone: a plain checkpoint."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from arcvit.cli import _adapted_model, _add_backbone, check_run_flags, command_help
from arcvit.cli.hubrefs import hub_source
from arcvit.errors import ConfigError


def add_merge_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help=command_help("merge"))
    _add_backbone(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--adapter", help="adapter folder written by `arcvit train` (adapter/)")
    p.set_defaults(merged=None, allow_unverified=False)
    source.add_argument("--run", help="run folder of any mergeable method, written by `arcvit train` "
                                      "(its backbone, settings and trained weights)")
    p.add_argument("--out", required=True, help="output .safetensors")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--inplace", action="store_true", help="merge without a second copy (large models)")
    p.set_defaults(func=cmd_merge)


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
    """``--run``: the run's trained model and method, and what the merged file records."""
    from arcvit.training.runmodel import load_run
    check_run_flags(args)
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
