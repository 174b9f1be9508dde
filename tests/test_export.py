"""`arcvit export`: ONNX files of the merged model and of the many-task model, checked against PyTorch, run
with ONNX Runtime by `predict --onnx` and `serve --onnx`.

Every comparison here is made by the test itself (fresh images, the model the file came from), not read from
the file's own check. The default run exports the shipped pico ViT (merged and many-task) through the real
command; the tiny timm ViT / Swin / transformers ViT round trips and int8 on a real split are marked slow.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from conftest import arcvit_command, subprocess_env  # noqa: E402
from serving_support import BACKBONE, TASKS, Server, free_port, make_adapters, png_bytes  # noqa: E402

import arcvit  # noqa: E402
from arcvit.cli import main  # noqa: E402
from arcvit.core.arc import backbone_fingerprint  # noqa: E402
from arcvit.export import check as export_check  # noqa: E402
from arcvit.export.graphs import ManyTasks, SingleTask, many_tasks, task_entry  # noqa: E402
from arcvit.export.metadata import describe  # noqa: E402
from arcvit.export.session import OnnxModel, read_metadata  # noqa: E402
from arcvit.export.writer import Job, export_onnx  # noqa: E402
from arcvit.serving import MultiTask  # noqa: E402

torch.set_num_threads(1)
REL = export_check.TOLERANCE


def assert_matches(expected: torch.Tensor, actual: torch.Tensor) -> None:
    """The issue's tolerance: max |dlogit| <= 1e-4 x max |logit| over finite logits, the same -inf, same argmax."""
    finite = torch.isfinite(expected)
    assert torch.equal(finite, torch.isfinite(actual))
    scale = expected[finite].abs().max()
    assert (expected[finite] - actual[finite]).abs().max() <= REL * scale
    assert torch.equal(expected.argmax(-1), actual.argmax(-1))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return make_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def exported(adapters, tmp_path_factory) -> dict[str, Path]:
    """The pico 'digits' adapter exported merged, and every task in one many-task graph, by the real command."""
    root = tmp_path_factory.mktemp("onnx")
    files = {"merged": root / "digits.onnx", "many": root / "many.onnx"}
    for source, out in ((["--adapter", adapters / "digits"], files["merged"]),
                        (["--adapters", adapters], files["many"])):
        assert main(["export", *map(str, source), "--backbone", BACKBONE, "--out", str(out)]) == 0
    return files


def pico(num_classes: int = 0) -> torch.nn.Module:
    import timm
    return timm.create_model(BACKBONE, pretrained=True, num_classes=num_classes).eval()


def mixed_batch(count: int, tasks: int, size: int = 28, seed: int = 3) -> tuple[torch.Tensor, list[int]]:
    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    return images, [(i * 2 + 1) % tasks for i in range(count)]


def test_merged_file_equals_the_adapted_model_and_describes_itself(adapters, exported):
    adapted = arcvit.load_adapter(pico(TASKS["digits"][0]), adapters / "digits").eval()
    onnx = OnnxModel(exported["merged"])
    for count in (1, 6):  # the batch dimension is dynamic
        images, _ = mixed_batch(count, 1)
        with torch.no_grad():
            assert_matches(adapted(images), onnx.logits(images))
    meta = read_metadata(exported["merged"])
    assert meta["kind"] == "merged" and meta["arcvit_version"] == arcvit.__version__
    assert meta["inputs"] == ["pixel_values"] and meta["outputs"] == ["logits"]
    assert meta["preprocessing"]["input_size"] == [3, 28, 28] and meta["preprocessing"]["interpolation"] == "bicubic"
    assert meta["preprocessing"]["mean"] == list(adapted.pretrained_cfg["mean"])
    [task] = meta["tasks"]
    config = json.loads((adapters / "digits" / "adapter_config.json").read_text())
    assert task["class_names"] == [f"digits-{i}" for i in range(10)] and task["rank"] == 8
    assert meta["source"]["adapter_sha256"] == config["weights_sha256"]
    assert meta["source"]["backbone_fingerprint"] == config["backbone"]["fingerprint"]
    assert meta["backbone"]["weights_fingerprint"] == backbone_fingerprint(arcvit.merge(adapted))
    check = meta["check"]
    assert check["passed"] and [b["batch"] for b in check["batches"]] == [1, 8]
    assert all(b["max_abs_diff"] <= REL * b["max_abs_logit"] and b["argmax_equal"] for b in check["batches"])


