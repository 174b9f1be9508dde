"""Serving many tasks on one frozen backbone: the MultiTask model, the HTTP API and its web page."""
from arcvit.serving.app import ServeSettings, create_app
from arcvit.serving.server import load_tasks, serve

__all__ = ["ServeSettings", "create_app", "load_tasks", "serve"]
