"""The HTTP API and web page over a MultiTask model (FastAPI): an app factory, no global state.

Routes: ``GET /`` (the page), ``GET /healthz``, ``GET /v1/tasks``, ``POST /v1/predict``,
``PUT|DELETE /v1/tasks/{name}`` (load, reload or unload an adapter folder; need the token when one is set) and
``GET /metrics``. Every error answers a JSON ``{"error": ...}``. The only state is the read-only model, so
capacity grows by running more replicas on the same adapter folder.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from arcvit.errors import ArcvitError
from arcvit.serving.batching import Batcher
from arcvit.serving.images import UploadError, decode_image
from arcvit.serving.limits import BodyLimit, BodyTooLarge
from arcvit.serving.metrics import ServeMetrics
from arcvit.serving.tasks import ALL, TaskInfo, UnknownTask, task_folder


@dataclass(frozen=True)
class ServeSettings:
    adapters: Path | None = None  # the folder PUT /v1/tasks/{name} loads from (None: no reloading)
    token: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 10.0


def create_app(model, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """A FastAPI app serving ``model`` (a MultiTask: ``tasks``, ``add``, ``remove``, ``predict``, ``transform``)."""
    metrics = ServeMetrics()
    metrics.tasks.set(len(model.tasks))
    batcher = Batcher(lambda images, tasks: _run_batch(model, images, tasks), settings.max_batch,
                      settings.max_wait_ms, on_batch=metrics.batch_size.observe)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="arcvit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 2**20))
    _add_error_handlers(app)
    _add_model_routes(app, model, settings, metrics)
    _add_predict_route(app, model, batcher, metrics)
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _status_of(e: Exception) -> int:
    """The HTTP status an exception answers with: 4xx for anything the client got wrong, else 500."""
    if isinstance(e, HTTPException):
        return e.status_code
    if isinstance(e, RequestValidationError):
        return 422
    if isinstance(e, ArcvitError):
        return getattr(e, "status", 400)
    return 500


def _add_error_handlers(app: FastAPI) -> None:
    async def as_json(_request, e: Exception):
        if isinstance(e, RequestValidationError):
            return _error(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors()))
        status = _status_of(e)
        return _error(status, str(e.detail) if isinstance(e, HTTPException) else
                      str(e) if status < 500 else f"internal error ({type(e).__name__})")

    for kind in (HTTPException, RequestValidationError, ArcvitError, Exception):
        app.add_exception_handler(kind, as_json)


def _check_token(request: Request, token: str | None) -> None:
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong token (send 'Authorization: Bearer TOKEN')")


def _add_model_routes(app: FastAPI, model, settings: ServeSettings, metrics: ServeMetrics) -> None:
    page = resources.files("arcvit.serving").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "tasks": len(model.tasks)}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/tasks")
    async def list_tasks():
        return {"tasks": [info.public() for info in model.tasks.values()]}

    @app.put("/v1/tasks/{name}")
    async def load_task(name: str, request: Request):
        _check_token(request, settings.token)
        if settings.adapters is None:
            raise HTTPException(409, "this server was started without an adapter folder to load from")
        info = await run_in_threadpool(model.add, name, task_folder(settings.adapters, name))
        metrics.tasks.set(len(model.tasks))
        return {"loaded": info.public()}

    @app.delete("/v1/tasks/{name}")
    async def unload_task(name: str, request: Request):
        _check_token(request, settings.token)
        await run_in_threadpool(model.remove, name)
        metrics.tasks.set(len(model.tasks))
        return {"unloaded": name}


def _add_predict_route(app: FastAPI, model, batcher: Batcher, metrics: ServeMetrics) -> None:
    @app.post("/v1/predict")
    async def predict(request: Request):
        start, label = time.perf_counter(), "unknown"  # unknown names never become metric labels
        try:
            data, task, top_k = await _read_form(request)
            infos = _requested(model.tasks, task)
            label = task
            x = await run_in_threadpool(lambda: model.transform(decode_image(data)))
            answers = await asyncio.gather(*(batcher.submit(x, info.name) for info in infos))
        except Exception as e:
            metrics.requests.labels(label, str(_status_of(e))).inc()
            raise
        seconds = time.perf_counter() - start
        metrics.requests.labels(label, "200").inc()
        metrics.latency.observe(seconds)
        return {"results": [_top(info, out, top_k) for info, out in answers],
                "latency_ms": round(1000 * seconds, 3)}


async def _read_form(request: Request) -> tuple[bytes, str, int]:
    """The multipart form's image bytes, task name (default: all) and top_k (default 5)."""
    try:
        form = await request.form(max_files=1, max_fields=8)
        image = form.get("image")
        if not isinstance(image, UploadFile):
            raise UploadError("image: missing (send a multipart form with an 'image' file field)")
        data = await image.read()
    except BodyTooLarge as e:
        raise UploadError(str(e), status=413) from None
    task, top_k = str(form.get("task") or ALL), str(form.get("top_k") or "5")
    if not top_k.isdigit() or not 1 <= int(top_k) <= 1000:
        raise UploadError(f"top_k: expected an integer from 1 to 1000, got {top_k!r}")
    return data, task, int(top_k)


def _requested(tasks: dict[str, TaskInfo], task: str) -> list[TaskInfo]:
    if task == ALL:
        if not tasks:
            raise UnknownTask(ALL)
        return list(tasks.values())
    if task not in tasks:
        raise UnknownTask(task)
    return [tasks[task]]


def _run_batch(model, images: list[torch.Tensor], tasks: list[str]) -> list:
    """One backbone pass for the items whose task is still loaded (the others fail alone): each item's
    (task info, logits), both read under the model's lock, so that a reload never pairs old names with new logits."""
    with model.lock:
        loaded = model.tasks
        keep = [i for i, t in enumerate(tasks) if t in loaded]
        outputs: list = [UnknownTask(t) for t in tasks]
        if keep:
            logits = model.predict(torch.stack([images[i] for i in keep]), [tasks[i] for i in keep])
            for i, out in zip(keep, logits):
                outputs[i] = (loaded[tasks[i]], out)
    return outputs


def _top(info: TaskInfo, logits: torch.Tensor, k: int) -> dict:
    probs, labels = logits.float().softmax(-1).topk(min(k, info.num_classes))
    return {"task": info.name, "top": [{"label": int(i), "class": info.class_names[int(i)], "prob": float(p)}
                                       for p, i in zip(probs, labels)]}
