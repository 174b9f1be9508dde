"""Helpers for the serving tests: adapter folders for several tasks, a real `arcvit serve` process on a free
port, and a small HTTP client (urllib, multipart by hand) that returns (status, JSON) for any answer."""
from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from conftest import arcvit_command, subprocess_env
from PIL import Image

BACKBONE = "vit_pico_patch7_28.fmnist_arcvit"  # shipped weights: every process builds the same backbone
# name -> (classes, mode, rank): different class counts, both ARC modes, different ranks.
TASKS = {"digits": (10, "arc", 8), "shapes": (4, "arc_att", 4), "pets": (7, "arc", 6)}


def make_adapters(root: Path, tasks: dict = TASKS, seed: int = 0) -> Path:
    """One adapter folder per task under ``root``, with random (non-identity) adapters and heads."""
    import timm

    import arcvit
    torch.manual_seed(seed)
    for name, (classes, mode, rank) in tasks.items():
        model = timm.create_model(BACKBONE, pretrained=True, num_classes=classes)
        arcvit.apply_arc(model, arcvit.ARCConfig(rank=rank, mode=mode, dropout=0.0))
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * (0.3 if pname.startswith("head") else 0.1))
        arcvit.save_adapter(model, root / name, extra={"class_names": [f"{name}-{i}" for i in range(classes)]})
    return root


def reference(adapters: Path, image: bytes, tasks: dict = TASKS) -> dict[str, torch.Tensor]:
    """Each task's probabilities from its own merged model, computed here (not by the server)."""
    import timm

    import arcvit
    from arcvit.data.transforms import build_transform
    probs = {}
    for name, (classes, _, _) in tasks.items():
        model = arcvit.load_adapter(timm.create_model(BACKBONE, pretrained=True, num_classes=classes),
                                    adapters / name)
        model = arcvit.merge(model).eval()
        x = build_transform(model, recipe="timm", train=False)(Image.open(io.BytesIO(image)).convert("RGB"))
        with torch.no_grad():
            probs[name] = model(x[None]).softmax(-1)[0]
    return probs


def png_bytes(seed: int = 0, size: tuple[int, int] = (28, 28), mode: str = "L") -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], generator=g) * 255).to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(fields: dict[str, str], files: dict[str, bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{k}.png"\r\n'
              f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n" for k, data in files.items()]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 60) -> tuple[int, dict | str]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as response:
                status, raw, kind = response.status, response.read(), response.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            status, raw, kind = e.code, e.read(), e.headers.get("content-type", "")
        return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()

    def predict(self, image: bytes | None, task: str | None = None, top_k: int | str | None = None,
                **extra_files: bytes) -> tuple[int, dict]:
        fields = {k: str(v) for k, v in (("task", task), ("top_k", top_k)) if v is not None}
        files = {**({"image": image} if image is not None else {}), **extra_files}
        body, kind = multipart(fields, files)
        return self.request("POST", "/v1/predict", body, {"Content-Type": kind})

    def stop(self, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)


def start_server(adapters: Path | None, log: Path, *flags: str, host: str = "127.0.0.1") -> Server:
    """`arcvit serve` in a subprocess on a free port; returns once /healthz answers (or raises with the log).
    ``adapters`` None: ``flags`` name what is served (``--run``, ``--onnx``)."""
    port = free_port()
    source = ["--adapters", str(adapters)] if adapters is not None else []
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([*arcvit_command(), "serve", *source, "--backbone", BACKBONE,
                                    "--host", host, "--port", str(port), *flags],
                                   stdout=handle, stderr=subprocess.STDOUT, env=subprocess_env())
    server = Server(f"http://{host}:{port}", process, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if server.request("GET", "/healthz", timeout=5)[0] == 200:
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"arcvit serve did not start:\n{log.read_text()}")