def test_opset_23_uses_onnx_attention_and_still_matches(adapters, exported, tmp_path):
    """--opset 23: one Attention node per block instead of the decomposed matmuls and softmax, same logits; the
    default stays at opset 18, which more runtimes read."""
    import onnx
    out = tmp_path / "digits23.onnx"
    assert main(["export", "--adapter", str(adapters / "digits"), "--backbone", BACKBONE, "--opset", "23",
                 "--out", str(out)]) == 0
    opsets = {p.domain: p.version for p in onnx.load(str(out)).opset_import}
    default = {p.domain: p.version for p in onnx.load(str(exported["merged"])).opset_import}
    assert opsets[""] == 23 and default[""] == 18
    assert sum(n.op_type == "Attention" for n in onnx.load(str(out)).graph.node) == len(pico().blocks)
    images, _ = mixed_batch(5, 1)
    with torch.no_grad():
        assert_matches(OnnxModel(exported["merged"]).logits(images), OnnxModel(out).logits(images))


def test_many_task_graph_equals_multitask_on_a_mixed_batch(adapters, exported):
    """3 tasks: 10, 4 and 7 classes, ranks 8, 4, 6, arc_att beside arc; each row is its task's logits, -inf after."""
    multi = MultiTask(pico())
    for name in TASKS:
        multi.add(name, adapters / name)
    onnx = OnnxModel(exported["many"])
    names = [t["name"] for t in onnx.tasks]
    assert names == sorted(TASKS) and onnx.document["inputs"] == ["pixel_values", "task_ids"]
    assert [t["num_classes"] for t in onnx.tasks] == [TASKS[n][0] for n in names]
    for count in (1, 7):
        images, ids = mixed_batch(count, len(names))
        rows = multi.predict(images, [names[i] for i in ids])
        logits = onnx.logits(images, ids)
        assert logits.shape == (count, 10)
        for row, out, i in zip(rows, logits, ids):
            classes = onnx.tasks[i]["num_classes"]
            assert_matches(row[None], out[None, :classes])
            assert torch.isinf(out[classes:]).all() and (out[classes:] < 0).all()


def test_predict_onnx_prints_what_predict_adapter_prints(adapters, exported, tmp_path, capsys):
    images = []
    for seed in range(3):
        images.append(tmp_path / f"{seed}.png")
        images[-1].write_bytes(png_bytes(seed))
    code, by_adapter, _ = run_cli(capsys, "predict", "--adapter", adapters / "digits", "--backbone", BACKBONE,
                                  *images)
    assert code == 0
    code, by_onnx, err = run_cli(capsys, "predict", "--onnx", exported["merged"], *images)
    assert code == 0, err
    assert by_onnx == by_adapter and len(by_onnx.splitlines()) == 3
    code, many, _ = run_cli(capsys, "predict", "--onnx", exported["many"], images[0])
    lines = [json.loads(line) for line in many.splitlines()]
    assert code == 0 and [line["task"] for line in lines] == sorted(TASKS)
    assert {k: v for k, v in lines[0].items() if k != "task"} == json.loads(by_adapter.splitlines()[0])


def test_server_on_an_onnx_file_answers_the_documented_routes(exported, tmp_path):
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as handle:
        process = subprocess.Popen([*arcvit_command(), "serve", "--onnx", str(exported["many"]), "--port", str(port)],
                                   stdout=handle, stderr=subprocess.STDOUT, env=subprocess_env())
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 120
        while process.poll() is None and time.monotonic() < deadline:
            try:
                if server.request("GET", "/healthz", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert server.request("GET", "/healthz") == (200, {"status": "ok", "tasks": 3}), log.read_text()
        status, listed = server.request("GET", "/v1/tasks")
        assert status == 200 and [t["name"] for t in listed["tasks"]] == sorted(TASKS)
        shapes = next(t for t in listed["tasks"] if t["name"] == "shapes")
        assert shapes["method"] == "ARC_att" and shapes["class_names"] == [f"shapes-{i}" for i in range(4)]
        status, answer = server.predict(png_bytes(1), top_k=100)
        assert status == 200 and [len(r["top"]) for r in answer["results"]] == [10, 7, 4]
        assert all(abs(sum(c["prob"] for c in r["top"]) - 1) < 1e-4 for r in answer["results"])
        expected = OnnxModel(exported["many"])
        from PIL import Image
        x = expected.transform(Image.open(io.BytesIO(png_bytes(1))).convert("RGB"))[None]
        pets = expected.logits(x, [1])[0, :7].softmax(-1)
        status, answer = server.predict(png_bytes(1), task="pets", top_k=1)
        assert status == 200 and answer["results"][0]["top"][0]["label"] == int(pets.argmax())
        assert abs(answer["results"][0]["top"][0]["prob"] - float(pets.max())) < 1e-5
        for method in ("PUT", "DELETE"):
            status, error = server.request(method, "/v1/tasks/pets")
            assert status == 409 and "ONNX file many.onnx: its tasks are fixed" in error["error"]
        assert server.predict(png_bytes(1), task="nope") == (404, {"error": "task 'nope' is not loaded"})
        assert server.request("GET", "/metrics")[0] == 200 and server.request("GET", "/")[0] == 200
    finally:
        server.stop()


def test_a_failed_check_leaves_no_file(tmp_path, monkeypatch):
    """A small graph through the real exporter and check, with a tolerance no file can meet (the failure path)."""
    monkeypatch.setattr(export_check, "TOLERANCE", -1.0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5)).eval()
    images = torch.randn(4, 3, 4, 4)
    job = Job(SingleTask(model), {"kind": "merged"}, [{"pixel_values": images[:1]}, {"pixel_values": images}], "x")
    out = tmp_path / "never.onnx"
    with pytest.raises(arcvit.ArcvitError, match=f"{out}: not written: ONNX Runtime differs from PyTorch on a "
                                                 "batch of 1: max"):
        export_onnx(job, out)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- bad input


