#!/usr/bin/env python
"""Serving many tasks on one frozen backbone: what a mixed-task batch costs, what a task costs in memory, and
what the HTTP server sustains.

1. Latency: one batch of 32 images whose tasks are spread over 1, 4 and 16 tasks, run by MultiTask in one
   backbone pass, against the plain timm model's batch of 32 (the issue's goal: <= 1.10x at 16 tasks), for
   both ways of routing the per-image adapters (per-task index groups, batched matmul), in one run.
2. Memory: bytes of tensors a model holds after each added task (goal: about the adapter's own bytes).
3. A bounded load test of `arcvit serve` on 127.0.0.1 (a fixed number of requests at a fixed concurrency),
   against the naive server: one merged model per task (arcvit.serving.SeparateModels) behind the same app.
4. A screenshot of the web page after a prediction, taken with headless chromium.

Reports and never asserts; timings compare only within one run (benchmarks/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).parent))
from speed import machine, md_table, step_flops, timed_ms  # noqa: E402

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from conftest import arcvit_command  # noqa: E402
from serving_support import free_port, multipart, png_bytes  # noqa: E402  (the tests' HTTP helpers)

import arcvit  # noqa: E402
from arcvit.core.layers import ARCSite  # noqa: E402
from arcvit.fileio import write_json, write_safetensors, write_text  # noqa: E402
from arcvit.serving import MultiTask, SeparateModels, load_tasks  # noqa: E402

ROUTINGS = ("bmm", "groups")
CORE_ADAPT = ARCSite.adapt
BATCH = 32
SPREADS = (1, 4, 16)
GOAL = 1.10
MODELS = {  # name -> (timm name, pretrained (shipped weights), classes per task)
    "pico": ("vit_pico_patch7_28.fmnist_arcvit", True),
    "vit_small": ("vit_small_patch16_224", False),
}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]


@functools.cache
def _random_weights(timm_name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return timm.create_model(timm_name, pretrained=False, num_classes=0).state_dict()


def backbone(name: str, num_classes: int = 0) -> nn.Module:
    """The same frozen weights on every call (shipped, or random with a fixed seed), and a new head."""
    timm_name, pretrained = MODELS.get(name, (name, False))
    model = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes).eval()
    if not pretrained:
        model.load_state_dict(_random_weights(timm_name), strict=False)  # the head stays new
    return model


def write_tasks(model_name: str, root: Path, count: int, rank: int, seed: int = 0) -> list[str]:
    """``count`` adapter folders with random (non-identity) ARC weights; class counts vary from 5 to 100."""
    generator = torch.Generator().manual_seed(seed)
    names = []
    for i in range(count):
        classes = (5, 10, 37, 100)[i % 4]
        model = backbone(model_name, classes)
        arcvit.apply_arc(model, arcvit.ARCConfig(rank=rank, mode="arc_att" if i % 3 == 2 else "arc", dropout=0.0))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        names.append(f"task{i:02d}")
        arcvit.save_adapter(model, root / names[-1], extra={"class_names": [f"class {c}" for c in range(classes)]})
    return names


def images(model: nn.Module, count: int) -> torch.Tensor:
    size = timm.data.resolve_model_data_config(model)["input_size"]
    return torch.randn(count, *size, generator=torch.Generator().manual_seed(1))


def adapt_groups(site: ARCSite, x: torch.Tensor) -> torch.Tensor:
    """The alternative to the core's batched matmul: each task's items gathered by index, run through their
    adapter, and scattered back (one index_select, adapter and index_copy per task and site)."""
    route = site.state.route
    if route is None or route.single is not None:
        return CORE_ADAPT(site, x)
    per, out = x.shape[0] // route.size, torch.empty_like(x)
    offsets = torch.arange(per)
    for t, name in enumerate(route.names):
        index = ((route.ids == t).nonzero().flatten()[:, None] * per + offsets).flatten()
        part, adapter = x.index_select(0, index), site.get(name)
        out.index_copy_(0, index, adapter(part) if adapter is not None else part)
    return out


@contextlib.contextmanager
def routing(method: str):
    """Route mixed batches the core's way ("bmm": per-item batched matmuls) or by per-task index groups."""
    if method == "bmm":
        yield
        return
    ARCSite.adapt = adapt_groups
    try:
        yield
    finally:
        ARCSite.adapt = CORE_ADAPT


