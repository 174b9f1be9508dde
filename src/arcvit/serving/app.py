"""The HTTP API and web page over a MultiTask model (FastAPI): an app factory, no global state.

Routes: ``GET /`` (the page), ``GET /healthz``, ``GET /v1/tasks``, ``POST /v1/predict``,
``PUT|DELETE /v1/tasks/{name}`` (load, reload or unload an adapter folder, or with ``{"source": "hf-hub:..."}`` a
Hub repo's adapter; need the token when one is set, and
a Host header naming this server, so that a DNS-rebinding web page cannot reach them) and ``GET /metrics``.
Every error answers a JSON ``{"error": ...}``. Uploads are decoded by a pool of ``decode_workers`` threads, so
that the memory decoding takes is bounded whatever the number of requests (README, "Serving"). The only state is the read-only model, so
capacity grows by running more replicas on the same adapter folder.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from concurrent.futures import ThreadPoolExecutor
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
from arcvit.serving.hub_tasks import add_from_hub, hub_reference
from arcvit.serving.images import UploadError, decode_image
from arcvit.serving.limits import BodyLimit, BodyTooLarge
from arcvit.serving.metrics import ServeMetrics
from arcvit.serving.options import LOOPBACK, whole_number
from arcvit.serving.pixels import ResizePlan
from arcvit.serving.tasks import ALL, TaskInfo, UnknownTask, task_folder


@dataclass(frozen=True)
class ServeSettings:
    adapters: Path | None = None  # the folder PUT /v1/tasks/{name} loads from (None: no reloading)
    token: str | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_upload_mb: float = 10.0
    # Host header names PUT/DELETE answer to (None: any; `serve` adds the bound address)
    allowed_hosts: tuple[str, ...] | None = LOOPBACK
    decode_workers: int = 2  # uploads decoded at once (each holds at most the per-request bound)


class TaskFailed(ArcvitError):
    """One task could not score one image (its logits are not finite); the request's other tasks still answer."""

    status = 422


