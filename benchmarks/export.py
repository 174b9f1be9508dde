#!/usr/bin/env python
"""What an exported model costs: ONNX Runtime against PyTorch eager, for the merged model and the many-task model.

For each model (the shipped pico ViT, vit_small with random weights: nothing is downloaded), 16 tasks with random
adapters (ranks equal, class counts 5 to 100, arc and arc_att) are written, then:

- the merged single-task model (the 100-class task) and the 16-task graph are exported by ``arcvit.export`` (each
  checked against PyTorch before it is kept), and each is quantised to int8 (ONNX Runtime dynamic quantisation);
- latency at batch 1 and 32 of: PyTorch eager (the merged timm model; MultiTask for 16 tasks, the batch spread over
  every task), ONNX Runtime fp32 and int8 of each file. Rounds are interleaved (each round times every call once,
  in rotating order) and the fastest round of each call is reported: on a shared, noisy machine the minimum is
  the least disturbed measurement;
- file sizes.

Goals (issue 20): ONNX Runtime fp32 <= 1.0x PyTorch eager for both models, and the 16-task graph <= 1.10x the
merged single-task graph on vit_small (ONNX Runtime fp32, batch 32). Reports and never asserts.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve import backbone, images, interleaved_samples, write_tasks  # noqa: E402
from speed import machine, md_table  # noqa: E402

import arcvit  # noqa: E402
from arcvit.export.check import run  # noqa: E402
from arcvit.export.graphs import SingleTask, many_tasks, task_entry  # noqa: E402
from arcvit.export.metadata import describe  # noqa: E402
from arcvit.export.quantize import int8_path, quantize_file  # noqa: E402
from arcvit.export.runtime import (
    OPSETS,  # noqa: E402
    inference_session,  # noqa: E402
)
from arcvit.export.writer import Job, export_onnx  # noqa: E402
from arcvit.fileio import write_json, write_text  # noqa: E402
from arcvit.serving import MultiTask  # noqa: E402

TASKS, RANK, BATCHES = 16, 8, (1, 32)
SINGLE = "task03"  # 100 classes: the largest head, as wide as the many-task graph's
GOALS = {"ort_vs_eager": 1.0, "many_vs_merged": 1.10}


def _write(job: Job, out: Path) -> dict[str, Any]:
    """The checked fp32 file and its int8 sibling; their sizes and the check's figures."""
    summary = export_onnx(job, out)
    quantize_file(out, int8_path(out))
    return {"fp32_bytes": out.stat().st_size, "int8_bytes": int8_path(out).stat().st_size,
            "check": summary["check"]["batches"]}


def _batches(x: torch.Tensor, many: bool) -> list[dict[str, torch.Tensor]]:
    ids = torch.arange(len(x)) % TASKS
    return [{"pixel_values": x[:1], **({"task_ids": ids[:1]} if many else {})},
            {"pixel_values": x, **({"task_ids": ids} if many else {})}]


def export_both(model_name: str, root: Path, opset: int) -> tuple[dict[str, Any], torch.nn.Module, MultiTask]:
    """Both files of ``model_name`` under ``root`` (ONNX ``opset``); the eager models they came from."""
    names = write_tasks(model_name, root / "tasks", TASKS, RANK)
    meta = json.loads((root / "tasks" / SINGLE / "adapter_config.json").read_text())
    adapted = arcvit.load_adapter(backbone(model_name, meta["num_classes"]), root / "tasks" / SINGLE).eval()
    merged = arcvit.merge(adapted).eval()
    x = images(merged, 8)
    files = {"merged": _write(Job(SingleTask(merged).eval(), describe("merged", merged, {}, [task_entry(SINGLE, meta)],
                                                                       {}), _batches(x, False), "generated",
                                  opset), root / "merged.onnx")}
    graph, tasks = many_tasks(backbone(model_name), {n: root / "tasks" / n for n in names})
    x = images(merged, TASKS)
    files["many"] = _write(Job(graph, describe("many-task", graph.backbone, {}, tasks, {}), _batches(x, True),
                               "generated", opset), root / "many.onnx")
    multi = MultiTask(backbone(model_name))
    for name in names:
        multi.add(name, root / "tasks" / name)
    return files, merged, multi


