"""``arcvit bench`` and ``arcvit report``: the command-line side of arcvit.bench."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arcvit.backends.timm.zoo import DEFAULT_BACKBONE
from arcvit.bench.report import SUITES, build_report, collect_runs
from arcvit.bench.runner import SUITE_RUNS, run_bench
from arcvit.errors import ArcvitError
from arcvit.methods import METHODS


def cmd_bench(args: argparse.Namespace) -> None:
    overrides = {k: getattr(args, k) for k in ("epochs", "protocol", "devices", "precision", "accelerator")
                 if getattr(args, k) is not None}
    try:
        out = run_bench(args.suite, args.out or f"runs/bench_{args.suite}", data=args.data, tasks=args.tasks,
                        methods=args.methods, seeds=args.seeds, backbone=args.backbone, checkpoint=args.checkpoint,
                        config=args.config, overrides=overrides, progress=not args.quiet, tune=args.tune,
                        search_space=args.search_space, allow_outside_root=args.allow_outside_root)
    except KeyboardInterrupt:
        print("arcvit bench: interrupted; run the same command again to resume (finished runs are kept)",
              file=sys.stderr)
        raise SystemExit(130) from None
    failed = sum(r["status"] == "failed" for r in collect_runs(out))
    if failed:  # a non-zero exit, so that scripts notice; the next bench retries them
        raise ArcvitError(f"{failed} run(s) failed: see {out / 'report.md'}")


def cmd_report(args: argparse.Namespace) -> None:
    build_report(args.dir, args.suite)
    for name in ("report.md", "results.csv", "results.json", "accuracy_vs_params.png"):
        if (Path(args.dir) / name).exists():
            print(Path(args.dir) / name)


def add_bench_commands(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` and ``report`` subcommands (``sub`` makes arcvit's own parsers)."""
    p = sub.add_parser("bench", help="benchmark methods over a suite of tasks and seeds, with a VTAB-style report",
                       description=__doc__)
    p.add_argument("--suite", required=True, choices=SUITE_RUNS,
                   help="mini: offline, built under OUT/data (or --data); vtab1k: 19 NOAH folders; fgvc: 5 VPT folders")
    p.add_argument("--data", help="data root holding the task folders (required for vtab1k and fgvc)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="let list files name images outside --data (absolute paths, '..', symlinks out)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="a subset of the suite's tasks (default: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   help=f"default: all of {', '.join(METHODS)}; METHOD@RANK runs a method at a fixed rank as its "
                        "own row and joins its method's line in the plot (matched-parameter points: arc@4 lora@1)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="SEED", help="e.g. 0 1 2 (default: 0)")
    p.add_argument("--out", help="results folder (default: runs/bench_<suite>)")
    p.add_argument("--backbone", help="timm model name or transformers:ORG/NAME "
                                      f"(default: {DEFAULT_BACKBONE} for mini, "
                                      f"{SUITE_RUNS['vtab1k'].backbone} otherwise)")
    p.add_argument("--checkpoint", help="local weights for the backbone: .npz (Google ViT), .safetensors, .pth")
    p.add_argument("--config", help="suite recipe (TOML): [defaults], [methods.M], [tasks.T], [tasks.T.methods.M] "
                                    "TrainConfig settings, most specific last (default: configs/<suite>.toml)")
    p.add_argument("--tune", type=int, metavar="N", help="first tune every (task, method) with the same N trials "
                                                         "of `arcvit tune` on validation, then run the tuned settings")
    p.add_argument("--search-space", metavar="FILE", help="with --tune: search space over the packaged one")
    p.add_argument("--epochs", type=int, help="override the schedule's length, keeping its warm-up fraction")
    p.add_argument("--protocol", choices=["final", "select"],
                   help="final: train on train+val, test after the last epoch; select: pick the epoch on val")
    p.add_argument("--devices", type=int)
    p.add_argument("--precision", help="e.g. 32-true, bf16-mixed")
    p.add_argument("--accelerator", help="auto, cpu, cuda, ...")
    p.add_argument("--quiet", action="store_true", help="no progress bars (one line per run is still printed)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="rebuild a bench's table, CSV/JSON and plot from its run folders")
    p.add_argument("dir", help="a bench results folder (the --out of `arcvit bench`)")
    p.add_argument("--suite", choices=SUITES, help="default: the bench's own, from its bench.json")
    p.set_defaults(func=cmd_report)