def _resnet_merged(path: Path) -> None:
    import timm

    from arcvit.core.merged_file import write_merged
    model = timm.create_model("resnet18", num_classes=3)
    write_merged(path, model.state_dict(), {"backbone": "resnet18", "num_classes": 3, "class_names": None,
                                            "task": None, "source_adapter": None})


BAD = {  # id -> (arguments after `export`, what the one line says)
    "other_backbone": (["--adapter", "{adapters}/digits", "--backbone", "vit_tiny_patch16_224", "--random-init",
                        "--out", "{tmp}/x.onnx"], "adapter was trained on vit_pico_patch7_28"),
    "unsupported_family": (["--merged", "{tmp}/resnet.safetensors", "--out", "{tmp}/x.onnx"],
                           "ResNet is not supported by ARC"),
    "out_exists": (["--adapter", "{adapters}/digits", "--backbone", BACKBONE, "--out", "{tmp}/old.onnx"],
                   "old.onnx: exists; pass --force to overwrite it"),
    "out_is_read": (["--adapter", "{adapters}/digits", "--backbone", BACKBONE, "--out",
                     "{adapters}/digits/adapter.safetensors", "--force"], "is a file export reads"),
    "unwritable": (["--adapter", "{adapters}/digits", "--backbone", BACKBONE, "--out", "/proc/arcvit/x.onnx"],
                   "/proc: folder is not writable"),
    "quantize_without_split": (["--adapter", "{adapters}/digits", "--backbone", BACKBONE, "--out", "{tmp}/x.onnx",
                                "--quantize", "int8"], "--quantize int8 needs an evaluation split"),
    "no_tasks": (["--adapters", "{tmp}/empty", "--backbone", BACKBONE, "--out", "{tmp}/x.onnx"],
                 "no task to export"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input(case, adapters, tmp_path, capsys):
    (tmp_path / "old.onnx").write_bytes(b"old")
    (tmp_path / "empty").mkdir()
    _resnet_merged(tmp_path / "resnet.safetensors")
    before = {p: p.read_bytes() for p in [*tmp_path.rglob("*"), *adapters.rglob("*")] if p.is_file()}
    argv, says = BAD[case]
    code, out, err = run_cli(capsys, "export", *[a.format(adapters=adapters, tmp=tmp_path) for a in argv])
    assert code == 1 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith("arcvit export: error: ") and says in err and "Traceback" not in err
    after = {p: p.read_bytes() for p in [*tmp_path.rglob("*"), *adapters.rglob("*")] if p.is_file()}
    assert after == before  # nothing written, nothing changed
    _log(case, err)


@pytest.mark.parametrize("command", ["export", "predict", "serve"])
def test_missing_export_extra_is_one_line(command, adapters, exported, tmp_path, capsys, monkeypatch):
    for module in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, module, None)  # `import onnx` now raises ImportError
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(0))
    argv = {"export": ["--adapter", adapters / "digits", "--out", tmp_path / "x.onnx"],
            "predict": ["--onnx", exported["merged"], image],
            "serve": ["--onnx", exported["merged"], "--port", str(free_port())]}[command]
    code, out, err = run_cli(capsys, command, *argv)
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert "pip install 'arcvit[export]'" in err and not (tmp_path / "x.onnx").exists()
    _log(f"missing_extra_{command}", err)


