"""`arcvit serve` against hostile and careless input (issue 23), class by class:

- resources: the pixel budget covers what the model's resize would allocate (a 1,000,000 x 1 PNG is refused
  from its header), decoding runs in a bounded pool, and one upload's worst-case memory stays within the
  documented bound (peak RSS of a fresh process, no wall clock);
- state: an adapter with NaN/inf is refused naming the tensor, a malformed config is reported and skipped at
  startup, one failing task never fails the others, and ``task=all`` racing a DELETE answers for every task it
  started with;
- boundary: PUT/DELETE check the Host header, numbers are ASCII digits within bounds, only the listed image
  formats are opened, links may not leave the adapter folder;
- and a bounded hostile load on a real `arcvit serve` (127.0.0.1): no 500, every valid request answered as the
  task's own model answers, memory growth within the documented bound.
"""
from __future__ import annotations

import contextlib
import http.client
import io
import json
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from serving_support import (
    BACKBONE,
    TASKS,
    Server,
    free_port,
    make_adapters,
    multipart,
    png_bytes,
    reference,
    start_server,
)

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"  # PIL opens this as EPS (Ghostscript)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return make_adapters(tmp_path_factory.mktemp("adapters"))


def image_bytes(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt, **save)
    return buffer.getvalue()


def with_nan(source: Path, target: Path, key: str) -> Path:
    """A copy of adapter folder ``source`` whose tensor ``key`` holds a NaN (checksum updated: a 'valid' file)."""
    from safetensors.torch import load_file, save_file

    from arcvit.fileio import sha256_file
    shutil.copytree(source, target)
    tensors = load_file(target / "adapter.safetensors")
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, target / "adapter.safetensors", metadata={"format": "arcvit-adapter"})
    _edit_config(target, lambda c: c.update(weights_sha256=sha256_file(target / "adapter.safetensors")))
    return target


def _edit_config(folder: Path, edit) -> None:
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


MALFORMED = {  # folder name -> how its adapter_config.json is broken
    "no-backbone": lambda c: c.pop("backbone"),
    "classes-text": lambda c: c.update(num_classes="10"),
    "rank-text": lambda c: c["arc_config"].update(rank="8"),
    "names-number": lambda c: c["extra"].update(class_names=7),
}


def malformed(source: Path, root: Path) -> list[str]:
    """Broken copies of ``source`` under ``root``: each MALFORMED edit, and a config nested 100,000 deep."""
    for name, edit in MALFORMED.items():
        shutil.copytree(source, root / name)
        _edit_config(root / name, edit)
    shutil.copytree(source, root / "deep")
    (root / "deep" / "adapter_config.json").write_text('{"format": "arcvit-adapter", "x": ' + "[" * 100_000
                                                       + "]" * 100_000 + "}")
    return [*MALFORMED, "deep"]


@contextlib.contextmanager
def in_process(app):
    """``app`` under a real uvicorn on 127.0.0.1, in a thread of this process (so a test can reach inside)."""
    import uvicorn
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    try:
        yield Server(f"http://127.0.0.1:{port}", None, None)
    finally:
        server.should_exit = True
        thread.join(60)


def pico_model(adapters: Path, tasks=TASKS):
    import timm

    from arcvit.serving import MultiTask
    model = MultiTask(timm.create_model(BACKBONE, pretrained=True, num_classes=0))
    for name in tasks:
        model.add(name, adapters / name)
    return model


def assert_answers(results: list[dict], expected: dict[str, torch.Tensor]) -> None:
    """Each result is its task's own merged model's top classes and probabilities."""
    for result in results:
        probs = expected[result["task"]]
        top = probs.topk(min(5, len(probs)))
        assert [e["label"] for e in result["top"]] == top.indices.tolist(), result
        torch.testing.assert_close(torch.tensor([e["prob"] for e in result["top"]]), top.values,
                                   rtol=1e-4, atol=1e-6)


# ---- 1. resources ---------------------------------------------------------------------------------------


def _pico_transform():
    import timm

    from arcvit.data.transforms import build_transform
    return build_transform(timm.create_model(BACKBONE, pretrained=True, num_classes=0), recipe="timm", train=False)


