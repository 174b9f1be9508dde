"""DDP: ``arcvit train --devices 2 --strategy ddp`` on CPU (gloo) must train exactly what one process does with
the same global batch.

Each of the two processes gets half of every global batch (a DistributedSampler with the run's seed, per-process
batch = batch_size / 2), DDP averages the gradients, so every optimizer step sees the gradient of the same 16
images as the single-process run. ARC's shared projections (one D per position, used by every block) are single
parameters that DDP keeps in sync; if the processes' copies drifted apart, rank 0's averaged gradients, its saved
adapter and the sharded validation accuracy would all move away from the one-process run. The data (160 images,
batch 16, 8 per process) divide evenly, so no sampler padding or partial batch can make the runs differ.
"""
from __future__ import annotations

import json

import pytest

DDP_TOLERANCE = 1e-5


def test_two_process_ddp_matches_one_process(reference_run, read_run, train_argv, arcvit_cli, tmp_path):
    out = tmp_path / "ddp"
    done = arcvit_cli(*train_argv(out, "--devices", "2", "--strategy", "ddp"), timeout=480)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Starting with 2 processes" in done.stdout + done.stderr
    settings = json.loads((out / "settings.json").read_text())
    assert settings["world_size"] == 2 and settings["train"]["strategy"] == "ddp"

    ddp = read_run(out)
    one = reference_run
    assert ddp.results == one.results  # test_top1, val_top1, selected epoch, counts
    assert [r["epoch"] for r in ddp.metrics] == [r["epoch"] for r in one.metrics]
    for a, b in zip(ddp.metrics, one.metrics):
        assert a["lr"] == b["lr"] and a["train_top1"] == b["train_top1"] and a["val_top1"] == b["val_top1"]
        # the loss is summed over the processes in float64 and rounded to 6 decimals: allow the last digit
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), abs=2e-6)
    diff = ddp.max_adapter_diff(one)
    assert diff <= DDP_TOLERANCE, f"DDP adapter differs from one process by {diff}"
    # the shared projections are saved once, with the same shapes: still shared, not one copy per block
    shared = [k for k in ddp.adapter if k.startswith("shared.")]  # adapter file v2 names
    assert shared and all(ddp.adapter[k].shape == one.adapter[k].shape for k in shared)
    print(f"DDP (2 gloo processes) vs 1 process: max adapter diff {diff:g}; test_top1 {ddp.results['test_top1']}")