@pytest.mark.parametrize("case", ["not_onnx", "foreign_onnx", "missing"])
def test_predict_onnx_bad_file(case, exported, tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(0))
    path = tmp_path / "model.onnx"
    if case == "not_onnx":
        path.write_bytes(b"this is not a protobuf")
    elif case == "foreign_onnx":  # a valid ONNX model that `arcvit export` did not write
        import onnx
        proto = onnx.load(str(exported["merged"]))
        del proto.metadata_props[:]
        onnx.save(proto, str(path))
    code, out, err = run_cli(capsys, "predict", "--onnx", path, image)
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and str(path) in err
    _log(f"predict_{case}", err)


@pytest.mark.parametrize("argv,says", [
    (["serve", "--onnx", "{many}", "--merged", "digits"], "--merged TASK applies to --adapters"),
    (["predict", "--onnx", "{many}", "--recipe", "paper", "{image}"], "--onnx runs on the CPU with the preprocessing"),
], ids=["serve_merged", "predict_recipe"])
def test_flags_that_do_not_apply_to_an_onnx_file(argv, says, exported, tmp_path, capsys):
    image = tmp_path / "a.png"
    image.write_bytes(png_bytes(0))
    code, out, err = run_cli(capsys, *[a.format(many=exported["many"], image=image) for a in argv])
    assert code == 1 and out == "" and len(err.splitlines()) == 1 and says in err
    _log(f"flags_{argv[0]}", err)


def _log(case: str, err: str) -> None:
    """Append the observed message to $ARCVIT_BAD_INPUTS_LOG (the docs/bad-inputs.md rows come from it)."""
    import os
    if os.environ.get("ARCVIT_BAD_INPUTS_LOG"):
        with open(os.environ["ARCVIT_BAD_INPUTS_LOG"], "a") as f:
            f.write(json.dumps({"case": case, "stderr": err.strip()}) + "\n")


# --------------------------------------------------------------------------------------- slow: families


def _export(graph: torch.nn.Module, model: torch.nn.Module, out: Path, kind: str, tasks: list[dict],
            size: int, count: int = 6) -> OnnxModel:
    images, ids = mixed_batch(count, len(tasks), size)
    batch = (lambda x, i: {"pixel_values": x, "task_ids": torch.tensor(i)}) if kind == "many-task" else \
        (lambda x, i: {"pixel_values": x})
    job = Job(graph, describe(kind, model, {"name": type(model).__name__}, tasks, {}),
              [batch(images[:1], ids[:1]), batch(images, ids)], "generated")
    export_onnx(job, out)
    return OnnxModel(out)


def _family(family: str):
    from test_serve import FAMILIES
    return FAMILIES[family]


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "swin"])
def test_timm_families_merged_and_many_task(family, tmp_path):
    from test_serve import TASKS as SERVE_TASKS
    from test_serve import backbone, own_models, write_task
    size = _family(family)[2]
    for seed, (name, (classes, mode, rank)) in enumerate(SERVE_TASKS.items()):
        write_task(family, tmp_path / "tasks" / name, classes, mode, rank, seed)
    adapted, merged = own_models(family, tmp_path / "tasks" / "b")
    onnx = _export(SingleTask(merged).eval(), merged, tmp_path / "merged.onnx", "merged",
                   [{"name": "b", "num_classes": 7, "class_names": list("abcdefg")}], size)
    images, _ = mixed_batch(5, 1, size)
    with torch.no_grad():
        assert_matches(adapted(images), onnx.logits(images))

    folders = {name: tmp_path / "tasks" / name for name in SERVE_TASKS}
    graph, tasks = many_tasks(backbone(family), folders)
    multi = MultiTask(backbone(family))
    for name, folder in folders.items():
        multi.add(name, folder)
    onnx = _export(graph, graph.backbone, tmp_path / "many.onnx", "many-task", tasks, size)
    images, ids = mixed_batch(9, len(tasks), size)
    names = list(folders)
    for row, out, i in zip(multi.predict(images, [names[i] for i in ids]), onnx.logits(images, ids), ids):
        assert_matches(row[None], out[None, :tasks[i]["num_classes"]])