@pytest.mark.parametrize("backbone", [BACKBONE, "vit_tiny_patch16_224"])
def test_the_resize_plan_is_what_the_transform_allocates(backbone):
    import timm

    from arcvit.data.transforms import build_transform
    from arcvit.serving.pixels import ResizePlan, _steps
    transform = build_transform(timm.create_model(backbone, pretrained=backbone == BACKBONE, num_classes=0),
                                recipe="timm", train=False)
    plan = ResizePlan(transform)
    for size in ((300, 7), (7, 300), (1000, 1000), (5, 5), (640, 480)):
        image, most = Image.new("RGB", size), 0
        for step in _steps(transform):
            made = step(image)
            if isinstance(made, Image.Image) and made.size != image.size:  # a resize or crop allocated it
                most = max(most, made.size[0] * made.size[1])
            image = made
        assert plan.largest(size) == most, size
    assert plan.largest((1_000_000, 1)) > 10**8  # what a shorter-side resize of a 1,000,000 x 1 image asks for


def _peak_growth(run) -> int:
    """How far this process's peak resident memory rises while ``run()`` runs (Linux: VmHWM, reset first)."""
    import ctypes

    def read(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = read("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")
    run()
    return read("VmHWM:") - base


def test_a_thin_image_is_refused_before_any_big_allocation():
    from arcvit.serving.images import UploadError, decode_image
    from arcvit.serving.pixels import ResizePlan
    plan = ResizePlan(_pico_transform())
    data = image_bytes((1_000_000, 1))  # ~1 kB; resized for the pico model: 28,000,000 x 28 (2.4 GB as RGB)
    assert len(data) < 10_000
    caught = []

    def decode():
        with pytest.raises(UploadError, match="1000000x1") as e:
            decode_image(data, resized=plan.largest)
        caught.append(e.value)
    assert _peak_growth(decode) < 32 << 20
    assert caught[0].status == 422 and "1000000x1" in str(caught[0]) and "resized" in str(caught[0])


_WORST_CASE = r"""
import ctypes, io, json, sys
from pathlib import Path
import timm
from PIL import Image
from arcvit.data.transforms import build_transform
from arcvit.serving.images import MAX_PIXELS, decode_image
from arcvit.serving.pixels import ResizePlan

def read(field):
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
    return int(line.split()[1]) * 1024

def save(image, fmt, **kw):
    b = io.BytesIO(); image.save(b, format=fmt, **kw); return b.getvalue()

transform = build_transform(timm.create_model(sys.argv[1], pretrained=True, num_classes=0), recipe="timm",
                            train=False)
plan = ResizePlan(transform)
rotated = Image.new("RGB", (6000, 6000)); exif = rotated.getexif(); exif[0x0112] = 6
cases = {"rgba 6000x6000": lambda: save(Image.new("RGBA", (6000, 6000)), "PNG"),
         "16-bit grey 6000x6000": lambda: save(Image.new("I;16", (6000, 6000)), "PNG"),
         "rotated jpeg 6000x6000": lambda: save(rotated, "JPEG", exif=exif),
         "thinnest within the budget": lambda: save(Image.new("RGBA", (MAX_PIXELS // 28**2 * 2, 2)), "PNG")}
transform(decode_image(save(Image.new("RGB", (30, 30)), "PNG"), resized=plan.largest))  # warm up
out = {}
for name, make in cases.items():
    data = make()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = read("VmRSS:"); Path("/proc/self/clear_refs").write_text("5")
    x = transform(decode_image(data, resized=plan.largest))
    out[name] = [read("VmHWM:") - base, len(data), list(x.shape)]
    del x
print(json.dumps(out))
"""


@pytest.mark.slow  # ~30 s: four 36 M-pixel images encoded and decoded
def test_one_uploads_worst_case_memory_is_within_the_documented_bound():
    """Each upload at the edge of the budget, in a fresh process: peak RSS growth <= upload + 9 B x budget."""
    from conftest import subprocess_env

    from arcvit.serving.images import DECODE_BYTES_PER_PIXEL, MAX_PIXELS
    done = subprocess.run([sys.executable, "-c", _WORST_CASE, BACKBONE], capture_output=True, text=True,
                          env=subprocess_env(), timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.splitlines()[-1])
    for name, (growth, upload, shape) in measured.items():
        assert shape == [3, 28, 28]
        assert growth <= upload + DECODE_BYTES_PER_PIXEL * MAX_PIXELS, (name, growth)
    assert max(g for g, _, _ in measured.values()) > 4 * MAX_PIXELS  # the cases do reach the budget


def test_decoding_runs_in_a_bounded_pool(adapters):
    from arcvit.serving import ServeSettings, create_app
    model = pico_model(adapters, ["digits"])
    inside, most, lock = [0], [0], threading.Lock()
    plain = model.transform

    def counted(image):
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.2)  # long enough that an unbounded pool would overlap every request
        with lock:
            inside[0] -= 1
        return plain(image)
    model.transform = counted
    answers = []
    with in_process(create_app(model, ServeSettings(decode_workers=2))) as server:
        threads = [threading.Thread(target=lambda i=i: answers.append(server.predict(png_bytes(i), "digits")[0]))
                   for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert answers == [200] * 8 and most[0] <= 2


# ---- 2. state -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["shared.att.0", "site.0.att.bias", "head.weight", "head.bias"])
def test_a_non_finite_adapter_is_refused_naming_the_tensor(adapters, tmp_path, key):
    from arcvit.errors import AdapterFileError
    from arcvit.serving import load_tasks
    model = pico_model(adapters, ["digits"])
    folder = with_nan(adapters / "shapes", tmp_path / "root" / "nan", key)
    with pytest.raises(AdapterFileError, match=rf"tensor {key} holds non-finite"):
        model.add("nan", folder)
    assert list(model.tasks) == ["digits"]
    assert [e for e in load_tasks(model, tmp_path / "root") if f"tensor {key}" in e]
    assert list(model.tasks) == ["digits"]


def test_malformed_configs_are_reported_and_skipped_at_startup(adapters, tmp_path):
    from arcvit.serving import load_tasks
    root = tmp_path / "root"
    shutil.copytree(adapters / "digits", root / "digits")
    bad = malformed(adapters / "pets", root)
    model = pico_model(adapters, [])
    errors = load_tasks(model, root)
    assert list(model.tasks) == ["digits"]
    assert sorted(e.split("'")[1] for e in errors) == sorted(bad)
    assert all("adapter_config.json" in e for e in errors)


def test_one_failing_task_never_fails_the_others(adapters):
    from arcvit.serving import ServeSettings, create_app
    model = pico_model(adapters)
    image = png_bytes(3)
    expected = reference(adapters, image)
    with in_process(create_app(model, ServeSettings())) as server:
        with torch.no_grad():
            model._heads["pets"].weight[0, 0] = float("inf")  # pets now scores every image inf/NaN
        status, body = server.predict(image, "all")
        assert status == 200 and sorted(r["task"] for r in body["results"]) == ["digits", "shapes"]
        assert body["failed"][0]["task"] == "pets" and "not finite" in body["failed"][0]["error"]
        assert_answers(body["results"], expected)
        status, body = server.predict(image, "pets")
        assert status == 422 and "not finite" in body["error"]
        model._heads["pets"] = torch.nn.Linear(3, 7)  # pets' batches now raise inside the model
        status, body = server.predict(image, "all")
        assert status == 200 and [f["task"] for f in body["failed"]] == ["pets"]
        assert_answers(body["results"], expected)


def test_task_all_racing_a_delete_answers_for_every_task_it_started_with(adapters):
    from arcvit.serving import ServeSettings, create_app
    model = pico_model(adapters)
    entered, release, plain = threading.Event(), threading.Event(), model.transform

    def gated(image):
        entered.set()
        assert release.wait(60)
        return plain(image)
    model.transform = gated
    image = png_bytes(4)
    expected = reference(adapters, image)
    answer = {}
    with in_process(create_app(model, ServeSettings(adapters=adapters))) as server:
        asking = threading.Thread(target=lambda: answer.setdefault("all", server.predict(image, "all")))
        asking.start()
        assert entered.wait(60)  # the request holds its tasks and waits in decoding
        assert server.request("DELETE", "/v1/tasks/pets") == (200, {"unloaded": "pets"})
        assert "pets" not in [t["name"] for t in server.request("GET", "/v1/tasks")[1]["tasks"]]
        release.set()
        asking.join(60)
        status, body = answer["all"]
        assert status == 200 and sorted(r["task"] for r in body["results"]) == sorted(TASKS)
        assert_answers(body["results"], expected)
        assert server.predict(image, "pets")[0] == 404
        assert "pets" not in model._adapters  # gone from the backbone once its last request was answered


# ---- 3. boundary ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["١٢", "1_000", " 5 ", "+5", "5\n", "-1", "", "1e3", "nan", "inf", "0x10",
                                  "5.", ".5", "٥", "12345678901234567890", "0", "1001"])
