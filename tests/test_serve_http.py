"""`arcvit serve` over real HTTP: a uvicorn server in a subprocess on 127.0.0.1 (a free port), every route,
every bad input, the token, dynamic batching, SIGTERM with a request in flight, and the web page in a real
headless chromium (Playwright driving Debian's /usr/bin/chromium)."""
from __future__ import annotations

import asyncio
import http.client
import io
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from serving_support import BACKBONE, TASKS, make_adapters, png_bytes, reference, start_server

TOKEN = "s3cret-token"
CHROMIUM = Path("/usr/bin/chromium")
STOPPED = (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its graceful shutdown


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> Path:
    return make_adapters(tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="module")
def server(adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(adapters, root / "tasks")
    # A long batching window, so that concurrent requests surely share a batch; "digits" runs merged.
    server = start_server(root / "tasks", root / "server.log", "--token", TOKEN, "--max-wait-ms", "100",
                          "--max-upload-mb", "1", "--merged", "digits")
    yield server
    assert server.stop() in STOPPED, server.log.read_text()


def test_health_tasks_and_page(server):
    assert server.request("GET", "/healthz") == (200, {"status": "ok", "tasks": 3})
    status, body = server.request("GET", "/v1/tasks")
    assert status == 200
    listed = {t["name"]: t for t in body["tasks"]}
    assert set(listed) == set(TASKS)
    for name, (classes, mode, rank) in TASKS.items():
        assert listed[name] == {"name": name, "num_classes": classes, "method": "ARC_att" if mode == "arc_att"
                                else "ARC", "rank": rank, "backbone": "vit_pico_patch7_28",
                                "class_names": [f"{name}-{i}" for i in range(classes)]}
    status, page = server.request("GET", "/")
    assert status == 200 and "<html" in page and "v1/predict" in page


def test_predict_matches_each_tasks_merged_model(server, adapters):
    image = png_bytes(1)
    expected = reference(adapters, image)
    status, body = server.predict(image, "all")
    assert status == 200 and body["latency_ms"] > 0
    assert [r["task"] for r in body["results"]] == sorted(TASKS)  # folders load in name order
    for result in body["results"]:
        probs = expected[result["task"]]
        top = probs.topk(min(5, len(probs)))
        assert [e["label"] for e in result["top"]] == top.indices.tolist()
        assert [e["class"] for e in result["top"]] == [f"{result['task']}-{i}" for i in top.indices.tolist()]
        torch.testing.assert_close(torch.tensor([e["prob"] for e in result["top"]]), top.values,
                                   rtol=1e-4, atol=1e-6)
    status, body = server.predict(image, "shapes", top_k=2)
    assert status == 200 and len(body["results"]) == 1 and len(body["results"][0]["top"]) == 2
    assert body["results"][0]["top"][0]["label"] == int(expected["shapes"].argmax())


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server):
    tasks = [list(TASKS)[i % 3] for i in range(12)]
    alone = {i: server.predict(png_bytes(i), t, top_k=1)[1]["results"][0] for i, t in enumerate(tasks)}
    before = _batch_count(server)
    answers = {}

    def ask(i):
        answers[i] = server.predict(png_bytes(i), tasks[i], top_k=1)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(tasks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(tasks)):
        status, body = answers[i]
        assert status == 200
        assert body["results"][0]["top"][0]["label"] == alone[i]["top"][0]["label"]
        assert body["results"][0]["top"][0]["prob"] == pytest.approx(alone[i]["top"][0]["prob"], rel=1e-4)
    assert _batch_count(server) - before < len(tasks)  # some requests shared a backbone pass


def _batch_count(server) -> float:
    metrics = server.request("GET", "/metrics")[1]
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("arcvit_batch_size_count")))


def _announce_large_body(server, size: int) -> tuple[int, dict]:
    """Send only the headers of a ``size``-byte upload: the server must refuse it before any body arrives."""
    host, port = server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        connection.putrequest("POST", "/v1/predict")
        connection.putheader("Content-Type", "multipart/form-data; boundary=x")
        connection.putheader("Content-Length", str(size))
        connection.endheaders()
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_streamed_body_is_cut_off_at_the_cap():
    """Without a Content-Length, the cap holds while the body streams in (the ASGI layer, no network)."""
    from arcvit.serving.limits import BodyLimit, BodyTooLarge
    chunks = [{"type": "http.request", "body": b"x" * 400, "more_body": True} for _ in range(5)]
    seen = []

    async def app(scope, receive, send):
        while True:
            seen.append(len((await receive())["body"]))

    async def receive():
        return chunks.pop(0)

    with pytest.raises(BodyTooLarge, match="^upload is larger than 1000 bytes$"):
        asyncio.run(BodyLimit(app, max_bytes=1000)({"type": "http", "headers": []}, receive, None))
    assert seen == [400, 400]  # the third chunk passes the cap and never reaches the app


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buffer, format="PNG")  # 64 M pixels in ~60 kB
    return buffer.getvalue()


@pytest.mark.parametrize("case, expected", [
    ("garbage", 400), ("empty", 400), ("truncated", 400), ("no_image", 400), ("not_multipart", 400),
    ("too_large", 413), ("bomb", 413), ("unknown_task", 404), ("bad_top_k", 400)])
