"""Why ARC trails its mergeable peers: one factor at a time from each task's tuned settings, on validation only.

Every run trains on the mini suite's train800 and is scored on val200 after its last epoch (``protocol=select``
with ``evaluate_test=False``: the test split is never opened). Each task starts from the settings the tuned suite
chose for it on validation (docs/bench/tuned/results.json); a factor changes one thing from there. Runs are
ordinary `arcvit train` folders under OUT/runs/<task>/<settings digest> (a variant that equals another
runs once); a finished one is read back, not
retrained, so an interrupted ablation resumes where it stopped.

    .venv/bin/python benchmarks/ablate.py --out runs/ablate --workers 2            # every factor, 3 seeds
    .venv/bin/python benchmarks/ablate.py --out runs/ablate --factors init --report docs/ablations.md

The report (docs/ablations.md) has one table per factor: mean val top-1 over the 8 tasks and per group, with
trainable parameters, and the frontier plot (accuracy vs parameters).
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import statistics
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

TUNED = Path(__file__).resolve().parent.parent / "docs" / "bench" / "tuned" / "results.json"
BACKBONE = "vit_pico_patch7_28.fmnist_arcvit"
SHARED = {"batch_size": 32, "epochs": 5, "warmup_epochs": 1, "grad_clip": 1.0, "recipe": "timm",
          "protocol": "select"}  # the tuned suite's shared settings; select: train800 -> val200
TUNED_KEYS = ("lr", "weight_decay", "label_smoothing", "drop_path", "adapter_dropout", "rank")


@dataclass(frozen=True)
class Variant:
    """One row of a factor's table: a method from its tuned settings, with ``change`` applied over them."""

    label: str
    tuned_as: str  # whose tuned settings it starts from (a bench method name: arc, ssf, lora@2, ...)
    change: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields; arc_options for ARC's extensions


def _arc(label: str, **arc_options: Any) -> Variant:
    return Variant(label, "arc", {"arc_options": arc_options} if arc_options else {})