def timed_routing(multi: MultiTask, x: torch.Tensor, tasks: list[str], method: str):
    def call():
        with routing(method):
            return multi.predict(x, tasks)
    return call


def interleaved_samples(calls: dict[str, Callable[[], object]], warmup: int, repeats: int,
                        budget_s: float = 0.0) -> dict[str, list]:
    """ms of every call in each round, each round timing every call once, in rotating order: at least ``repeats``
    rounds, and more while the rounds so far took under ``budget_s`` seconds (a small model gets many)."""
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start, r = time.perf_counter(), 0
    while r < repeats or time.perf_counter() - start < budget_s:
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(timed_ms(calls[name], torch.device("cpu")))
        r += 1
    return samples


def bench_latency(model_name: str, rank: int, root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Median ms of one batch of 32: plain timm model vs MultiTask at each spread, per routing method."""
    names = write_tasks(model_name, root, max(SPREADS), rank)
    plain = backbone(model_name, 100)
    multi = MultiTask(backbone(model_name))
    load_tasks(multi, root)
    unrouted = backbone(model_name, 100)  # one task's adapter active, no routing: what no routing can undercut
    arcvit.load_adapter(unrouted, root / names[0], load_head=False)
    unrouted.eval()
    x = images(plain, BATCH)
    calls = {"plain": lambda: plain(x), "unrouted": lambda: unrouted(x)}
    for method in ROUTINGS:
        for spread in SPREADS:
            calls[f"{method}/{spread}"] = timed_routing(multi, x, [names[i % spread] for i in range(BATCH)], method)
    with torch.inference_mode():
        samples = interleaved_samples(calls, args.warmup, args.repeats, args.budget_s)
        flops = {"plain": step_flops(plain, calls["plain"]), "unrouted": step_flops(unrouted, calls["unrouted"]),
                 "bmm/16": step_flops(multi.backbone, calls["bmm/16"])}
    # On a shared CPU, other jobs only ever add time: the fastest round is the least disturbed one.
    ms = {k: min(v) for k, v in samples.items()}
    median = {k: statistics.median(v) for k, v in samples.items()}
    return {"model": MODELS[model_name][0], "rank": rank, "batch": BATCH, "rounds": len(samples["plain"]),
            "ms": ms, "median_ms": median,
            "ratio": {k: v / ms["plain"] for k, v in ms.items() if k != "plain"},
            "median_ratio": {k: v / median["plain"] for k, v in median.items() if k != "plain"},
            "flops": flops, "flop_ratio": {k: v / flops["plain"] for k, v in flops.items() if k != "plain"}}


def tensor_bytes(modules: list[nn.Module]) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        for t in [*module.parameters(), *module.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def bench_memory(model_name: str, root: Path, rank: int, classes: int = 10) -> dict[str, Any]:
    """Bytes of tensors held after adding one task, against the adapter's and head's own parameter bytes."""
    source = backbone(model_name, classes)
    arcvit.apply_arc(source, arcvit.ARCConfig(rank=rank))
    arcvit.save_adapter(source, root / "one")
    adapter_bytes = sum(p.numel() * p.element_size() for n, p in source.named_parameters() if p.requires_grad)
    del source
    multi = MultiTask(backbone(model_name))
    before = tensor_bytes(multi.holdings())
    multi.add("one", root / "one")
    added = tensor_bytes(multi.holdings()) - before
    return {"model": MODELS.get(model_name, (model_name,))[0], "rank": rank, "classes": classes,
            "backbone_bytes": before, "added_bytes": added, "adapter_and_head_bytes": adapter_bytes}


# ---------------------------------------------------------------- load test
def serve_naive(args: argparse.Namespace) -> None:
    """(subprocess) The naive server: one merged model per task behind the same app."""
    from arcvit.serving import ServeSettings, serve
    model = SeparateModels(backbone(args.model))
    load_tasks(model, Path(args.serve_naive))
    serve(model, ServeSettings(adapters=Path(args.serve_naive)), port=args.port)


def start(command: list[str], url: str, log: Path) -> subprocess.Popen:
    """A server subprocess (one torch thread per process, like the benchmark), once /healthz answers."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            urllib_request("GET", url + "/healthz")
            return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{' '.join(command)}: no server:\n{log.read_text()}")


def urllib_request(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> dict:
    import urllib.request
    with urllib.request.urlopen(urllib.request.Request(url, body, headers or {}, method=method), timeout=120) as r:
        return json.loads(r.read())


def load_test(url: str, tasks: list[str], image: bytes, requests: int, concurrency: int) -> dict[str, Any]:
    """``requests`` POST /v1/predict at ``concurrency``, tasks drawn at random (fixed seed); stops by itself."""
    rng = random.Random(0)
    chosen = [rng.choice(tasks) for _ in range(requests)]
    errors, latencies, lock = [], [], threading.Lock()

    def one(task: str) -> None:
        body, kind = multipart({"task": task, "top_k": "5"}, {"image": image})
        start_time = time.perf_counter()
        try:
            urllib_request("POST", url + "/v1/predict", body, {"Content-Type": kind})
        except OSError as e:
            with lock:
                errors.append(repr(e))
            return
        with lock:
            latencies.append(time.perf_counter() - start_time)

    one(tasks[0])  # warm-up, not counted
    latencies.clear()
    start_time = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, chosen))
    wall = time.perf_counter() - start_time
    latencies.sort()
    return {"requests": requests, "concurrency": concurrency, "errors": len(errors), "wall_s": round(wall, 3),
            "requests_per_s": round(requests / wall, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 2),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2)}