def test_bad_input_is_a_4xx_json_error_and_the_server_keeps_serving(server, case, expected):
    image = png_bytes(2)
    if case == "not_multipart":
        status, body = server.request("POST", "/v1/predict", b"{}", {"Content-Type": "application/json"})
    else:
        status, body = {
            "garbage": lambda: server.predict(b"this is not an image", "digits"),
            "empty": lambda: server.predict(b"", "digits"),
            "truncated": lambda: server.predict(image[: len(image) // 2], "digits"),
            "no_image": lambda: server.predict(None, "digits", other=image),
            "too_large": lambda: _announce_large_body(server, 2 << 20),
            "bomb": lambda: server.predict(_bomb(), "digits"),
            "unknown_task": lambda: server.predict(image, "nope"),
            "bad_top_k": lambda: server.predict(image, "digits", top_k="x"),
        }[case]()
    assert status == expected, body
    assert isinstance(body, dict) and body["error"]
    assert server.predict(image, "digits")[0] == 200


def test_metrics(server):
    server.predict(png_bytes(3), "pets")
    server.predict(png_bytes(3), "nope")
    status, text = server.request("GET", "/metrics")
    assert status == 200
    assert 'arcvit_requests_total{status="200",task="pets"}' in text
    assert 'arcvit_requests_total{status="404",task="unknown"}' in text
    assert "arcvit_request_latency_seconds_bucket" in text and "arcvit_batch_size_bucket" in text
    assert "arcvit_tasks 3.0" in text


def test_load_reload_unload_need_the_token(server):
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        for method in ("PUT", "DELETE"):
            status, body = server.request(method, "/v1/tasks/pets", headers=headers)
            assert status == 401 and "token" in body["error"]
    assert server.request("GET", "/healthz")[1]["tasks"] == 3
    assert server.request("DELETE", "/v1/tasks/pets", headers=auth) == (200, {"unloaded": "pets"})
    assert server.request("GET", "/healthz")[1]["tasks"] == 2
    assert server.predict(png_bytes(4), "pets")[0] == 404
    assert server.request("DELETE", "/v1/tasks/pets", headers=auth)[0] == 404
    status, body = server.request("PUT", "/v1/tasks/pets", headers=auth)
    assert status == 200 and body["loaded"]["num_classes"] == 7
    status, body = server.request("PUT", "/v1/tasks/digits", headers=auth)  # reload in place
    assert status == 200 and server.request("GET", "/healthz")[1]["tasks"] == 3
    assert server.predict(png_bytes(4), "pets")[0] == 200


@pytest.mark.parametrize("name", ["..", ".hidden", "all", "a%2F..%2Fb", "missing", "%2E%2E"])
def test_only_plain_folder_names_under_the_adapter_folder_load(server, name):
    status, body = server.request("PUT", f"/v1/tasks/{name}", headers={"Authorization": f"Bearer {TOKEN}"})
    assert 400 <= status < 500 and status != 401
    assert isinstance(body, dict) and body["error"]
    assert server.request("GET", "/healthz")[1]["tasks"] == 3


def test_a_corrupt_adapter_is_refused_and_the_others_keep_serving(server):
    root = Path(server.process.args[server.process.args.index("--adapters") + 1])
    shutil.copytree(root / "digits", root / "broken")
    weights = root / "broken" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    status, body = server.request("PUT", "/v1/tasks/broken", headers={"Authorization": f"Bearer {TOKEN}"})
    assert status == 400 and "checksum" in body["error"]
    assert server.request("GET", "/healthz")[1]["tasks"] == 3
    for name in TASKS:
        assert server.predict(png_bytes(5), name)[0] == 200


def test_sigterm_finishes_the_request_in_flight_and_binding_elsewhere_warns(adapters, tmp_path):
    # 127.0.0.2 is loopback too, but not the default address: the warning must show without exposing anything.
    server = start_server(adapters, tmp_path / "log", "--max-wait-ms", "1500", host="127.0.0.2")
    answer = {}
    thread = threading.Thread(target=lambda: answer.setdefault("r", server.predict(png_bytes(6), "digits")))
    thread.start()
    time.sleep(0.5)  # the request waits in its 1.5 s batching window
    assert server.stop() in STOPPED
    thread.join()
    assert answer["r"][0] == 200
    assert "without --token" in server.log.read_text()


@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed (scripts/setup.sh as root "
                                                    "installs it)")
def test_web_page_in_headless_chromium(server, tmp_path):
    from playwright.sync_api import sync_playwright
    image = tmp_path / "image.png"
    image.write_bytes(png_bytes(7))
    shown = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_selector("#task option[value=shapes]", state="attached")
            page.select_option("#task", "digits")
            page.set_input_files("#file", str(image))
            shown["digits"] = _top1(page, "digits")
            page.select_option("#task", "shapes")  # a new choice predicts again
            shown["shapes"] = _top1(page, "shapes")
            assert "latency" in page.inner_text("#latency")
        finally:
            browser.close()
    for task, (label, name) in shown.items():
        api = server.predict(image.read_bytes(), task)[1]["results"][0]["top"][0]
        assert (label, name) == (api["label"], api["class"])


def _top1(page, task: str) -> tuple[int, str]:
    top1 = page.wait_for_selector(f'section.result[data-task="{task}"] .top1')
    return int(top1.get_attribute("data-label")), top1.query_selector(".class").inner_text()


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_serve_refuses_bad_settings_with_one_line(arcvit_cli, tmp_path):
    for flags, message in ((["--adapters", str(tmp_path / "missing")], "no such folder"),
                           (["--adapters", str(tmp_path), "--max-batch", "0"], "--max-batch"),
                           (["--adapters", str(tmp_path), "--port", "70000"], "--port")):
        result = arcvit_cli("serve", "--backbone", BACKBONE, *flags)
        assert result.returncode == 1 and message in result.stderr
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
