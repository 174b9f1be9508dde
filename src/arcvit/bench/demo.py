"""``arcvit demo``: the offline first run. Adapts the shipped ViT to real package data sets with ARC, beside a
linear probe and full fine-tuning, merges the adapter, checks predictions are unchanged, and plots the result.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

import arcvit
from arcvit.backends.timm.create import create_backbone
from arcvit.backends.timm.zoo import DEFAULT_BACKBONE
from arcvit.bench.plots import plot_accuracy_vs_params
from arcvit.data.layouts import load_split
from arcvit.data.mini import MINI_TASKS, build_mini_suite
from arcvit.data.transforms import build_transform
from arcvit.fileio import write_json, write_text
from arcvit.training.config import DataSpec
from arcvit.training.finite import require_finite
from arcvit.training.loop import train
from arcvit.training.recipes import load_recipe, train_config

DEMO_TASKS = ("mnist5k", "animal_shapes")
DEMO_METHODS = ("linear", "arc", "full")
# Each (task, method)'s settings, tuned on val200 with the same 12-trial budget (never on test): see its header.
DEMO_RECIPE = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


@torch.no_grad()
def check_merge(run_dir: Path, data_root: Path, task: str) -> dict[str, float | int]:
    """Load the trained adapter onto a fresh backbone, merge it, and compare predictions on the test split."""
    meta = arcvit.core.adapter_file.read_adapter_config(run_dir / "adapter")
    model = create_backbone(DEFAULT_BACKBONE, meta["num_classes"])
    arcvit.load_adapter(model, run_dir / "adapter")
    model.eval()
    merged = arcvit.merge(model).eval()
    dataset = load_split(data_root, task, "test", build_transform(model, train=False), layout="vtab")
    same, max_diff, total = 0, 0.0, 0
    for images, _ in DataLoader(dataset, batch_size=250):
        a, b = model(images), merged(images)
        require_finite(a, f"{run_dir / 'adapter'} on {dataset.source}")  # else max() below would skip a NaN
        require_finite(b, f"{run_dir / 'adapter'}, merged, on {dataset.source}")
        same += (a.argmax(-1) == b.argmax(-1)).sum().item()
        max_diff = max(max_diff, (a - b).abs().max().item())
        total += len(images)
    return {"identical_predictions": same, "test_images": total, "max_abs_logit_diff": max_diff,
            "merged_params": sum(p.numel() for p in merged.parameters()),
            "plain_params": sum(p.numel() for p in create_backbone(DEFAULT_BACKBONE, meta["num_classes"],
                                                                   pretrained=False).parameters())}


def run_demo(out: str | Path = "runs/demo", epochs: int | None = None, progress: bool = True) -> dict:
    console = Console()
    out = Path(out)
    started = time.time()
    console.print(f"[bold]arcvit demo[/]: backbone {DEFAULT_BACKBONE} (self-pretrained on Fashion-MNIST), "
                  f"tasks {', '.join(DEMO_TASKS)}, methods {', '.join(DEMO_METHODS)}")
    data_root = out / "data"
    build_mini_suite(data_root, DEMO_TASKS)
    recipe = load_recipe(DEMO_RECIPE)
    rows = []
    for task in DEMO_TASKS:
        for method in DEMO_METHODS:
            console.print(f"-> {task}: {method}")
            cfg = train_config(recipe, task, method, {"epochs": epochs} if epochs else None)
            results = train(DEFAULT_BACKBONE, DataSpec(str(data_root), task, "vtab"), cfg,
                            out / task / method, resume=True, progress=progress)
            rows.append(results)
    merges = {task: check_merge(out / task / "arc", data_root, task) for task in DEMO_TASKS}

    table = Table(title="arcvit demo: top-1 on the test split (settings tuned on val200, 12 trials each; "
                        "then train on train800val200, report test after the last epoch)")
    table.add_column("method")
    for task in DEMO_TASKS:
        table.add_column(task, justify="right")
    table.add_column("mean", justify="right")
    table.add_column("trainable params", justify="right")
    lines = ["| method | " + " | ".join(DEMO_TASKS) + " | mean | trainable params |",
             "|---|" + "---:|" * (len(DEMO_TASKS) + 2)]
    points = []
    for method in DEMO_METHODS:
        accs = [r["test_top1"] * 100 for r in rows if r["method"] == method]
        params = [r["trainable_params"] for r in rows if r["method"] == method]
        mean = sum(accs) / len(accs)
        param_text = " / ".join(f"{p:,}" for p in dict.fromkeys(params))
        table.add_row(method, *(f"{a:.1f}" for a in accs), f"{mean:.1f}", param_text)
        lines.append(f"| {method} | " + " | ".join(f"{a:.1f}" for a in accs) + f" | {mean:.1f} | {param_text} |")
        points.append((method, sum(params) / len(params), mean, 0.0))
    console.print(table)
    for task, m in merges.items():
        console.print(f"merge check on {task}: {m['identical_predictions']}/{m['test_images']} identical "
                      f"predictions, max |logit diff| {m['max_abs_logit_diff']:.2e}, merged model has "
                      f"{m['merged_params']:,} parameters (plain model: {m['plain_params']:,})")
    plot = plot_accuracy_vs_params(points, out / "accuracy_vs_params.png",
                                   f"arcvit demo: {DEFAULT_BACKBONE}, mean over {', '.join(DEMO_TASKS)}")
    summary = {"backbone": DEFAULT_BACKBONE, "tasks": list(DEMO_TASKS),
               "task_descriptions": {t: MINI_TASKS[t].description for t in DEMO_TASKS},
               "runs": rows, "merge_checks": merges, "wall_time_s": round(time.time() - started, 1)}
    write_json(out / "demo_results.json", summary)
    write_text(out / "demo_table.md", "\n".join(lines) + "\n")
    console.print(f"plot: {plot or 'skipped (no matplotlib)'}\n"
                  f"adapters: {', '.join(str(out / t / 'arc' / 'adapter') for t in DEMO_TASKS)}\n"
                  f"wall time {summary['wall_time_s']:.0f}s")
    return summary