def bench_load(model_name: str, root: Path, args: argparse.Namespace, image: bytes) -> dict[str, Any]:
    tasks = sorted(p.name for p in root.iterdir() if p.is_dir())
    weights = root.parent / f"{model_name}.safetensors"  # both servers build exactly the adapters' backbone
    write_safetensors(weights, backbone(model_name).state_dict())
    results, port = {}, free_port()
    servers = {
        "multitask": [*arcvit_command(), "serve", "--adapters", str(root), "--backbone",
                      MODELS[model_name][0].split(".")[0], "--checkpoint", str(weights), "--port", str(port)],
        "naive": [sys.executable, __file__, "--serve-naive", str(root), "--model", model_name,
                  "--port", str(port + 1)],
    }
    for i, (kind, command) in enumerate(servers.items()):
        url = f"http://127.0.0.1:{port + i}"
        process = start(command, url, root.parent / f"{kind}.log")
        try:
            results[kind] = load_test(url, tasks, image, args.requests, args.concurrency)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    return {"model": MODELS[model_name][0], "tasks": len(tasks), **results}


# ---------------------------------------------------------------- screenshot
def fashion_image() -> bytes:
    """A Fashion-MNIST test image from Debian's dataset-fashion-mnist, else a synthetic one."""
    import gzip
    import io

    from PIL import Image
    path = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
    if not path.is_file():
        return png_bytes(0)
    with gzip.open(path) as f:
        raw = f.read(16 + 28 * 28 * 2)[16 + 28 * 28:]  # the second test image (a pullover)
    buffer = io.BytesIO()
    Image.frombytes("L", (28, 28), raw).resize((112, 112), Image.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def write_screenshot_tasks(root: Path) -> None:
    """Three pico tasks; "fashion" is the shipped backbone's own Fashion-MNIST head under a zero adapter, so the
    page shows a real prediction next to two random-adapter tasks."""
    write_tasks("pico", root, 2, rank=8, seed=3)
    model = backbone("pico", 10)
    head = {k: v.clone() for k, v in model.get_classifier().state_dict().items()}
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=8, zero_head=False))
    model.get_classifier().load_state_dict(head)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and not name.startswith("head") and not name.startswith("arc."):
                p.zero_()
    arcvit.save_adapter(model, root / "fashion", extra={"class_names": FMNIST_CLASSES})


