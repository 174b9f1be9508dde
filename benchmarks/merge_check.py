"""Every mergeable run of a bench folder, merged and scored against itself on its task's test split.

"Every mergeable method merges exactly" is a claim about the runs a report publishes, not only about test
fixtures: each finished run is rebuilt from its folder (``arcvit.training.runmodel.load_run``, as
``arcvit merge --run``), merged with ``merge_for_inference``, and both models score the task's test split.
Per run it records the largest |logit difference| relative to the largest |logit|, how many predictions
differ, the merged model's top-1 beside the one the run recorded, and whether the merged model is the plain
backbone (a fresh model's class and state-dict keys). It only reports; a run over ``--tolerance`` is listed as
such, and the exit status is 1 if any is. Runs already in ``OUT.json`` (from an earlier call on a bench still
filling) are kept, not checked again.

    .venv/bin/python benchmarks/merge_check.py runs/tuned --out docs/bench/tuned/merge_check
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from arcvit.backends import create_backbone
from arcvit.data.layouts import load_split
from arcvit.data.transforms import build_transform
from arcvit.fileio import write_json, write_text
from arcvit.methods import merge_for_inference, method_spec
from arcvit.training.runmodel import load_run, read_run_settings


def _logits(model: torch.nn.Module, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
    outs, labels = [], []
    with torch.no_grad():
        for x, y in loader:
            outs.append(model(x).float())
            labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def _is_plain(merged: torch.nn.Module, backbone: str, num_classes: int) -> bool:
    """The merged model has a freshly created backbone's class and exact state-dict keys (meta device: no
    weights are made)."""
    with torch.device("meta"):
        fresh = create_backbone(backbone, num_classes=num_classes, pretrained=False)
    return type(merged) is type(fresh) and list(merged.state_dict()) == list(fresh.state_dict())


def check_run(bench: Path, data_root: Path, run: dict[str, Any]) -> dict[str, Any]:
    """One run merged and scored beside its unmerged self on the test split."""
    folder = bench / run["run_dir"]
    settings, cfg = read_run_settings(folder)
    model, method, info = load_run(folder)
    merged = merge_for_inference(model, method).eval()
    test = load_split(data_root, run["task"], "test", build_transform(model, recipe=cfg.recipe, train=False))
    loader = DataLoader(test, batch_size=256)
    adapted, labels = _logits(model, loader)
    folded, _ = _logits(merged, loader)
    scale = adapted.abs().max().item()
    return {"task": run["task"], "method": run["method"], "seed": run["seed"], "run_dir": run["run_dir"],
            "images": len(labels), "max_abs_logit_diff": (folded - adapted).abs().max().item(),
            "relative_diff": (folded - adapted).abs().max().item() / max(scale, 1e-12),
            "predictions_differ": int((folded.argmax(1) != adapted.argmax(1)).sum()),
            "merged_top1": (folded.argmax(1) == labels).float().mean().item(), "run_test_top1": run["test_top1"],
            "plain_model": _is_plain(merged, settings["backbone"], info["num_classes"])}


def _summary(checks: list[dict[str, Any]], tolerance: float) -> list[dict[str, Any]]:
    """One row per method: runs checked, worst relative difference, predictions changed, plain model."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for c in checks:
        by_method[c["method"]].append(c)
    return [{"method": m, "runs": len(rows), "worst_relative_diff": max(r["relative_diff"] for r in rows),
             "predictions_differ": sum(r["predictions_differ"] for r in rows),
             "images": sum(r["images"] for r in rows),
             "top1_as_recorded": sum(round(r["merged_top1"], 6) == round(r["run_test_top1"], 6) for r in rows),
             "plain_model": all(r["plain_model"] for r in rows),
             "exact": all(r["relative_diff"] <= tolerance and r["plain_model"] for r in rows)}
            for m, rows in by_method.items()]


def _markdown(rows: list[dict[str, Any]], skipped: list[str], tolerance: float, command: str) -> str:
    lines = ["# Merge check: every mergeable run, merged and scored against itself", "",
             f"`{command}`", "",
             "Each finished run rebuilt from its folder (as `arcvit merge --run`), merged into the plain backbone, "
             "and both models scored on the task's test split. Relative difference: max |Δlogit| / max |logit| "
             f"over the split; exact: every run at most {tolerance:g} and the merged model the plain class with "
             "the plain keys.", "",
             "| method | runs | worst relative difference | predictions changed | merged top-1 as the run "
             "recorded | plain class and keys | exact |",
             "| --- | ---: | ---: | ---: | ---: | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['runs']} | {r['worst_relative_diff']:.1e} | "
                     f"{r['predictions_differ']} of {r['images']} | {r['top1_as_recorded']} of {r['runs']} | "
                     f"{'yes' if r['plain_model'] else 'NO'} | {'yes' if r['exact'] else 'NO'} |")
    if skipped:
        lines += ["", f"Not mergeable, not checked: {', '.join(sorted(set(skipped)))}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", type=Path, help="a bench folder (results.json, bench.json, runs/)")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--tolerance", type=float, default=1e-5, help="relative (default: 1e-5)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = json.loads((args.bench / "bench.json").read_text())
    runs = json.loads((args.bench / "results.json").read_text())["runs"]
    data_root = Path(plan["data"])
    earlier = args.out.with_suffix(".json")
    known = {c["run_dir"]: c for c in json.loads(earlier.read_text())["runs"]} if earlier.is_file() else {}
    checks, skipped = [], []
    for run in sorted((r for r in runs if r["status"] == "done"), key=lambda r: (r["method"], r["task"], r["seed"])):
        base = run["method"].split("@")[0]
        if not method_spec(base).mergeable:
            skipped.append(run["method"])
            continue
        if run["run_dir"] in known:
            checks.append(known[run["run_dir"]])
            continue
        checks.append(check_run(args.bench, data_root, run))
        c = checks[-1]
        print(f"{c['method']:>12} {c['task']:>20} seed {c['seed']}: relative {c['relative_diff']:.1e}, "
              f"{c['predictions_differ']} predictions changed", flush=True)
    rows = _summary(checks, args.tolerance)
    command = "python benchmarks/merge_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    write_json(args.out.with_suffix(".json"), {"tolerance": args.tolerance, "summary": rows, "runs": checks})
    write_text(args.out.with_suffix(".md"), _markdown(rows, skipped, args.tolerance, command))
    print(_markdown(rows, skipped, args.tolerance, command))
    return 0 if all(r["exact"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
