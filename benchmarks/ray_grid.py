"""The bench grid on Ray against the same grid one run after another: wall-time ratio and scheduling overhead.

Issue 21's goals on a 2-core machine, for the small grid (2 tasks x 2 methods x 2 seeds, 1 epoch, the shipped
pico ViT on the offline mini suite): with ``--ray`` and 2 workers at most 0.6x the sequential wall time, and at
most 1 s of scheduling overhead per run. It only reports; a goal missed is printed as ``NOT met``.

- sequential: ``arcvit bench`` as a user runs it (a fresh process, timed from outside);
- ray (local): the same with ``--ray``, which starts a local cluster and stops it (its start-up included);
- ray (joined): the same with ``--ray ADDRESS`` joining a 2-CPU cluster this script started beforehand;
Ray runs its workers at nice 15 (``RAY_worker_niceness``): on a machine that other work keeps busy they get a
fraction of the CPU that the sequential run, at nice 0, gets. ``--worker-niceness`` (default 0 here) makes the
comparison like for like; pass 15 to measure Ray's default.

- overhead: ``RayExecutor`` against ``InProcess`` on runs that train nothing (each writes a results file), in
  this process on the already-running cluster: (Ray's wall time x workers - in-process wall time) / runs, the
  worker-time each run costs beyond its own work (submitting, starting the task, shipping files, writing them).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GRID = ["--suite", "mini", "--tasks", "shapes_count", "mnist5k", "--methods", "linear", "arc", "--seeds", "0", "1",
        "--epochs", "1", "--accelerator", "cpu", "--quiet"]
WORKERS = 2


def _bench(out: Path, data: Path, *extra: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # RAY_worker_niceness: set in main()
    command = [str(Path(sys.executable).with_name("arcvit")), "bench", *GRID, "--data", str(data), "--out", str(out), *extra]
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def _top1(out: Path) -> list[tuple[str, str, str, str]]:
    with open(out / "results.csv", newline="") as f:
        return sorted((r["task"], r["method"], r["seed"], r["test_top1"]) for r in csv.DictReader(f))


def _write_result(data, cfg, folder: Path, progress: bool = False) -> dict:
    """A run that trains nothing: what the executor moves for a run, less the training."""
    from arcvit.fileio import write_json
    results = {"test_top1": 0.0, "trainable_params": 0, "wall_time_s": 0.0}
    write_json(folder / "results.json", results)
    return results


def _overhead(work: Path, runs: int) -> dict[str, float]:
    from arcvit.bench.executors import InProcess, RunJob
    from arcvit.bench.ray_executor import RayExecutor
    from arcvit.training.config import TrainConfig

    def timed(executor, name: str) -> float:
        jobs = [RunJob(str(i), None, TrainConfig(), work / name / str(i)) for i in range(runs)]
        start = time.perf_counter()
        executor.run(jobs, _write_result, lambda job: None, lambda job, outcome: None)
        return time.perf_counter() - start
    timed(RayExecutor(), "warm-up")  # the first tasks also start the worker processes
    local, ray = timed(InProcess(), "in_process"), timed(RayExecutor(), "ray")
    return {"runs": runs, "in_process_s": local, "ray_s": ray, "per_run_s": (ray * WORKERS - local) / runs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="a new folder for the data and the benches")
    p.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    p.add_argument("--noop-runs", type=int, default=32)
    p.add_argument("--worker-niceness", type=int, default=0, help="Ray workers' nice value (Ray's default: 15)")
    args = p.parse_args()
    os.environ["RAY_worker_niceness"] = str(args.worker_niceness)  # for the clusters started here and by --ray
    import ray

    from arcvit.data.mini import build_mini_suite
    data = args.work / "data"
    build_mini_suite(data, ["shapes_count", "mnist5k"])  # the test size `arcvit bench` builds (500)
    figures = {"worker_niceness": args.worker_niceness, "sequential_s": _bench(args.work / "sequential", data)}
    figures["ray_local_s"] = _bench(args.work / "ray_local", data, "--ray")
    ray.init(num_cpus=WORKERS, include_dashboard=False)
    try:
        address = ray.get_runtime_context().gcs_address
        figures["ray_joined_s"] = _bench(args.work / "ray_joined", data, "--ray", address)
        figures["overhead"] = _overhead(args.work / "noop", args.noop_runs)
    finally:
        ray.shutdown()
    same = _top1(args.work / "sequential") == _top1(args.work / "ray_local") == _top1(args.work / "ray_joined")
    figures |= {"same_results": same, "ratio_local": figures["ray_local_s"] / figures["sequential_s"],
                "ratio_joined": figures["ray_joined_s"] / figures["sequential_s"]}
    for key, goal in (("ratio_local", 0.6), ("ratio_joined", 0.6)):
        print(f"{key}: {figures[key]:.2f}x ({'met' if figures[key] <= goal else 'NOT met'}, goal <= {goal}x)")
    per_run = figures["overhead"]["per_run_s"]
    print(f"scheduling overhead: {per_run:.3f} s per run ({'met' if per_run <= 1 else 'NOT met'}, goal <= 1 s)")
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
