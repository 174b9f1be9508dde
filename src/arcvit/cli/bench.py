"""``arcvit bench`` and ``arcvit report``: the command-line side of arcvit.bench."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from arcvit.backends import DEFAULT_BACKBONE, backbone_name
from arcvit.bench.report import SUITES, build_report, collect_runs
from arcvit.bench.runner import SUITE_RUNS, run_bench
from arcvit.cli import bounds, command_help, setting_flags
from arcvit.errors import ArcvitError
from arcvit.methods import METHODS
from arcvit.training.storage_url import storage_flag

if TYPE_CHECKING:
    from arcvit.bench.ray_executor import RayExecutor

LOCAL_RAY = "local"  # --ray alone


def add_ray_flags(p: argparse.ArgumentParser, what: str) -> None:
    """--ray and the resources of one Ray task (ray itself is imported only when --ray is given)."""
    p.add_argument("--ray", nargs="?", const=LOCAL_RAY, metavar="ADDRESS",
                   help=f"{what} is a Ray task: alone, on a local Ray cluster started here; 'auto' or HOST:PORT "
                        "joins a running cluster (pip install 'arcvit[ray]')")
    p.add_argument("--cpus-per-run", type=bounds.CPUS, default=1, metavar="N", help="with --ray (default: 1)")
    p.add_argument("--gpus-per-run", type=bounds.GPUS, metavar="N", help="with --ray (default: 1 where the cluster has GPUs)")
    p.add_argument("--max-retries", type=bounds.RETRIES, default=2, metavar="N",
                   help="with --ray: runs again a run whose worker or node died (default: 2)")


def ray_executor(args: argparse.Namespace) -> RayExecutor | None:
    """The Ray executor the flags ask for; None without --ray."""
    if args.ray is None:
        return None
    from arcvit.bench.ray_executor import RayExecutor
    return RayExecutor(None if args.ray == LOCAL_RAY else args.ray, cpus_per_run=args.cpus_per_run,
                       gpus_per_run=args.gpus_per_run, max_retries=args.max_retries,
                       shared=getattr(args, "shared_out", False))


def cmd_bench(args: argparse.Namespace) -> None:
    overrides = {k: getattr(args, k) for k in ("epochs", "protocol", "devices", "precision", "accelerator", "targets")
                 if getattr(args, k) is not None}
    try:
        out = run_bench(args.suite, args.out or f"runs/bench_{args.suite}", data=args.data, tasks=args.tasks,
                        methods=args.methods, seeds=args.seeds, backbone=args.backbone, checkpoint=args.checkpoint,
                        config=args.config, overrides=overrides, progress=not args.quiet, tune=args.tune,
                        search_space=args.search_space, allow_outside_root=args.allow_outside_root,
                        executor=ray_executor(args), storage=args.storage,
                        allow_mixed_data=args.allow_mixed_data)
    except KeyboardInterrupt:
        print("arcvit bench: interrupted; run the same command again to resume (finished runs are kept)",
              file=sys.stderr)
        raise SystemExit(130) from None
    failed = sum(r["status"] == "failed" for r in collect_runs(out))
    if failed:  # a non-zero exit, so that scripts notice; the next bench retries them
        raise ArcvitError(f"{failed} run(s) failed: see {out / 'report.md'}")


def cmd_report(args: argparse.Namespace) -> None:
    build_report(args.dir, args.suite, force=args.force, allow_mixed_data=args.allow_mixed_data)
    for name in ("report.md", "results.csv", "results.json", "accuracy_vs_params.png"):
        if (Path(args.dir) / name).exists():
            print(Path(args.dir) / name)


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """The ``bench`` subcommand (``sub`` makes arcvit's own parsers)."""
    p = sub.add_parser("bench", help=command_help("bench"),
                       description=__doc__)
    p.add_argument("--suite", required=True, choices=SUITE_RUNS,
                   help="mini: offline, built under OUT/data (or --data); vtab1k: 19 NOAH folders; fgvc: 5 VPT folders")
    p.add_argument("--data", help="data root holding the task folders (required for vtab1k and fgvc)")
    p.add_argument("--allow-outside-root", action="store_true",
                   help="let list files name images outside --data (absolute paths, '..', symlinks out)")
    p.add_argument("--allow-mixed-data", action="store_true",
                   help="let the report hold runs of one task on data with different manifest digests (it says "
                        "so); without it such a bench folder is refused")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="a subset of the suite's tasks (default: all)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD",
                   help=f"default: all of {', '.join(METHODS)}; METHOD@RANK runs a method at a fixed rank as its "
                        "own row and joins its method's line in the plot (matched-parameter points: arc@4 lora@1)")
    p.add_argument("--seeds", nargs="+", type=bounds.SEED, default=[0], metavar="SEED", help="e.g. 0 1 2 (default: 0)")
    p.add_argument("--out", help="results folder (default: runs/bench_<suite>)")
    p.add_argument("--backbone", type=backbone_name, help="timm model name or transformers:ORG/NAME "
                                      f"(default: {DEFAULT_BACKBONE} for mini, "
                                      f"{SUITE_RUNS['vtab1k'].backbone} otherwise)")
    p.add_argument("--checkpoint", help="local weights for the backbone: .npz (Google ViT), .safetensors, .pth")
    p.add_argument("--config", help="suite recipe (TOML): [defaults], [methods.M], [tasks.T], [tasks.T.methods.M] "
                                    "TrainConfig settings, most specific last (default: configs/<suite>.toml)")
    p.add_argument("--tune", type=bounds.TRIALS, metavar="N", help="first tune every (task, method) with the same N trials "
                                                         "of `arcvit tune` on validation, then run the tuned settings")
    p.add_argument("--search-space", metavar="FILE", help="with --tune: search space over the packaged one")
    p.add_argument("--storage", metavar="URL", type=storage_flag, help="with --tune: one Optuna database for the studies, e.g. "
                                                    "postgresql://host/db (default: a SQLite file per study)")
    p.add_argument("--epochs", type=bounds.EPOCHS, help="override the schedule's length, keeping its warm-up fraction")
    setting_flags(p, ("protocol", "devices", "targets", "precision", "accelerator"))
    p.add_argument("--quiet", action="store_true", help="no progress bars (one line per run is still printed)")
    add_ray_flags(p, "every run (with --tune, every tuning worker too)")
    p.add_argument("--shared-out", action="store_true",
                   help="with --ray: every node sees --out at the same path, so runs train in place and a retried "
                        "run resumes from its checkpoint (default: workers send each run's files back)")
    p.set_defaults(func=cmd_bench)


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """The ``report`` subcommand (``sub`` makes arcvit's own parsers)."""
    p = sub.add_parser("report", help=command_help("report"))
    p.add_argument("dir", help="a bench results folder (the --out of `arcvit bench`)")
    p.add_argument("--suite", choices=SUITES, help="default: the bench's own, from its bench.json")
    p.add_argument("--force", action="store_true",
                   help="rebuild from the run folders alone, even if that drops finished runs results.json records "
                        "(without it: refused; with no run folders at all, rebuilt from results.json)")
    p.add_argument("--allow-mixed-data", action="store_true",
                   help="put runs of one task on data with different manifest digests in one table (the report "
                        "says so); without it: refused")
    p.set_defaults(func=cmd_report)
