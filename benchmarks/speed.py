#!/usr/bin/env python
"""Inference and training cost of ARC against the plain model and the other fine-tuning methods.

ARC claims what a unit test cannot check: a merged ARC model serves at exactly the plain timm model's cost, and,
its backbone being frozen, a training step costs what BitFit's costs (the frozen-backbone floor), well under full
fine-tuning's. Timings only compare within one run on one machine, so every ratio printed here comes from this
run. The script reports and never asserts: benchmarks/README.md says how to run it and what each number means.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import arcvit
from arcvit import ARCConfig, apply_arc
from arcvit.data.sources import mnist5k
from arcvit.data.transforms import data_config
from arcvit.fileio import write_json, write_text
from arcvit.methods import prepare_model

NUM_CLASSES = 100
LORA_RANK, LORA_TARGETS = 8, ("qkv", "fc1")
PERTURB_STD = 0.02
# Issue 10's goals for "arc" and "arc_att" (default impl): (measure, reference method, largest ratio).
TRAIN_GOALS = (("mem", "bitfit", 1.05), ("mem", "full", 0.65), ("step", "bitfit", 1.05), ("step", "full", 0.72))
GOAL_METHODS = ("arc", "arc_att")
# Inference goals, x plain: merged ARC is the plain model (1.00, read to within 2% timing noise); unmerged <= 1.10.
INFERENCE_GOALS = {"arc merged": 1.02, "arc unmerged": 1.10}
MIB = 1 << 20
# ARC in its default impl and in each impl; every other name is a method of arcvit.methods.prepare_model.
ARC_VARIANTS = {
    "arc": ARCConfig(mode="arc"),
    "arc_fused": ARCConfig(mode="arc", impl="fused"),
    "arc_sequential": ARCConfig(mode="arc", impl="sequential"),
    "arc_lowrank": ARCConfig(mode="arc", impl="lowrank"),
    "arc_att": ARCConfig(mode="arc_att"),
    "arc_ckpt": ARCConfig(mode="arc"),      # + the backbone's gradient checkpointing
    "arc_compile": ARCConfig(mode="arc"),   # + torch.compile (only with --compile)
}
CHECKPOINTED, COMPILED = ("arc_ckpt",), ("arc_compile",)
TRAIN_METHODS = (*ARC_VARIANTS, "full", "bitfit", "linear", "lora", "vera", "adaptformer")
DEFAULT_METHODS = tuple(m for m in TRAIN_METHODS if m not in COMPILED)
REFERENCES = ("full", "bitfit", "lora")


def create_backbone(args: argparse.Namespace) -> nn.Module:
    """The same random weights for every method, so that only what each method adds differs."""
    torch.manual_seed(0)
    return timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES, img_size=args.img_size)


def prepare(name: str, model: nn.Module) -> nn.Module:
    """The module to train for one benchmarked method; ``model`` is changed in place."""
    if name in ARC_VARIANTS:
        model = apply_arc(model, ARC_VARIANTS[name])
        if name in CHECKPOINTED:
            model.set_grad_checkpointing(True)
        return torch.compile(model) if name in COMPILED else model
    return prepare_model(model, name, rank=LORA_RANK if name == "lora" else None, targets=LORA_TARGETS)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, with queued GPU work drained on both sides so that it is all counted."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1e3


def interleaved_median_ms(calls: dict[str, Callable[[], object]], warmup: int, repeats: int,
                          device: torch.device) -> dict[str, float]:
    """Median ms per call, timed round-robin with a rotating start so drift and ordering hit every call alike."""
    names = list(calls)
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed_ms(calls[name], device))
    return {name: statistics.median(t) for name, t in times.items()}


def real_batch(model: nn.Module, batch_size: int, img_size: int) -> torch.Tensor:
    """mnist5k digits as the model expects its input: resized, 3 channels, its pretrained cfg's mean and std.

    Real images, not noise, because an exactness check on noise can miss errors that only structured inputs
    (large uniform regions, strong edges) excite.
    """
    images = mnist5k().images
    x = torch.from_numpy(images[np.arange(batch_size) % len(images)]).float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", antialias=True).expand(-1, 3, -1, -1)
    cfg = data_config(model)
    mean, std = (torch.tensor(cfg[key]).view(1, 3, 1, 1) for key in ("mean", "std"))
    return ((x - mean) / std).contiguous()


@torch.no_grad()
def perturb(model: nn.Module, generator: torch.Generator) -> None:
    """Add N(0, 0.02²) to every trainable tensor: fresh adapters (zero scales, biases, head, LoRA B) are
    close to the identity, and merging an identity would prove nothing."""
    for p in model.parameters():
        if p.requires_grad:
            p.add_((torch.randn(p.shape, generator=generator) * PERTURB_STD).to(p))


def bench_inference(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Latency of the plain, merged-ARC, unmerged-ARC (each impl) and unmerged-LoRA models on one real batch.

    With ``--compile``, also the plain and unmerged ARC models under torch.compile, and the time the first
    (compiling) call took.
    """
    plain = create_backbone(args)
    arc = prepare("arc", copy.deepcopy(plain))
    models = {"plain": plain, "arc merged": None, "arc unmerged": arc}
    models |= {f"arc unmerged ({name[4:]})": prepare(name, copy.deepcopy(plain))
               for name in ("arc_fused", "arc_sequential", "arc_lowrank")}
    models["lora unmerged"] = prepare("lora", copy.deepcopy(plain))
    generator = torch.Generator().manual_seed(1)
    for model in models.values():
        if model is not None:
            perturb(model, generator)
    models["arc merged"] = arcvit.merge(arc)
    for model in models.values():
        model.to(device).eval()
    x = real_batch(plain, args.batch_size, args.img_size).to(device)
    compile_s = {}
    with torch.no_grad():
        unmerged_logits = arc(x)
        diff = (models["arc merged"](x) - unmerged_logits).abs().max().item()
        if args.compile:
            for name in ("plain", "arc unmerged"):
                models[f"{name} compiled"] = torch.compile(models[name])
                compile_s[f"{name} compiled"] = timed_ms(partial(models[f"{name} compiled"], x), device) / 1e3
        ms = interleaved_median_ms({name: partial(model, x) for name, model in models.items()},
                                   args.warmup, args.repeats, device)
    return {"median_ms": ms, "ratio_vs_plain": {name: t / ms["plain"] for name, t in ms.items()},
            "max_abs_logit_diff": diff, "max_abs_logit": unmerged_logits.abs().max().item(),
            "first_call_s": compile_s}