def calls(root: Path, merged: torch.nn.Module, multi: MultiTask, batch: int, threads: int) -> dict[str, Callable]:
    """Every timed call at one batch size (the many-task batch spread over every task)."""
    x = images(merged, batch)
    ids = torch.arange(batch) % TASKS
    names = list(multi.tasks)
    tasks = [names[i] for i in ids]
    sessions = {f"ort {kind} {file}": inference_session(str(path), threads)
                for file in ("merged", "many") for kind, path in
                (("fp32", root / f"{file}.onnx"), ("int8", int8_path(root / f"{file}.onnx")))}

    def eager(fn):
        def call():
            with torch.inference_mode():
                fn()
        return call
    out = {"eager merged": eager(lambda: merged(x)), "eager many": eager(lambda: multi.predict(x, tasks))}
    for name, session in sessions.items():
        inputs = {"pixel_values": x, **({"task_ids": ids} if name.endswith("many") else {})}
        out[name] = (lambda s=session, i=inputs: run(s, i))
    return out


def bench(model_name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        files, merged, multi = export_both(model_name, root, args.opset)
        exported_s = time.perf_counter() - start
        latency = {}
        for batch in BATCHES:
            samples = interleaved_samples(calls(root, merged, multi, batch, args.threads), args.warmup,
                                          args.rounds, args.budget_s)
            latency[str(batch)] = {name: {"fastest_ms": min(t), "rounds": len(t)} for name, t in samples.items()}
    return {"files": files, "export_and_check_s": exported_s, "latency_ms": latency}


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """ORT fp32 vs eager for both models (every model and batch), and 16 tasks vs merged on vit_small."""
    out = []
    for model, result in results.items():
        for batch, lat in result["latency_ms"].items():
            for file in ("merged", "many"):
                ratio = lat[f"ort fp32 {file}"]["fastest_ms"] / lat[f"eager {file}"]["fastest_ms"]
                out.append({"goal": f"{model} b{batch} ORT fp32 {file} / eager {file}", "ratio": ratio,
                            "limit": GOALS["ort_vs_eager"], "met": ratio <= GOALS["ort_vs_eager"]})
            if model == "vit_small":
                ratio = lat["ort fp32 many"]["fastest_ms"] / lat["ort fp32 merged"]["fastest_ms"]
                out.append({"goal": f"{model} b{batch} ORT fp32 16-task graph / merged graph", "ratio": ratio,
                            "limit": GOALS["many_vs_merged"], "met": ratio <= GOALS["many_vs_merged"]})
    return out


def render(report: dict[str, Any]) -> str:
    lines = ["# ONNX export: what the exported models cost", "", f"Command: `{report['command']}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in report["machine"].items()), "",
             "Fastest of the interleaved rounds, in ms per call (the many-task batch spreads over 16 tasks).", ""]
    for model, result in report["results"].items():
        lat = result["latency_ms"]
        names = list(next(iter(lat.values())))
        lines += [f"## {model}", "", md_table(["call", *[f"batch {b} (ms)" for b in lat]],
                                              [[n, *[f"{lat[b][n]['fastest_ms']:.2f}" for b in lat]]
                                               for n in names]), ""]
        files = result["files"]
        lines += [md_table(["file", "fp32 MB", "int8 MB", "check: max abs dlogit / max abs logit"],
                           [[f, f"{v['fp32_bytes'] / 1e6:.1f}", f"{v['int8_bytes'] / 1e6:.1f}",
                             ", ".join(f"b{c['batch']}: {c['max_abs_diff']:.2g} / {c['max_abs_logit']:.3g}"
                                       for c in v["check"])] for f, v in files.items()]),
                  "", f"Export and check of both files: {result['export_and_check_s']:.0f} s.", ""]
    lines += ["## Goals", "", md_table(["goal", "measured", "limit", "met"],
                                       [[g["goal"], f"{g['ratio']:.2f}x", f"{g['limit']:.2f}x",
                                         "yes" if g["met"] else "NOT met"] for g in report["goals"]]), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="pico,vit_small", help="comma-separated: pico, vit_small (or a timm name)")
    p.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="at least this many interleaved rounds")
    p.add_argument("--budget-s", type=float, default=20.0, help="more rounds while a batch size took less")
    p.add_argument("--opset", type=int, choices=OPSETS, default=OPSETS[0], help="ONNX opset of the exported files")
    p.add_argument("--out", help="write the JSON report here (and the Markdown beside it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {model: bench(model, args) for model in args.models.split(",")}
    report = {"command": " ".join(["benchmarks/export.py", *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "results": results, "goals": goals(results)}
    text = render(report)
    print(text)
    if args.out:
        write_json(args.out, report)
        write_text(Path(args.out).with_suffix(".md"), text + "\n")


if __name__ == "__main__":
    main()