def test_a_number_is_ascii_digits_within_bounds(text):
    from arcvit.errors import ConfigError
    from arcvit.serving.options import decimal_number, whole_number
    with pytest.raises(ConfigError, match="top_k: expected"):
        whole_number(text, "top_k", 1, 1000)
    if text not in ("0", "1001"):
        with pytest.raises(ConfigError, match="--max-wait-ms: expected"):
            decimal_number(text, "--max-wait-ms", 0, 10_000)


def test_good_numbers_parse():
    from arcvit.serving.options import decimal_number, whole_number
    assert [whole_number(t, "n", 1, 1000) for t in ("1", "007", "1000")] == [1, 7, 1000]
    assert [decimal_number(t, "n", 0, 100) for t in ("0", "2.5", "100")] == [0.0, 2.5, 100.0]


@pytest.mark.parametrize("flags, message", [
    (["--max-upload-mb", "١٢"], "--max-upload-mb: expected a number"),
    (["--max-upload-mb", "0"], "--max-upload-mb: expected a number from 0.01"),
    (["--max-wait-ms", "1_000"], "--max-wait-ms: expected"),
    (["--max-wait-ms", "nan"], "--max-wait-ms: expected"),
    (["--max-batch", "+5"], "--max-batch: expected"),
    (["--port", " 80"], "--port: expected"),
    (["--decode-workers", "0"], "--decode-workers: expected"),
    (["--token", ""], "--token: expected printable ASCII"),
    (["--token", "tökén"], "--token: expected printable ASCII"),
    (["--token", "two words"], "--token: expected printable ASCII"),
    (["--allowed-hosts", "evil.example:80"], "--allowed-hosts: 'evil.example:80' is not a host name"),
])
def test_serve_options_are_refused_with_one_line(tmp_path, capsys, flags, message):
    from arcvit.cli import main
    assert main(["serve", "--adapters", str(tmp_path), "--backbone", BACKBONE, *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("arcvit serve: error: ") and message in err and len(err.strip().splitlines()) == 1


def test_uploads_are_decoded_only_in_the_listed_formats():
    from arcvit.serving.images import FORMATS, UploadError, decode_image
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # PIL alone would take it (and run Ghostscript on load)
    with pytest.raises(UploadError, match="accepted format") as e:
        decode_image(EPS)
    assert e.value.status == 400
    for fmt in FORMATS:
        assert decode_image(image_bytes((9, 7), fmt=fmt)).size == (9, 7)
    ico = image_bytes((16, 16), fmt="ICO")
    assert Image.open(io.BytesIO(ico)).format == "ICO"
    with pytest.raises(UploadError, match="accepted format"):
        decode_image(ico)


def test_links_may_not_leave_the_adapter_folder(adapters, tmp_path):
    from arcvit.errors import ConfigError
    from arcvit.serving import load_tasks
    from arcvit.serving.tasks import task_folder
    root, outside = tmp_path / "root", tmp_path / "outside"
    shutil.copytree(adapters / "digits", outside)
    (root / "leaks").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter.safetensors"):
        (root / "leaks" / name).symlink_to(outside / name)
    shutil.copytree(adapters / "digits", root / "kept")
    (root / "inside").mkdir()  # links within the adapter folder are fine
    for name in ("adapter_config.json", "adapter.safetensors"):
        (root / "inside" / name).symlink_to(root / "kept" / name)
    (root / "loop").mkdir()
    (root / "loop" / "adapter_config.json").symlink_to(root / "loop" / "adapter_config.json")
    for name in ("leaks", "loop"):
        with pytest.raises(ConfigError, match="a link that leads"):
            task_folder(root, name)
    model = pico_model(adapters, [])
    errors = load_tasks(model, root)
    assert sorted(model.tasks) == ["inside", "kept"]
    assert len(errors) == 2 and all("a link that leads" in e for e in errors)


def test_the_default_host_names_follow_the_bound_address():
    from arcvit.serving.options import LOOPBACK, default_hosts
    assert default_hosts("127.0.0.1", None) == LOOPBACK
    assert default_hosts("192.0.2.7", None) == ("192.0.2.7", *LOOPBACK)
    assert default_hosts("0.0.0.0", None) == LOOPBACK  # a wildcard bind without a token: loopback names only
    assert default_hosts("0.0.0.0", "t0ken") is None  # with a token, the token is the check


def test_state_changing_routes_check_the_host_header(adapters):
    from arcvit.serving import ServeSettings, create_app
    model = pico_model(adapters)
    with in_process(create_app(model, ServeSettings(adapters=adapters))) as server:  # loopback names only
        for host in ("evil.example", "evil.example:80", "127.0.0.1.evil.example"):
            for method in ("PUT", "DELETE"):
                status, body = server.request(method, "/v1/tasks/pets", headers={"Host": host})
                assert status == 403 and "Host header" in body["error"]
        assert server.predict(png_bytes(1), "pets")[0] == 200  # nothing changed; reads need no name check
        assert server.request("DELETE", "/v1/tasks/pets", headers={"Host": "localhost:1"})[0] == 200
    settings = ServeSettings(adapters=adapters, allowed_hosts=("serve.example",))
    with in_process(create_app(model, settings)) as server:
        assert server.request("PUT", "/v1/tasks/pets")[0] == 403  # Host: 127.0.0.1:PORT is not listed
        assert server.request("PUT", "/v1/tasks/pets", headers={"Host": "serve.example"})[0] == 200


# ---- 4. a bounded hostile load on a real server ---------------------------------------------------------


def _send(server: Server, body: bytes | list[bytes], headers: dict) -> tuple[int, dict]:
    """A raw POST /v1/predict: ``body`` as one piece (with its Content-Length) or streamed in chunks."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        if isinstance(body, list):
            connection.request("POST", "/v1/predict", body=iter(body), headers=headers, encode_chunked=True)
        else:
            connection.request("POST", "/v1/predict", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    except (ConnectionError, http.client.HTTPException):  # the server may close on an oversized stream
        return 413, {"error": "connection closed"}
    finally:
        connection.close()


def _form(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, dict]:
    body, kind = multipart(fields, files)
    return body, {"Content-Type": kind}


def _rss(pid: int) -> int:
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


@pytest.mark.slow  # 20-45 s on a 2-core machine (three 36 M-pixel decodes, an 8000 x 8000 bomb built here)
def test_hostile_load(adapters, tmp_path):
    from arcvit.serving.images import DECODE_BYTES_PER_PIXEL, MAX_PIXELS
    from arcvit.serving.server import MAX_CONNECTIONS
    root = tmp_path / "tasks"
    shutil.copytree(adapters, root)
    with_nan(adapters / "digits", root / "nan", "site.1.att.scale")
    bad_configs = malformed(adapters / "pets", root)
    server = start_server(root, tmp_path / "server.log", "--max-upload-mb", "1", "--decode-workers", "1",
                          "--max-wait-ms", "20")
    try:
        log = server.log.read_text()
        for name in ["nan", *bad_configs]:
            assert f"task {name!r} not loaded" in log
        assert server.request("GET", "/healthz")[1]["tasks"] == len(TASKS)
        images = [png_bytes(i, size=(40 + i, 30)) for i in range(3)]
        expected = [reference(adapters, image) for image in images]
        for image in images:  # warm up: the RSS below is the running server's, not its start-up's
            assert server.predict(image, "all")[0] == 200
        before = _rss(server.process.pid)
        body, kind = multipart({"task": "digits"}, {"image": b"x" * (1 << 20)})
        actions = {  # name -> (call, the statuses it may get)
            "valid": (None, {200}),
            "pets": (lambda: server.predict(images[0], "pets"), {200, 404}),
            "announced too large": (lambda: _send(server, b"", {"Content-Type": kind,
                                                                "Content-Length": str(2 << 20)}), {413}),
            "streamed too large": (lambda: _send(server, [body[i:i + 65536] for i in range(0, len(body), 65536)],
                                                 {"Content-Type": kind}), {413}),
            "garbage": (lambda: server.predict(b"not an image", "digits"), {400}),
            "truncated": (lambda: server.predict(images[1][:60], "all"), {400}),
            "eps": (lambda: server.predict(EPS, "digits"), {400}),
            "thin": (lambda: server.predict(image_bytes((1_000_000, 1)), "all"), {422}),
            "bomb": (lambda: server.predict(image_bytes((8000, 8000), "L"), "digits"), {413}),
            "at the budget": (lambda: server.predict(image_bytes((6000, 6000), "RGBA"), "shapes"), {200}),
            "bad top_k": (lambda: server.predict(images[0], "digits", top_k="١٢"), {400}),
            "long task": (lambda: server.predict(images[0], "x" * 100_000), {400}),
            "task as a file": (lambda: _send(server, *_form({}, {"image": images[0], "task": b"digits"})), {400}),
            "unknown task": (lambda: server.predict(images[0], "nope"), {404}),
            "put nan": (lambda: server.request("PUT", "/v1/tasks/nan"), {400}),
            "put malformed": (lambda: server.request("PUT", f"/v1/tasks/{random.choice(bad_configs)}"), {400}),
            "put pets": (lambda: server.request("PUT", "/v1/tasks/pets"), {200}),
            "delete pets": (lambda: server.request("DELETE", "/v1/tasks/pets"), {200, 404}),
        }
        plan = [*actions] * 3 + ["valid"] * 40
        random.Random(0).shuffle(plan)
        outcomes: list[tuple[str, int, dict, int | None]] = []

        def work(names: list[str]) -> None:
            for name in names:
                if name == "valid":
                    i = len(outcomes) % len(images)
                    task = random.choice(["digits", "shapes", "all"])
                    status, answer = server.predict(images[i], task)
                    outcomes.append((f"valid {task}", status, answer, i))
                else:
                    status, answer = actions[name][0]()
                    outcomes.append((name, status, answer, None))
        threads = [threading.Thread(target=work, args=(plan[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        after = _rss(server.process.pid)
    finally:
        assert server.stop() in (0, -15), server.log.read_text()[-3000:]
    assert len(outcomes) == len(plan)
    for name, status, answer, i in outcomes:
        assert status < 500 and isinstance(answer, dict), (name, status, answer)
        if i is None:
            assert status in actions[name][1], (name, status, answer)
            continue
        assert status == 200, (name, answer)
        assert_answers(answer["results"], expected[i])
        if name == "valid all":
            assert {"digits", "shapes"} <= {r["task"] for r in answer["results"]} and "failed" not in answer
    # README, "Serving": per decode worker 9 B x the pixel budget; per connection twice its upload
    bound = 1 * DECODE_BYTES_PER_PIXEL * MAX_PIXELS + MAX_CONNECTIONS * 2 * (1 << 20)
    assert after - before <= bound, (after - before, bound)


@pytest.mark.parametrize("kind", ["MultiTask", "SeparateModels"])
def test_an_adapter_is_read_once_so_what_was_checked_is_what_serves(kind, tmp_path, monkeypatch):
    """The finiteness and config checks and the install see the same bytes: a folder rewritten between the two
    cannot slip unchecked weights in, because the files are read once."""
    import timm

    import arcvit.core.adapter_file as adapter_file
    import arcvit.serving as serving
    from arcvit.serving import multitask, separate
    adapters = make_adapters(tmp_path / "adapters")
    model = getattr(serving, kind)(timm.create_model(BACKBONE, pretrained=True, num_classes=0))
    reads = []

    def counted(directory):
        reads.append(Path(directory))
        return read(directory)
    read = adapter_file.read_adapter
    for module in (adapter_file, multitask, separate):
        monkeypatch.setattr(module, "read_adapter", counted)
    model.add("digits", adapters / "digits")
    assert reads == [adapters / "digits"]