def _proc_status_mib(field: str) -> float:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"/proc/self/status has no {field}; CPU memory is measured on Linux only")
    return int(match.group(1)) / 1024


def reset_peak_mib(device: torch.device) -> float:
    """Restart the peak-memory counter at the current usage and return that usage (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / MIB
    Path("/proc/self/clear_refs").write_text("5")  # "5" resets VmHWM (peak RSS) to the current RSS
    return _proc_status_mib("VmRSS")


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / MIB if device.type == "cuda" else _proc_status_mib("VmHWM")


def bench_training(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Step time and peak memory growth of one method; run alone in its own process (see ``run_worker``).

    The peak covers the warm-up steps too, so it includes the gradients and AdamW state the first step
    allocates, not only the activations.
    """
    model = prepare(args.worker, create_backbone(args)).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=generator).to(device)
    y = torch.randint(NUM_CLASSES, (args.batch_size,), generator=generator).to(device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    counted = {"trainable_params": sum(p.numel() for p in params), "flops": step_flops(model, step)}
    if args.flops_only:
        return counted
    baseline = reset_peak_mib(device)
    first_step_ms = timed_ms(step, device)  # with torch.compile: mostly compilation
    for _ in range(args.warmup - 1):
        step()
    step_ms = statistics.median(timed_ms(step, device) for _ in range(args.steps))
    return counted | {"step_ms": step_ms, "images_per_s": args.batch_size * 1e3 / step_ms,
                      "peak_mib": peak_mib(device) - baseline, "first_step_ms": first_step_ms}


def step_flops(model: nn.Module, step: Callable[[], None]) -> int:
    """Floating-point operations of one training step, counted by torch's FlopCounterMode: the arithmetic a method
    needs, whatever the machine. Attention runs as explicit matmuls while counting (the same arithmetic; CPU's
    fused attention kernel has no FLOP formula), so every method's count includes it alike."""
    fused = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in fused:
        m.fused_attn = False
    try:
        with FlopCounterMode(display=False) as counter:
            step()
    finally:
        for m in fused:
            m.fused_attn = True
    return counter.get_total_flops()


def run_worker(method: str, argv: list[str]) -> dict[str, Any]:
    """Measure one method in a fresh interpreter, so its peak memory holds no other method's allocations."""
    print(f"training step: {method} ...", file=sys.stderr, flush=True)
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", method]
    # glibc raises its mmap threshold as big blocks are freed, after which freed tensors stay in the heap and
    # the peak RSS depends on allocation history; a fixed threshold maps every tensor, so RSS tracks live ones.
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"the {method} worker failed (exit {proc.returncode}); its error is printed above")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def training_ratios(train: dict[str, dict[str, Any]]) -> None:
    """Add each method's step-time, memory and FLOP ratios to full fine-tuning, BitFit and LoRA, where those ran."""
    for reference in REFERENCES:
        if reference in train:
            for result in train.values():
                for measure, key in (("step", "step_ms"), ("mem", "peak_mib"), ("flops", "flops")):
                    if key in result:
                        result[f"{measure}_vs_{reference}"] = result[key] / train[reference][key]