def create_app(model, settings: ServeSettings = ServeSettings()) -> FastAPI:
    """A FastAPI app serving ``model`` (a MultiTask: ``tasks``, ``add``, ``remove``, ``predict``, ``transform``)."""
    metrics = ServeMetrics()
    metrics.tasks.set(len(model.tasks))
    batcher = Batcher(lambda images, tasks: _run_batch(model, images, tasks), settings.max_batch,
                      settings.max_wait_ms, on_batch=metrics.batch_size.observe)
    decoder = ThreadPoolExecutor(settings.decode_workers, thread_name_prefix="arcvit-decode")

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()
        decoder.shutdown(wait=True)

    app = FastAPI(title="arcvit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_upload_mb * 2**20))
    _add_error_handlers(app)
    _add_model_routes(app, model, settings, metrics)
    _add_predict_route(app, model, batcher, metrics, _preprocess(model, decoder))
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
        return _error(_status_of(e), str(e.detail) if isinstance(e, HTTPException) else _message(e))

    for kind in (HTTPException, RequestValidationError, ArcvitError, Exception):
        app.add_exception_handler(kind, as_json)


def _check_write(request: Request, settings: ServeSettings) -> None:
    """A state-changing request names this server in its Host header and carries the token (when one is set)."""
    allowed = settings.allowed_hosts
    host = _host_name(request.headers.get("host", ""))
    if allowed is not None and host not in allowed:
        raise HTTPException(403, f"Host header {host!r} is not a name this server answers to for loading and "
                                 "unloading (start it with --allowed-hosts)")
    token = settings.token
    if token is None:
        return
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise HTTPException(401, "missing or wrong token (send 'Authorization: Bearer TOKEN')")


def _host_name(header: str) -> str:
    """The host part of a Host header, lower-cased, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]")[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


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
        _check_write(request, settings)
        reference = hub_reference(await request.body())
        if reference is not None:  # {"source": "hf-hub:ORG/NAME[@REVISION]"}: pulled, checked, then added
            info, pinned = await run_in_threadpool(add_from_hub, model, name, reference)
            metrics.tasks.set(len(model.tasks))
            return {"loaded": info.public(), "source": pinned}
        if settings.adapters is None:  # a model whose tasks are fixed (an ONNX file) says so
            raise HTTPException(409, getattr(model, "fixed", None) or
                                "this server was started without an adapter folder to load from")
        info = await run_in_threadpool(model.add, name, task_folder(settings.adapters, name))
        metrics.tasks.set(len(model.tasks))
        return {"loaded": info.public()}

    @app.delete("/v1/tasks/{name}")
    async def unload_task(name: str, request: Request):
        _check_write(request, settings)
        await run_in_threadpool(model.remove, name)
        metrics.tasks.set(len(model.tasks))
        return {"unloaded": name}


def _preprocess(model, decoder: ThreadPoolExecutor):
    """Upload bytes -> the model's input tensor, on the bounded decode pool; every image the transform would
    make is checked against the pixel budget from the upload's header, before decoding."""
    plan = ResizePlan(model.transform)

    async def run(data: bytes) -> torch.Tensor:
        work = lambda: model.transform(decode_image(data, resized=plan.largest))  # noqa: E731
        return await asyncio.get_running_loop().run_in_executor(decoder, work)
    return run


def _add_predict_route(app: FastAPI, model, batcher: Batcher, metrics: ServeMetrics, preprocess) -> None:
    @app.post("/v1/predict")
    async def predict(request: Request):
        start, label = time.perf_counter(), "unknown"  # unknown names never become metric labels
        try:
            data, task, top_k = await _read_form(request)
            infos = _requested(model.tasks, task)
            label = task
            with model.pinned([info.name for info in infos]):  # a DELETE meanwhile does not drop them
                x = await preprocess(data)
                answers = await asyncio.gather(*(batcher.submit(x, info.name) for info in infos),
                                               return_exceptions=True)
            failed = [(info, a) for info, a in zip(infos, answers) if isinstance(a, BaseException)]
            if len(failed) == len(infos):
                raise failed[0][1]
        except Exception as e:
            metrics.requests.labels(label, str(_status_of(e))).inc()
            raise
        seconds = time.perf_counter() - start
        metrics.requests.labels(label, "200").inc()
        metrics.latency.observe(seconds)
        return {"results": [_top(*a, top_k) for a in answers if not isinstance(a, BaseException)],
                **({"failed": [{"task": info.name, "error": _message(e)} for info, e in failed]} if failed else {}),
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
    task, top_k = _text_field(form, "task", ALL), _text_field(form, "top_k", "5")
    return data, task, whole_number(top_k, "top_k", 1, 1000)


def _text_field(form, name: str, default: str, limit: int = 200) -> str:
    """A short text field of the form (a file, or text longer than ``limit``, is refused, never echoed)."""
    value = form.get(name)
    if isinstance(value, UploadFile) or len(value or "") > limit:
        raise UploadError(f"{name}: expected a text field of at most {limit} characters")
    return value or default


def _requested(tasks: dict[str, TaskInfo], task: str) -> list[TaskInfo]:
    if task == ALL:
        if not tasks:
            raise UnknownTask(ALL)
        return list(tasks.values())
    if task not in tasks:
        raise UnknownTask(task)
    return [tasks[task]]


def _run_batch(model, images: list[torch.Tensor], tasks: list[str]) -> list:
    """One backbone pass for the items whose task is still served (the others fail alone): each item's
    (task info, logits), both read under the model's lock, so that a reload never pairs old names with new logits.
    Should the pass fail, each task's items run on their own, so that one task's failure is only its own."""
    with model.lock:
        infos = {t: model.served(t) for t in dict.fromkeys(tasks)}
        outputs: list = [UnknownTask(t) for t in tasks]
        keep = [i for i, t in enumerate(tasks) if infos[t] is not None]
        try:
            groups = [keep] if keep else []
            results = [model.predict(torch.stack([images[i] for i in keep]), [tasks[i] for i in keep])]
        except Exception:  # noqa: BLE001  retried per task below: the failing task's items get its error
            groups = [[i for i in keep if tasks[i] == t] for t in dict.fromkeys(tasks[i] for i in keep)]
            results = [_attempt(model, images, tasks, group) for group in groups]
        for group, result in zip(groups, results):
            for j, i in enumerate(group):
                outputs[i] = result if isinstance(result, Exception) else _checked(infos[tasks[i]], result[j])
    return outputs


def _attempt(model, images: list[torch.Tensor], tasks: list[str], group: list[int]):
    """One task's items on their own: their logits, or the exception that fails them (all of them)."""
    try:
        return model.predict(torch.stack([images[i] for i in group]), [tasks[i] for i in group])
    except Exception as e:  # noqa: BLE001  an exception is this task's answer, never the batch's
        return e


def _checked(info: TaskInfo, logits: torch.Tensor):
    if not bool(torch.isfinite(logits).all()):
        return TaskFailed(f"task {info.name!r}: its scores for this image are not finite numbers")
    return info, logits


def _message(e: BaseException) -> str:
    return str(e) if _status_of(e) < 500 else f"internal error ({type(e).__name__})"


def _top(info: TaskInfo, logits: torch.Tensor, k: int) -> dict:
    probs, labels = logits.float().softmax(-1).topk(min(k, info.num_classes))
    return {"task": info.name, "top": [{"label": int(i), "class": info.class_names[int(i)], "prob": float(p)}
                                       for p, i in zip(probs, labels)]}
