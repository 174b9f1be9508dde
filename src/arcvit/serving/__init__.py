"""Serving many tasks on one frozen backbone: the MultiTask model, the HTTP API and its web page.

The models import only torch and the core; the HTTP side (FastAPI, uvicorn: the ``serve`` extra) is imported
on first use, so ``arcvit.MultiTask`` works without it.
"""
from arcvit.serving.base import load_tasks
from arcvit.serving.multitask import MultiTask
from arcvit.serving.separate import SeparateModels
from arcvit.serving.tasks import TaskInfo

_HTTP = {"ServeSettings": "arcvit.serving.app", "create_app": "arcvit.serving.app",
         "serve": "arcvit.serving.server"}

__all__ = ["MultiTask", "SeparateModels", "ServeSettings", "TaskInfo", "create_app", "load_tasks", "serve"]


def __getattr__(name: str):
    if name in _HTTP:
        import importlib

        from arcvit.extras import require
        for module in ("fastapi", "uvicorn", "prometheus_client"):
            require(module, "serve", "the HTTP server")
        return getattr(importlib.import_module(_HTTP[name]), name)
    raise AttributeError(f"module 'arcvit.serving' has no attribute {name!r}")
