"""Prometheus metrics of one server, in a registry of its own (several apps in one process never collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServeMetrics:
    """Requests by task and status, request latency, batch sizes and the number of loaded tasks."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("arcvit_requests", "Prediction requests by task and HTTP status",
                                ["task", "status"], registry=self.registry)
        self.latency = Histogram("arcvit_request_latency_seconds", "Prediction request latency",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("arcvit_batch_size", "Images per backbone pass (mixed-task batches)",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.tasks = Gauge("arcvit_tasks", "Tasks loaded", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
