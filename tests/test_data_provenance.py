"""Provenance: a run records the manifest digest of its task's data (or "unverified"), and a bench report shows
each task's data and refuses to put runs of one task on different data in one table."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from arcvit.bench.report import run_dir
from arcvit.bench.runner import run_bench
from arcvit.cli import main
from arcvit.data.manifest import read_manifest
from arcvit.data.writers import write_vtab_task
from arcvit.errors import DataError

TRAIN = ["--backbone", "vit_pico_patch7_28", "--random-init", "--task", "kitti", "--epochs", "1",
         "--warmup-epochs", "0", "--batch-size", "4", "--accelerator", "cpu", "--quiet"]


def test_train_records_the_manifest_digest_or_unverified(tmp_path, capsys):
    rng = np.random.default_rng(0)
    write_vtab_task(tmp_path / "plain/kitti", {s: (rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8),
                                                   rng.integers(0, 4, n)) for s, n in
                                               (("train800", 8), ("val200", 4), ("test", 4))})
    assert main(["data", "prepare", "vtab1k", "--source", "archive", str(tmp_path / "plain"), "--out",
                 str(tmp_path / "root"), "--tasks", "kitti", "--any-size", "--quiet"]) == 0
    entry = read_manifest(tmp_path / "root")["tasks"]["kitti"]
    for data, digest, source in ((tmp_path / "root", entry["digest"], entry["source"]),
                                 (tmp_path / "plain", "unverified", None)):
        out = tmp_path / f"run_{data.name}"
        assert main(["train", "--data", str(data), *TRAIN, "--out", str(out)]) == 0, capsys.readouterr().err
        settings = json.loads((out / "settings.json").read_text())
        results = json.loads((out / "results.json").read_text())
        assert settings["data_manifest"] == {"digest": digest, "source": source}
        assert (results["data_digest"], results["data_source"]) == (digest, source)
    assert source is None and entry["source"].startswith("folder ")


def _run(out: Path, seed: int, digest: str, source: str) -> None:
    folder = run_dir(out, "kitti", "linear", seed)
    folder.mkdir(parents=True)
    settings = {"backbone": "vit_pico_patch7_28", "checkpoint": None, "pretrained": False,
                "data": {"splits": {"train": "train800val200", "test": "test"}},
                "train": {"method": "linear", "seed": seed, "protocol": "final", "lr": 0.01},
                "data_manifest": {"digest": digest, "source": source}}
    results = {"task": "kitti", "method": "linear", "seed": seed, "test_top1": 0.5 + seed / 10,
               "trainable_params": 10, "protocol": "final", "data_digest": digest, "data_source": source}
    (folder / "settings.json").write_text(json.dumps(settings))
    (folder / "results.json").write_text(json.dumps(results))


def test_report_names_the_data_and_refuses_mixed_digests(tmp_path, capsys):
    _run(tmp_path, 0, "a" * 64, "archive vtab-1k.zip sha256:1234")
    _run(tmp_path, 1, "a" * 64, "archive vtab-1k.zip sha256:1234")
    assert main(["report", str(tmp_path), "--suite", "vtab1k"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "| kitti | aaaaaaaaaaaa | archive vtab-1k.zip sha256:1234 | 2 |" in report
    assert json.loads((tmp_path / "results.json").read_text())["runs"][0]["data_digest"] == "a" * 64
    capsys.readouterr()

    _run(tmp_path, 2, "unverified", None)  # one more seed, from another copy of the data
    before = (tmp_path / "report.md").read_text()
    assert main(["report", str(tmp_path), "--suite", "vtab1k"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "task kitti: runs on different data (manifest digests aaaaaaaaaaaa (2 run(s)" in err[0]
    assert "unverified (1 run(s), e.g. runs/kitti/linear/seed2)" in err[0] and "--allow-mixed-data" in err[0]
    assert (tmp_path / "report.md").read_text() == before  # the report was not rebuilt

    assert main(["report", str(tmp_path), "--suite", "vtab1k", "--allow-mixed-data"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "**Mixed data (allowed by --allow-mixed-data):** the runs of kitti used different data" in report
    assert "| kitti | unverified | – | 1 |" in report


def test_bench_refuses_a_second_copy_of_the_data_before_training(tmp_path, capsys):
    """A vtab1k bench on a prepared root; the task is prepared again from changed bytes (another digest): a bench
    of one more seed into the same folder stops at its first report, before training; --allow-mixed-data runs it
    and the report says so."""
    rng = np.random.default_rng(1)
    splits = {s: (rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8), rng.integers(0, 4, n))
              for s, n in (("train800", 8), ("val200", 4), ("test", 4))}
    write_vtab_task(tmp_path / "plain/kitti", splits)
    prepare = ["data", "prepare", "vtab1k", "--source", "archive", str(tmp_path / "plain"), "--out",
               str(tmp_path / "root"), "--tasks", "kitti", "--any-size", "--quiet"]
    assert main(prepare) == 0
    bench = dict(data=tmp_path / "root", tasks=["kitti"], methods=["linear"], backbone="vit_pico_patch7_28",
                 pretrained=False, progress=False, overrides={"recipe": "timm", "epochs": 1, "warmup_epochs": 0,
                                                              "batch_size": 4, "accelerator": "cpu"})
    out = run_bench("vtab1k", tmp_path / "bench", seeds=[0], **bench)
    first = read_manifest(tmp_path / "root")["tasks"]["kitti"]["digest"]
    assert f"| kitti | {first[:12]} | folder " in (out / "report.md").read_text()

    splits["test"][0][0] ^= 1  # one pixel of one test image
    write_vtab_task(tmp_path / "plain/kitti", splits)
    assert main(prepare + ["--force"]) == 0
    assert read_manifest(tmp_path / "root")["tasks"]["kitti"]["digest"] != first
    with pytest.raises(DataError, match="task kitti: runs on different data"):
        run_bench("vtab1k", out, seeds=[1], **bench)
    assert not (run_dir(out, "kitti", "linear", 1) / "results.json").exists()
    run_bench("vtab1k", out, seeds=[1], allow_mixed_data=True, **bench)
    assert "Mixed data (allowed by --allow-mixed-data)" in (out / "report.md").read_text()
    capsys.readouterr()
