"""Running the app with uvicorn until SIGTERM or Ctrl-C.

uvicorn's own shutdown is graceful: on SIGTERM it stops accepting connections, lets in-flight requests finish
(their batches still run), then exits. One process serves from one read-only model; more capacity is more
processes or containers behind any load balancer, all reading the same adapter folder (README, "Serving").
At most ``MAX_CONNECTIONS`` connections are served at once (uvicorn answers 503 beyond), so that the uploads
held in memory are bounded too.
"""
from __future__ import annotations

import sys

from arcvit.serving.app import ServeSettings, create_app
from arcvit.serving.base import TaskModel
from arcvit.serving.options import LOOPBACK

MAX_CONNECTIONS = 32


def serve(model: TaskModel, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``model`` over HTTP until SIGTERM/SIGINT (blocking)."""
    import uvicorn
    if host not in LOOPBACK and settings.token is None:
        print(f"arcvit serve: warning: listening on {host} without --token: anyone who can reach this port can "
              "load and unload tasks", file=sys.stderr)
    config = uvicorn.Config(create_app(model, settings), host=host, port=port, log_level="info",
                            access_log=False, timeout_graceful_shutdown=30, limit_concurrency=MAX_CONNECTIONS)
    uvicorn.Server(config).run()