FACTORS: dict[str, tuple[str, list[Variant]]] = {
    "positions": ("Where ARC adapts: the paper's two inputs, plus the inputs of the attention's output projection "
                  "and of fc2 (each folds into the Linear that reads it)", [
                      _arc("att+mlp (paper)"), _arc("+proj", extra_positions=["proj"]),
                      _arc("+fc2", extra_positions=["fc2"]), _arc("+proj+fc2", extra_positions=["proj", "fc2"])]),
    "channel_scale": ("A per-channel scale s on the adapted input (SSF-like): h = x (1 + s) + ...", [
        _arc("without (paper)"), _arc("with s", channel_scale=True)]),
    "private": ("A per-block private low-rank term x P Q^T beside the shared basis", [
        _arc("none (paper)"), _arc("private rank 1", private_rank=1), _arc("private rank 2", private_rank=2)]),
    "init": ("Initialisation of the shared basis D", [
        _arc("xavier (paper)"), _arc("orthogonal", basis_init="orthogonal"), _arc("data-aware (PCA)", basis_init="data")]),
    "shared_lr": ("Learning rate of the shared D relative to the per-block c and b", [
        _arc("x0.1", shared_lr_scale=0.1), _arc("x1 (paper)"), _arc("x10", shared_lr_scale=10.0)]),
    "att_scale_init": ("Initialisation of c at the attention position", [
        _arc("zero (paper)"), _arc("random (xavier)", att_scale_init="random")]),
    "combined": ("The helpful extensions together (arc_plus's candidates), at each task's tuned rank and at rank 12 "
                 "(within RLRR's 25.4 K parameters)", [
                     _arc("att+mlp (paper)"), _arc("+proj, s", extra_positions=["proj"], channel_scale=True),
                     _arc("+proj+fc2, s", extra_positions=["proj", "fc2"], channel_scale=True),
                     _arc("+proj+fc2, s, random c_att", extra_positions=["proj", "fc2"], channel_scale=True,
                          att_scale_init="random"),
                     Variant("+proj+fc2, s, r=12", "arc", {"rank": 12, "arc_options": {
                         "extra_positions": ["proj", "fc2"], "channel_scale": True}})]),
    "size": ("Size: ARC at fixed ranks beside its peers at two sizes each (the frontier plot)", [
        *(Variant(f"arc r={r}", "arc", {"rank": r}) for r in (8, 16, 32, 64, 128)),
        Variant("lora r=1", "lora@1", {"rank": 1}), Variant("lora r=8", "lora@2", {"rank": 8}),
        Variant("ssf", "ssf"), Variant("rlrr", "rlrr")]),  # SSF and RLRR have no size setting: one point each
    "schedule": ("Schedule: 5 (the suite's), 15 and 30 epochs, warm-up a fifth of them", [
        Variant(f"{m} {e} ep", m, {"epochs": e, "warmup_epochs": max(1, e // 5)})
        for m in ("arc", "ssf", "rlrr", "lora@2") for e in (5, 15, 30)]),
}


def _tuned(path: Path) -> tuple[dict[str, dict[str, dict[str, Any]]], dict[str, str]]:
    """Per task and method, the settings tuned on validation; and each task's group."""
    plan = json.loads(path.read_text())["plan"]
    tuned = {task: {m: entry["settings"] for m, entry in methods.items()}
             for task, methods in plan["tuning"]["tuned"].items()}
    from arcvit.data.mini import MINI_TASKS
    return tuned, {task: MINI_TASKS[task].group for task in plan["tasks"]}


def _config(tuned: dict[str, Any], variant: Variant, seed: int) -> dict[str, Any]:
    """The run's TrainConfig fields: shared settings, the tuned ones, then the variant's change."""
    method, _, rank = variant.tuned_as.partition("@")
    base = {k: v for k, v in tuned.items() if k in TUNED_KEYS}
    if rank:
        base["rank"] = int(rank)
    return {**SHARED, "method": method, "seed": seed, **base, **variant.change}


def _run_one(root: str, task: str, settings: dict[str, Any], out: str) -> dict[str, Any]:
    """Train one run (single-threaded: the pool runs one per core) and return its row."""
    import torch

    from arcvit.training.config import DataSpec, TrainConfig
    from arcvit.training.loop import train
    torch.set_num_threads(1)
    results = train(BACKBONE, DataSpec(root, task), TrainConfig(**settings), out, resume=True, progress=False,
                    evaluate_test=False)
    with open(Path(out) / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    return {"val_top1_last": float(last["val_top1"]), "val_top1_best": results["val_top1"],
            "trainable_params": results["trainable_params"], "epochs": int(last["epoch"])}


def _jobs(factors: list[str], tuned: dict, seeds: list[int]) -> Iterator[tuple]:
    for factor in factors:
        for variant in FACTORS[factor][1]:
            for task in tuned:
                for seed in seeds:
                    yield factor, variant, task, seed, _config(tuned[task][variant.tuned_as], variant, seed)


def _folder(out: Path, task: str, settings: dict[str, Any]) -> Path:
    """One folder per (task, settings): a variant that equals another (every factor's paper row) runs once."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return out / "runs" / task / digest


def run(factors: list[str], seeds: list[int], out: Path, root: Path, tuned_path: Path, workers: int) -> list[dict]:
    """Every run of ``factors`` (finished ones read back), rows appended to OUT/rows.jsonl as they finish."""
    from arcvit.data.mini import build_mini_suite
    tuned, groups = _tuned(tuned_path)
    build_mini_suite(root, list(tuned))
    rows_path = out / "rows.jsonl"
    done = {(r["factor"], r["variant"], r["task"], r["seed"]) for r in _read_rows(rows_path)}
    wanted: dict[Path, list[tuple]] = {}
    for factor, variant, task, seed, settings in _jobs(factors, tuned, seeds):
        if (factor, variant.label, task, seed) not in done:
            wanted.setdefault(_folder(out, task, settings), []).append((factor, variant.label, task, seed, settings))
    out.mkdir(parents=True, exist_ok=True)
    print(f"ablate: {len(wanted)} runs to do, {len(done)} rows done", flush=True)
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool, rows_path.open("a") as sink:
        futures = {pool.submit(_run_one, str(root), jobs[0][2], jobs[0][4], str(folder)): jobs
                   for folder, jobs in wanted.items()}
        for n, future in enumerate(as_completed(futures), 1):
            result = future.result()
            for factor, variant, task, seed, settings in futures[future]:
                row = {"factor": factor, "variant": variant, "task": task, "group": groups[task], "seed": seed,
                       "settings": settings, **result}
                sink.write(json.dumps(row) + "\n")
            sink.flush()
            print(f"[{n}/{len(wanted)}] {', '.join(f'{j[0]}/{j[1]}' for j in futures[future])} / {task} / "
                  f"seed {seed}: val {result['val_top1_last']:.3f}", flush=True)
    return _read_rows(rows_path)


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


def summarise(rows: list[dict], factor: str, seeds: list[int]) -> list[dict[str, Any]]:
    """Per variant: mean val top-1 (last epoch) over tasks, per group, the std over seeds, parameters."""
    from arcvit.data.mini import GROUPS
    table = []
    for variant in FACTORS[factor][1]:
        mine = [r for r in rows if r["factor"] == factor and r["variant"] == variant.label and r["seed"] in seeds]
        tasks = sorted({r["task"] for r in mine})
        if not mine:
            continue
        per_task = {t: statistics.mean(r["val_top1_last"] for r in mine if r["task"] == t) for t in tasks}
        per_seed = [statistics.mean(r["val_top1_last"] for r in mine if r["seed"] == s) for s in seeds
                    if sum(r["seed"] == s for r in mine) == len(tasks)]
        group_of = {r["task"]: r["group"] for r in mine}
        table.append({
            "variant": variant.label, "runs": len(mine), "tasks": len(tasks),
            "mean": statistics.mean(per_task.values()),
            "std": statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0,
            **{g: statistics.mean([v for t, v in per_task.items() if group_of[t] == g] or [float("nan")])
               for g in GROUPS},
            "params": statistics.mean(r["trainable_params"] for r in mine)})
    return table


def report(rows: list[dict], factors: list[str], seeds: list[int], path: Path, plot: Path, command: str) -> None:
    """docs/ablations.md's tables (one per factor of ``factors``) and the frontier plot."""
    from arcvit.data.mini import GROUPS
    lines = ["| variant | mean | ± seeds | " + " | ".join(GROUPS) + " | params | runs |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in GROUPS) + " | ---: | ---: |"]
    sections = []
    for factor in factors:
        title, table = FACTORS[factor][0], summarise(rows, factor, seeds)
        if not table:
            continue
        body = [f"| {t['variant']} | {100 * t['mean']:.1f} | {100 * t['std']:.1f} | "
                + " | ".join(f"{100 * t[g]:.1f}" for g in GROUPS) + f" | {t['params']:,.0f} | {t['runs']} |"
                for t in table]
        sections.append(f"### {factor}\n\n{title}.\n\n" + "\n".join(lines + body))
    path.write_text(f"<!-- generated by: {command} -->\n" + "\n\n".join(sections) + "\n")
    _frontier(rows, seeds, plot)


def _frontier(rows: list[dict], seeds: list[int], plot: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    table = summarise(rows, "size", seeds)
    if not table:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    families = {}
    for t in table:
        families.setdefault(t["variant"].split()[0].rstrip(","), []).append(t)
    for family, points in families.items():
        points.sort(key=lambda t: t["params"])
        ax.errorbar([t["params"] for t in points], [100 * t["mean"] for t in points],
                    yerr=[100 * t["std"] for t in points], marker="o", capsize=3, label=family)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (head included)")
    ax.set_ylabel("mean val200 top-1 over 8 tasks (%)")
    ax.set_title("mini suite, validation only: accuracy vs parameters")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ablate"))
    parser.add_argument("--data", type=Path, default=None, help="mini suite root (default: OUT/data, built once)")
    parser.add_argument("--tuned", type=Path, default=TUNED, help="the tuned suite's results.json")
    parser.add_argument("--factors", nargs="+", choices=list(FACTORS), default=list(FACTORS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)))
    parser.add_argument("--report", type=Path, default=None, help="write the tables here (e.g. docs/ablations.md)")
    parser.add_argument("--plot", type=Path, default=Path("docs/ablations/frontier.png"))
    parser.add_argument("--report-only", action="store_true", help="only rebuild the report from OUT/rows.jsonl")
    args = parser.parse_args()
    rows = _read_rows(args.out / "rows.jsonl") if args.report_only else \
        run(args.factors, args.seeds, args.out, args.data or args.out / "data", args.tuned, args.workers)
    if args.report:
        report(rows, args.factors, args.seeds, args.report, args.plot, "benchmarks/ablate.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in (("out", args.out), ("factors", args.factors), ("seeds", args.seeds))))


if __name__ == "__main__":
    main()