def screenshot(root: Path, out: Path) -> str:
    from playwright.sync_api import sync_playwright
    write_screenshot_tasks(root)
    image = root.parent / "pullover.png"
    image.write_bytes(fashion_image())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start([*arcvit_command(), "serve", "--adapters", str(root), "--port", str(port)], url,
                    root.parent / "screenshot.log")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(url + "/")
            page.wait_for_selector("#task option[value=fashion]", state="attached")
            page.set_input_files("#file", str(image))
            page.wait_for_selector('section.result[data-task="fashion"] .top1')
            path = out / "web_page.png"
            page.screenshot(path=str(path), full_page=True)
            browser.close()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    return path.name


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ---------------------------------------------------------------- report
def render(report: dict[str, Any]) -> str:
    lines = ["# Serving many tasks on one backbone (benchmarks/serve.py)", "",
             "Generated by `benchmarks/serve.py`; every ratio compares timings from this one run.", "",
             f"**Machine:** {', '.join(f'{k} {v}' for k, v in report['machine'].items())}.", ""]
    if report.get("note"):
        lines += [report["note"], ""]
    for lat in report["latency"]:
        lines += [f"## Latency: a batch of {lat['batch']} on {lat['model']} (ARC r={lat['rank']}, CPU)", "",
                  f"Plain timm model, batch of {lat['batch']}: **{lat['ms']['plain']:.1f} ms** (fastest of the "
                  f"{lat['rounds']} rounds; median {lat['median_ms']['plain']:.1f} ms). Cells: fastest round, its ratio to plain's, "
                  "and in brackets the ratio of the medians.", ""]
        methods = sorted({k.split("/")[0] for k in lat["ratio"] if "/" in k})
        rows = [[m, *(f"{lat['ms'][f'{m}/{s}']:.1f} ms, {lat['ratio'][f'{m}/{s}']:.3f}x "
                      f"({lat['median_ratio'][f'{m}/{s}']:.3f}x)" for s in SPREADS)] for m in methods]
        lines += [md_table(["routing", *(f"{s} task{'s' * (s > 1)}" for s in SPREADS)], rows), ""]
        verdicts = [f"{m} {lat['ratio'][f'{m}/16']:.3f}x ({'met' if lat['ratio'][f'{m}/16'] <= GOAL else 'NOT met'})"
                    for m in methods]
        lines += [f"Goal <= {GOAL:.2f}x plain at 16 tasks: {'; '.join(verdicts)}. MultiTask routes with `bmm` "
                  "(the core's).", "", *floor_lines(lat), ""]
    lines += ["## Memory added per task", "", md_table(
        ["backbone", "rank", "classes", "backbone bytes", "added by one task", "adapter + head parameters"],
        [[m["model"], str(m["rank"]), str(m["classes"]), f"{m['backbone_bytes'] / 2**20:.1f} MiB",
          f"{m['added_bytes'] / 2**20:.3f} MiB", f"{m['adapter_and_head_bytes'] / 2**20:.3f} MiB"]
         for m in report["memory"]]), ""]
    for load in report["load"]:
        lines += [f"## Load test: {load['model']}, {load['tasks']} tasks, 127.0.0.1", "", md_table(
            ["server", "requests", "concurrency", "errors", "requests/s", "p50", "p99"],
            [[kind, str(r["requests"]), str(r["concurrency"]), str(r["errors"]), f"{r['requests_per_s']:.1f}",
              f"{r['p50_ms']:.0f} ms", f"{r['p99_ms']:.0f} ms"]
             for kind, r in load.items() if isinstance(r, dict)]),
            "", "multitask: `arcvit serve` (one backbone, adapters routed per image); naive: one merged model per "
            "task behind the same app (arcvit.serving.SeparateModels).", ""]
    if report.get("screenshot"):
        lines += ["## The web page", "", f"![the web page after a prediction]({report['screenshot']})", ""]
    return "\n".join(lines)


