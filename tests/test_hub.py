"""`arcvit push` and ``hf-hub:ORG/NAME[@REVISION]`` through the real huggingface_hub client, against a Hub on
127.0.0.1 (tests/hub_server.py): push then pull predicts the same, a pinned commit survives later pushes, every
bad repo or unreachable Hub is one line, the card's numbers are the run's, and served tasks load from the Hub."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import TOKEN, FakeHub
from serving_support import BACKBONE, make_adapters, png_bytes

from arcvit.cli import main

TASK = {"digits": (10, "arc", 8)}
REPO = "org/digits"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A fresh Hub, its endpoint and an empty cache in the environment, a write token, no token file."""
    import huggingface_hub.constants
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two different adapters for one task (seeds 0 and 1), and images to label."""
    root = tmp_path_factory.mktemp("hub_adapters")
    images = []
    for seed in range(3):
        images.append(root / f"{seed}.png")
        images[-1].write_bytes(png_bytes(seed))
    return {"a": make_adapters(root / "a", TASK, seed=0) / "digits",
            "b": make_adapters(root / "b", TASK, seed=1) / "digits", "images": images}


def run(argv: list, capsys) -> tuple[int, list[str], list[str]]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def push(source: Path, capsys, *extra: str, repo: str = REPO) -> dict:
    code, out, err = run(["push", source, "--repo", repo, *extra], capsys)
    assert code == 0 and not err, err
    return json.loads(out[0])


def predict(source: str | Path, images: list[Path], capsys, *extra: str) -> tuple[int, list[dict], list[str]]:
    code, out, err = run(["predict", "--backbone", BACKBONE, "--adapter", source, *extra, *images], capsys)
    return code, [json.loads(line) for line in out], err


def one_line(code: int, err: list[str], *fragments: str) -> None:
    assert code == 1 and len(err) == 1 and "Traceback" not in err[0], err
    for fragment in fragments:
        assert fragment in err[0], err[0]


def test_push_then_pull_predicts_the_same_and_records_the_commit(hub, adapters, capsys):
    pushed = push(adapters["a"], capsys)
    commit = pushed["pushed"].rsplit("@", 1)[1]
    assert pushed["kind"] == "adapter" and len(commit) == 40
    assert set(hub.files(REPO)) == {"adapter_config.json", "adapter.safetensors", "arcvit.json", "README.md"}
    code, local, _ = predict(adapters["a"], adapters["images"], capsys)
    assert code == 0
    code, pulled, err = predict(f"hf-hub:{REPO}", adapters["images"], capsys)
    assert code == 0 and not err, err
    assert [{k: v for k, v in p.items() if k != "source"} for p in pulled] == local
    assert {p["source"] for p in pulled} == {f"hf-hub:{REPO}@{commit}"}


def test_a_pinned_commit_survives_a_later_push_and_a_branch_is_its_own(hub, adapters, capsys):
    first = push(adapters["a"], capsys)["pushed"]
    second = push(adapters["b"], capsys)["pushed"]
    branch = push(adapters["a"], capsys, "--revision", "v1")["pushed"]
    assert len({first, second, branch}) == 3
    images = adapters["images"]
    a, b = predict(adapters["a"], images, capsys)[1], predict(adapters["b"], images, capsys)[1]
    assert a != b
    for ref, expected in ((first, a), (f"hf-hub:{REPO}", b), (f"hf-hub:{REPO}@v1", a)):
        code, got, err = predict(ref, images, capsys)
        assert code == 0, err
        assert [{k: v for k, v in p.items() if k != "source"} for p in got] == expected, ref


def test_a_tampered_or_missing_file_is_refused_in_one_line(hub, adapters, capsys):
    push(adapters["a"], capsys)
    weights = hub.files(REPO)["adapter.safetensors"]
    tampered = hub.tamper(REPO, "adapter.safetensors", weights[:-4] + b"\0\0\0\0")
    code, _, err = predict(f"hf-hub:{REPO}", adapters["images"], capsys)
    one_line(code, err, f"hf-hub:{REPO}@{tampered}: adapter.safetensors: its SHA-256 differs", "tampered")
    missing = hub.remove(REPO, "adapter.safetensors")
    code, _, err = predict(f"hf-hub:{REPO}", adapters["images"], capsys)
    one_line(code, err, f"hf-hub:{REPO}@{missing}: adapter.safetensors is listed in arcvit.json but missing")


def test_unknown_repo_revision_and_private_repo_without_token(hub, adapters, capsys, monkeypatch):
    code, _, err = predict("hf-hub:org/nothing", adapters["images"], capsys)
    one_line(code, err, "hf-hub:org/nothing: no such repo on the Hub, or it is private", "HF_TOKEN")
    push(adapters["a"], capsys, "--private", repo="org/secret")
    code, _, err = predict(f"hf-hub:{REPO}@v9", adapters["images"], capsys)
    one_line(code, err, f"hf-hub:{REPO}@v9: no such repo")  # the repo itself does not exist yet
    push(adapters["a"], capsys)
    code, _, err = predict(f"hf-hub:{REPO}@v9", adapters["images"], capsys)
    one_line(code, err, f"hf-hub:{REPO}@v9: the repo has no revision 'v9'")
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = predict("hf-hub:org/secret", adapters["images"], capsys)
    one_line(code, err, "hf-hub:org/secret: no such repo on the Hub, or it is private and no token")
    code, _, err = run(["push", adapters["a"], "--repo", "org/other"], capsys)
    one_line(code, err, "--repo org/other: no write access", "HF_TOKEN")
    code, _, err = predict("hf-hub:org/a--b", adapters["images"], capsys)
    one_line(code, err, "hf-hub:org/a--b: not a Hub reference")


def test_an_unreachable_hub_uses_the_cache_or_says_so(hub, adapters, capsys, monkeypatch):
    import huggingface_hub.constants
    ref = push(adapters["a"], capsys)["pushed"]
    code, online, _ = predict(f"hf-hub:{REPO}", adapters["images"], capsys)
    assert code == 0
    hub.stop()  # unreachable: the cached commit of main is used
    for offline in (False, True):
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", offline)
        for source in (f"hf-hub:{REPO}", ref):
            code, got, err = predict(source, adapters["images"], capsys)
            assert code == 0 and not err and got == online, err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    code, _, err = predict(f"hf-hub:{REPO}@v1", adapters["images"], capsys)  # never pulled: not cached
    one_line(code, err, f"hf-hub:{REPO}@v1: not in the local cache and the Hub cannot be reached")


@pytest.mark.parametrize("backbone, fragments", [
    ("deit_tiny_patch16_224", ["adapter was trained on vit_pico_patch7_28 (VisionTransformer), not on "
                               "deit_tiny_patch16_224 (VisionTransformer)"]),
    ("vit_pico_patch7_28", ["the backbone weights differ from those the adapter was trained on (fingerprint"])])
def test_another_backbone_is_refused_naming_both(backbone, fragments, hub, adapters, capsys):
    ref = push(adapters["a"], capsys)["pushed"]
    code, _, err = run(["predict", "--backbone", backbone, "--random-init", "--adapter", f"hf-hub:{REPO}",
                        *adapters["images"]], capsys)
    one_line(code, err, f"{ref}: ", *fragments)


def test_a_repo_of_another_kind_is_named(hub, adapters, capsys, tmp_path):
    ref = push(adapters["a"], capsys)["pushed"]
    code, _, err = run(["merge", "--run", f"hf-hub:{REPO}", "--out", tmp_path / "m.safetensors"], capsys)
    one_line(code, err, f"{ref}: holds an adapter, not a run: pass it where an adapter is read (--adapter)")
    code, _, err = run(["push", tmp_path, "--repo", REPO], capsys)
    one_line(code, err, f"{tmp_path}: not an adapter folder, a run folder")


def test_merged_file_round_trip_records_the_pinned_source(hub, adapters, capsys, tmp_path):
    pushed = push(adapters["a"], capsys)["pushed"]
    merged = tmp_path / "merged.safetensors"
    code, out, err = run(["merge", "--backbone", BACKBONE, "--adapter", f"hf-hub:{REPO}", "--out", merged], capsys)
    assert code == 0, err
    assert json.loads(out[0])["source_adapter"] == pushed
    again = push(merged, capsys, repo="org/merged")
    assert again["kind"] == "merged" and set(hub.files("org/merged")) == {"merged.safetensors", "arcvit.json",
                                                                          "README.md"}
    code, from_hub, err = run(["predict", "--merged", "hf-hub:org/merged", *adapters["images"]], capsys)
    code_local, local, _ = run(["predict", "--merged", merged, *adapters["images"]], capsys)
    assert code == code_local == 0, err
    assert [{k: v for k, v in json.loads(line).items() if k != "source"} for line in from_hub] == \
        [json.loads(line) for line in local]


def test_serve_loads_a_task_from_the_hub_by_put_and_by_entry(hub, adapters, capsys):
    from fastapi.testclient import TestClient

    from arcvit.backends import create_backbone
    from arcvit.serving import MultiTask, ServeSettings, create_app
    ref = push(adapters["a"], capsys)["pushed"]
    model = MultiTask(create_backbone(BACKBONE, 0))
    with TestClient(create_app(model, ServeSettings(allowed_hosts=None))) as client:
        answer = client.put("/v1/tasks/digits", json={"source": f"hf-hub:{REPO}"})
        assert answer.status_code == 200 and answer.json()["source"] == ref
        assert answer.json()["loaded"]["num_classes"] == 10
        bad = client.put("/v1/tasks/x", json={"source": "hf-hub:org/nothing"})
        assert bad.status_code == 400 and "hf-hub:org/nothing: no such repo" in bad.json()["error"]
        assert client.put("/v1/tasks/x", content=b'{"source": 1}').status_code == 400
    other = MultiTask(create_backbone("deit_tiny_patch16_224", 0, pretrained=False))
    with TestClient(create_app(other, ServeSettings(allowed_hosts=None))) as client:
        refused = client.put("/v1/tasks/digits", json={"source": f"hf-hub:{REPO}"})
        assert refused.status_code == 400 and refused.json()["error"] == (
            f"{ref}: the adapter was trained on timm {BACKBONE.split('.')[0]} (VisionTransformer); this server's "
            "backbone is timm deit_tiny_patch16_224 (VisionTransformer)")
    local = MultiTask(create_backbone(BACKBONE, 0))
    local.add("digits", adapters["a"])
    x = torch.randn(2, 3, 28, 28)
    assert torch.equal(torch.stack(model.predict(x, ["digits"] * 2)), torch.stack(local.predict(x, ["digits"] * 2)))


def test_serve_entries_split_into_the_folder_and_hub_tasks(tmp_path):
    from argparse import Namespace

    from arcvit.cli.serve import _adapter_entries
    from arcvit.errors import ConfigError
    args = Namespace(adapters=[str(tmp_path), "cars=hf-hub:org/cars@v1"])
    _adapter_entries(args)
    assert args.adapters == str(tmp_path) and args.hub_tasks == {"cars": "hf-hub:org/cars@v1"}
    with pytest.raises(ConfigError, match="2 folders"):
        _adapter_entries(Namespace(adapters=["a", "b"]))


@pytest.mark.slow
def test_the_card_of_a_pushed_run_states_its_results_and_the_run_merges_from_the_hub(hub, reference_run, capsys,
                                                                                    tmp_path):
    pushed = push(reference_run.folder, capsys, repo="org/run")
    assert pushed["kind"] == "run"
    readme = hub.files("org/run")["README.md"].decode()
    meta = yaml.safe_load(readme.split("---")[1])
    results = json.loads((reference_run.folder / "results.json").read_text())
    assert meta["library_name"] == "arcvit"
    for key in ("backbone", "method", "task", "test_top1", "protocol", "seed", "trainable_params", "data_digest",
                "data_source"):
        assert meta["arcvit"].get(key) == results[key], key
    assert f"{100 * results['test_top1']:.1f} %" in readme and "hf-hub:org/run" in readme
    out = tmp_path / "merged.safetensors"
    code, lines, err = run(["merge", "--run", "hf-hub:org/run", "--out", out], capsys)
    assert code == 0, err
    assert json.loads(lines[0])["source_adapter"] == pushed["pushed"]


def test_help_imports_no_hub_code():
    """huggingface_hub itself comes with timm; arcvit's hub modules load only when a reference or push needs them."""
    import subprocess
    code = ("import sys\nfrom arcvit.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('HUB', [m for m in ('arcvit.hub.pull', 'arcvit.hub.push', 'arcvit.hub.stage') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HUB []" in done.stdout, done.stdout[-500:] + done.stderr[-500:]


# ---- hf-hub: read by eval, export and `serve --adapters NAME=hf-hub:...`, through the commands ------------------

def _without_source(lines: list[str]) -> list[dict]:
    """Each JSON line less the pinned ``source`` a Hub reference adds."""
    return [{k: v for k, v in json.loads(line).items() if k not in ("source", "source_adapter")} for line in lines]


def test_eval_reads_an_adapter_from_the_hub_as_from_its_folder(hub, adapters, capsys, tmp_path):
    pushed = push(adapters["a"], capsys)["pushed"]
    for label in range(10):  # an ImageFolder test split, one image per class of the 10-class adapter
        folder = tmp_path / "data" / "digits" / "test" / f"c{label}"
        folder.mkdir(parents=True)
        (folder / "0.png").write_bytes(png_bytes(label))
    data = ["--data", tmp_path / "data", "--task", "digits", "--layout", "folder", "--accelerator", "cpu"]
    code, from_hub, err = run(["eval", "--backbone", BACKBONE, "--adapter", f"hf-hub:{REPO}", *data], capsys)
    assert code in (0, None), err
    code, local, err = run(["eval", "--backbone", BACKBONE, "--adapter", adapters["a"], *data], capsys)
    assert code in (0, None), err
    assert pushed in from_hub[-1] and _without_source(from_hub[-1:]) == _without_source(local[-1:])


def test_export_reads_an_adapter_from_the_hub_and_predicts_as_the_adapter(hub, adapters, capsys, tmp_path):
    pushed = push(adapters["a"], capsys)["pushed"]
    out = tmp_path / "digits.onnx"
    code, lines, err = run(["export", "--backbone", BACKBONE, "--adapter", f"hf-hub:{REPO}", "--out", out], capsys)
    assert code in (0, None) and out.is_file(), err
    assert pushed in "\n".join(lines)
    code, onnx, err = run(["predict", "--onnx", out, *adapters["images"]], capsys)
    assert code in (0, None), err
    code, torch_answers, _ = predict(adapters["a"], adapters["images"], capsys)
    assert [a["label"] for a in _without_source(onnx)] == [a["label"] for a in torch_answers]
    for a, b in zip(_without_source(onnx), torch_answers):
        assert abs(a["prob"] - b["prob"]) <= 2e-4, (a, b)


def test_serve_takes_a_hub_entry_on_its_command_line(hub, adapters, capsys, tmp_path):
    """`arcvit serve --adapters digits=hf-hub:ORG/NAME`, a real process reaching the Hub through HF_ENDPOINT."""
    from serving_support import reference, start_server
    push(adapters["a"], capsys)
    (tmp_path / "folder").mkdir()  # the one adapter folder (none in it): the task comes from the Hub
    server = start_server(tmp_path / "folder", tmp_path / "serve.log", "--adapters", f"digits=hf-hub:{REPO}")
    try:
        status, body = server.request("GET", "/v1/tasks")
        assert status == 200 and [t["name"] for t in body["tasks"]] == ["digits"], body
        image = adapters["images"][0].read_bytes()
        status, body = server.predict(image, "digits")
        assert status == 200, body
        expected = reference(adapters["a"].parent, image, TASK)["digits"]
        best = body["results"][0]["top"][0]
        assert best["label"] == int(expected.argmax()) and abs(best["prob"] - float(expected.max())) <= 1e-4
    finally:
        server.stop()