def goals(inference: dict[str, Any] | None, train: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 10's goals that this run can evaluate: training cost of arc and arc_att, and inference latency. A
    step-time goal also gets the FLOP ratio: the arithmetic alone, below which no implementation goes."""
    out = [{"method": name, "measure": "latency", "reference": "plain", "ratio": inference["ratio_vs_plain"][name],
            "limit": limit} for name, limit in INFERENCE_GOALS.items()] if inference else []
    for name in (n for n in GOAL_METHODS if n in train):
        for measure, reference, limit in TRAIN_GOALS:
            ratio, flops = train[name].get(f"{measure}_vs_{reference}"), train[name].get(f"flops_vs_{reference}")
            if ratio is None and measure == "step" and flops is not None:  # --flops-only: the arithmetic's floor
                measure, ratio, flops = "step FLOPs", flops, None
            if ratio is not None:
                out.append({"method": name, "measure": measure, "reference": reference, "ratio": ratio,
                            "limit": limit, "flops_ratio": flops})
    return [goal | {"met": goal["ratio"] <= goal["limit"]} for goal in out]


def machine(device: torch.device) -> dict[str, str]:
    """What the numbers were measured on; timings from different machines are not comparable."""
    cpuinfo = Path("/proc/cpuinfo")
    found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE) if cpuinfo.exists() else None
    info = {"cpu": found.group(1).strip() if found else platform.processor() or "unknown",
            "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable by this process)",
            "torch threads": str(torch.get_num_threads()),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
            "arcvit": arcvit.__version__, "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = [headers, ["---"] * len(headers), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _ratio(result: dict[str, Any], key: str) -> str:
    return f"{result[key]:.2f}" if key in result else "-"


def _training_table(train: dict[str, dict[str, Any]], timed: bool) -> str:
    headers = ["method", "trainable params", "GFLOP / step", *(f"FLOPs x {r}" for r in REFERENCES)]
    if timed:
        headers += ["median ms / step", "first step ms", "images / s", *(f"x {r}" for r in REFERENCES),
                    "peak MiB", *(f"mem x {r}" for r in REFERENCES)]
    rows = []
    for name, r in train.items():
        row = [name, f"{r['trainable_params']:,}", f"{r['flops'] / 1e9:.1f}",
               *(_ratio(r, f"flops_vs_{ref}") for ref in REFERENCES)]
        if timed:
            row += [f"{r['step_ms']:.1f}", f"{r['first_step_ms']:.0f}", f"{r['images_per_s']:.1f}",
                    *(_ratio(r, f"step_vs_{ref}") for ref in REFERENCES), f"{r['peak_mib']:.1f}",
                    *(_ratio(r, f"mem_vs_{ref}") for ref in REFERENCES)]
        rows.append(row)
    return md_table(headers, rows)


def _goal_line(goal: dict[str, Any]) -> str:
    line = (f"- {goal['method']}: {goal['measure']} {goal['ratio']:.3f}x {goal['reference']} "
            f"(goal <= {goal['limit']:.2f}): {'met' if goal['met'] else 'NOT met'}")
    if goal.get("flops_ratio") is not None:
        line += f"; its arithmetic alone (FLOPs) is {goal['flops_ratio']:.3f}x"
    return line


def render(report: dict[str, Any]) -> str:
    """The whole report as markdown: machine, settings, inference, training and the goals."""
    s, inf, train = report["settings"], report["inference"], report["training"]
    parts = ["# arcvit speed benchmark",
             "## Machine", md_table(["", ""], [[key, value] for key, value in report["machine"].items()]),
             f"Settings: `{s['model']}`, {NUM_CLASSES} classes, random init, batch {s['batch_size']}, "
             f"{s['img_size']}x{s['img_size']}, fp32 (TF32 off), {s['warmup']} warm-up, "
             f"{s['repeats']} inference repeats, {s['steps']} training steps. "
             f"ARC's default impl: `{s['arc_default_impl']}` (rows `arc`, `arc_att`, `arc_ckpt`, `arc_compile`)."
             + (" FLOPs only (`--flops-only`): nothing was timed." if s.get("flops_only") else "")]
    if inf:
        parts += [f"## Inference (eval, no grad, batch {s['batch_size']})",
                  md_table(["model", "median ms / batch", "x plain"],
                           [[name, f"{ms:.2f}", f"{inf['ratio_vs_plain'][name]:.2f}"]
                            for name, ms in inf["median_ms"].items()]),
                  f"Merged vs unmerged ARC, real mnist5k batch, fp32: max |logit diff| = "
                  f"{inf['max_abs_logit_diff']:.3g} (max |logit| = {inf['max_abs_logit']:.3g})."
                  + "".join(f" First (compiling) call of `{name}`: {sec:.1f} s."
                            for name, sec in inf["first_call_s"].items())]
    parts += ["## Training step (forward + backward + AdamW)",
              _training_table(train, timed=not s.get("flops_only")),
              "FLOPs: one step counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls, convolutions and "
              "attention; elementwise work is not counted).",
              "## Goals (issue 10)", "\n".join(_goal_line(g) for g in report["goals"])]
    return "\n\n".join(parts) + "\n"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _methods(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in TRAIN_METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {', '.join(TRAIN_METHODS)}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model name (random init)")
    parser.add_argument("--batch-size", type=_positive, default=8, help="batch for inference and training")
    parser.add_argument("--img-size", type=_positive, help="square input size in pixels (default: the model's)")
    parser.add_argument("--steps", type=_positive, default=20, help="timed training steps per method")
    parser.add_argument("--warmup", type=_positive, default=5,
                        help="untimed runs first: forward passes per inference model, steps per training method")
    parser.add_argument("--repeats", type=_positive, default=30, help="timed inference rounds over the models")
    parser.add_argument("--methods", type=_methods, default=DEFAULT_METHODS,
                        help=f"comma-separated training methods (default all but {','.join(COMPILED)}: "
                             f"{','.join(DEFAULT_METHODS)})")
    parser.add_argument("--compile", action="store_true",
                        help=f"also time torch.compile: inference rows and the training method {COMPILED[0]}")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--threads", type=_positive, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, help="write the report as JSON here and as markdown beside it (.md)")
    parser.add_argument("--flops-only", action="store_true",
                        help="count each method's FLOPs per training step and time nothing (any machine will do)")
    parser.add_argument("--worker", choices=TRAIN_METHODS, help=argparse.SUPPRESS)  # internal: one method
    args = parser.parse_args(argv)
    if args.out and args.out.suffix == ".md":
        parser.error("--out names the JSON file; the markdown goes beside it with the suffix .md")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available")
    if args.compile and not args.worker and COMPILED[0] not in args.methods:
        args.methods = (*args.methods, *COMPILED)
    if args.img_size is None:
        args.img_size = timm.create_model(args.model, pretrained=False).pretrained_cfg["input_size"][-1]
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.allow_tf32 = False  # strict fp32 everywhere: the exactness check and timings share it
    torch.backends.cuda.matmul.allow_tf32 = False
    if args.worker:
        print(json.dumps(bench_training(args, device)))
        return

    inference = None
    if not args.flops_only:
        print("inference ...", file=sys.stderr, flush=True)
        inference = bench_inference(args, device)
    train = {name: run_worker(name, argv) for name in args.methods}
    training_ratios(train)
    settings = {k: v for k, v in vars(args).items() if k != "worker"} | {
        "out": str(args.out) if args.out else None, "methods": list(args.methods),
        "arc_default_impl": ARCConfig().impl}
    report = {"machine": machine(device), "settings": settings, "inference": inference, "training": train,
              "goals": goals(inference, train)}
    markdown = render(report)
    print(markdown)
    if args.out:
        write_json(args.out, report)
        write_text(args.out.with_suffix(".md"), markdown)


if __name__ == "__main__":
    main()