@pytest.mark.slow
def test_export_from_a_merged_checkpoint(adapters, exported, tmp_path, capsys):
    merged = tmp_path / "digits.safetensors"
    assert run_cli(capsys, "merge", "--adapter", adapters / "digits", "--backbone", BACKBONE, "--out", merged)[0] == 0
    code, stdout, err = run_cli(capsys, "export", "--merged", merged, "--out", tmp_path / "from_merged.onnx")
    assert code == 0, err
    meta = read_metadata(tmp_path / "from_merged.onnx")
    assert meta["source"]["merged"] == str(merged) and meta["tasks"][0]["class_names"][3] == "digits-3"
    assert meta["backbone"]["weights_fingerprint"] == read_metadata(exported["merged"])["backbone"]["weights_fingerprint"]
    images, _ = mixed_batch(5, 1)
    assert_matches(OnnxModel(exported["merged"]).logits(images), OnnxModel(tmp_path / "from_merged.onnx").logits(images))


@pytest.mark.slow
def test_transformers_vit_merged(tmp_path):
    transformers = pytest.importorskip("transformers")
    from arcvit.backends.transformers.heads import TransformersClassifier
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                                    patch_size=8, intermediate_size=64)
    model = TransformersClassifier(transformers.ViTModel(config).eval(), num_classes=5).eval()
    arcvit.apply_arc(model, arcvit.ARCConfig(rank=4, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    merged = arcvit.merge(model).eval()
    onnx = _export(SingleTask(merged).eval(), merged, tmp_path / "hf.onnx", "merged",
                   [task_entry("t", {"num_classes": 5})], 32)
    images, _ = mixed_batch(4, 1, 32)
    with torch.no_grad():
        assert_matches(model(images), onnx.logits(images))


@pytest.mark.slow
def test_quantize_int8_reports_its_top1_change_on_a_real_split(adapters, mini_data, tmp_path, capsys):
    out = tmp_path / "digits.onnx"
    code, stdout, err = run_cli(capsys, "export", "--adapter", adapters / "digits", "--backbone", BACKBONE,
                                "--out", out, "--quantize", "int8", "--data", mini_data, "--task", "mnist5k",
                                "--split", "test")
    assert code == 0, err
    summary = json.loads(stdout)
    int8 = summary["int8"]
    assert int8["out"] == str(tmp_path / "digits.int8.onnx") and int8["images"] == 100
    assert int8["top1_change"] == pytest.approx(int8["top1_int8"] - int8["top1_fp32"])
    assert int8["bytes"] < 0.6 * summary["bytes"]
    assert "the first images of split 'test'" in summary["check"]["images"]
    meta = read_metadata(tmp_path / "digits.int8.onnx")
    assert meta["quantization"]["fp32_file"] == "digits.onnx" and meta["quantization"]["images"] == 100
    # an existing int8 sibling is refused like --out itself
    (tmp_path / "again.int8.onnx").write_bytes(b"keep")
    code, _, err = run_cli(capsys, "export", "--adapter", adapters / "digits", "--backbone", BACKBONE, "--out",
                           tmp_path / "again.onnx", "--quantize", "int8", "--data", mini_data, "--task", "mnist5k")
    assert code == 1 and "again.int8.onnx: exists" in err and not (tmp_path / "again.onnx").exists()
    # many tasks, each checked and evaluated on its own task's split (found by its name under --data)
    tasks = make_adapters(tmp_path / "tasks", {"mnist5k": (10, "arc", 8), "shapes_count": (6, "arc_att", 4)})
    code, stdout, err = run_cli(capsys, "export", "--adapters", tasks, "--backbone", BACKBONE, "--out",
                                tmp_path / "many.onnx", "--quantize", "int8", "--data", mini_data)
    assert code == 0, err
    int8 = json.loads(stdout)["int8"]
    assert {k: v["images"] for k, v in int8["tasks"].items()} == {"mnist5k": 100, "shapes_count": 100}
    assert int8["images"] == 200 and -1 <= int8["top1_change"] <= 1


def test_many_task_graph_stacks_finite_heads():
    """The stacked heads are zero-padded (no infinite weight: int8 quantisation scales each tensor by its range);
    the -inf past a task's classes comes from its class count."""
    heads = [torch.nn.Linear(4, 3), torch.nn.Linear(4, 5, bias=False)]
    graph = ManyTasks(torch.nn.Identity(), ["a", "b"], heads)
    assert graph.weight.shape == (2, 5, 4) and graph.counts.tolist() == [3, 5]
    assert torch.equal(graph.bias[1], torch.zeros(5)) and torch.equal(graph.weight[0, :3], heads[0].weight)
    assert not graph.weight[0, 3:].any() and not graph.bias[0, 3:].any()
    assert all(bool(torch.isfinite(t).all()) for t in graph.buffers())