def floor_lines(lat: dict[str, Any]) -> list[str]:
    """What no routing can undercut: one adapter unrouted, timed, and the arithmetic of each forward."""
    flops, ratio = lat["flops"], lat["flop_ratio"]
    lines = [f"One adapter, not routed (task00's adapter active on the timm model, as a single-task model runs): "
             f"{lat['ms']['unrouted']:.1f} ms, {lat['ratio']['unrouted']:.3f}x "
             f"({lat['median_ratio']['unrouted']:.3f}x). Arithmetic (torch FlopCounterMode, attention included): "
             f"plain {flops['plain'] / 1e9:.2f} GFLOP per batch; one adapter {ratio['unrouted']:.3f}x; the 16-task "
             f"mixed batch {ratio['bmm/16']:.3f}x (every image through both positions; arc_att tasks' MLP codes are "
             "zeros)."]
    if ratio["unrouted"] > GOAL:
        lines.append(f"The goal is below this adapter's own arithmetic here: at r={lat['rank']} the adapter adds "
                     f"{100 * (ratio['unrouted'] - 1):.1f}% to the plain forward's FLOPs before any routing.")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("docs/serve"))
    p.add_argument("--models", default="pico,pico:16,vit_small",
                   help="comma-separated: pico, vit_small; NAME:RANK measures at that rank instead of --rank")
    p.add_argument("--rank", type=int, default=50)
    p.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS alike)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per model, at least")
    p.add_argument("--budget-s", type=float, default=60.0,
                   help="more rounds while a model's rounds took under this many seconds")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--load-models", default="pico", help="models for the load test")
    p.add_argument("--memory-models", default="pico,vit_small,vit_base_patch16_224")
    p.add_argument("--no-screenshot", action="store_true")
    p.add_argument("--note", default="", help="a line for the report (e.g. the machine was shared)")
    p.add_argument("--serve-naive", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.serve_naive:
        return serve_naive(args)
    report: dict[str, Any] = {"machine": machine(torch.device("cpu")), "note": args.note, "latency": [],
                              "memory": [], "load": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for entry in args.models.split(","):
            name, _, rank = entry.partition(":")
            folder = tmp / f"latency_{name}_{rank or args.rank}"
            report["latency"].append(bench_latency(name, int(rank or args.rank), folder, args))
            print(json.dumps(report["latency"][-1]), flush=True)
        for name in args.memory_models.split(","):
            report["memory"].append(bench_memory(name, tmp / f"memory_{name}", args.rank))
            print(json.dumps(report["memory"][-1]), flush=True)
        for name in filter(None, args.load_models.split(",")):
            root = tmp / f"load_{name}" / "tasks"
            write_tasks(name, root, max(SPREADS), args.rank)
            report["load"].append(bench_load(name, root, args, fashion_image()))
            print(json.dumps(report["load"][-1]), flush=True)
        if not args.no_screenshot:
            args.out.mkdir(parents=True, exist_ok=True)
            report["screenshot"] = screenshot(tmp / "screenshot" / "tasks", args.out)
    write_json(args.out / "serve_cpu.json", report)
    write_text(args.out / "serve_cpu.md", render(report))
    print(render(report))


if __name__ == "__main__":
    main()
