"""Prometheus metrics of `captioner serve` (``GET /metrics``, the Prometheus text format).

    captioner_requests_total{path, status}      requests answered, by path and HTTP status
    captioner_request_seconds{path}             latency histogram: from the request's arrival to its answer
    captioner_batch_images                      histogram of the images in each model call
    captioner_queue_images                      images waiting for the model
    captioner_running_images                    images in the model call under way

``path`` is one of the server's routes, or "other" for any path it does not serve (so that a scan of
random paths cannot grow the label set). With ``captioner serve --processes N`` the processes share
one metrics directory (prometheus_client's multiprocess mode, PROMETHEUS_MULTIPROC_DIR): a scrape of
any process reports all of them.

prometheus_client comes with the serve extra: only :mod:`captioner.serving.app` imports this module.
"""

import os
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

from captioner.serving.batcher import Batcher

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
PATHS = ("/v1/captions", "/v1/health", "/v1/health/live", "/v1/health/ready", "/v1/models", "/metrics", "/",
         "/docs", "/openapi.json")
PREFIXES = ("/static", "/docs")  # the web page's and the API docs' files
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # set (by `--processes`) before prometheus_client is imported


class Metrics:
    """The server's metrics, in a registry of their own (several apps in one process do not clash)."""

    def __init__(self, batcher: Batcher):
        self.batcher = batcher
        self.registry = r = CollectorRegistry()
        self.requests = Counter("captioner_requests", "HTTP requests answered, by path and status",
                                ["path", "status"], registry=r)
        self.latency = Histogram("captioner_request_seconds", "seconds from a request's arrival to its answer",
                                 ["path"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("captioner_batch_images", "images in each model call", buckets=BATCH_BUCKETS,
                               registry=r)
        self.queued = Gauge("captioner_queue_images", "images waiting for the model", registry=r,
                            multiprocess_mode="livesum")
        self.running = Gauge("captioner_running_images", "images in the model call under way", registry=r,
                             multiprocess_mode="livesum")
        batcher.on_batch = self.batch.observe

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = path if path in PATHS else next((p for p in PREFIXES if path.startswith(p + "/")), "other")
        self.requests.labels(path=path, status=str(status)).inc()
        self.latency.labels(path=path).observe(seconds)
        self.update()

    def update(self) -> None:
        self.queued.set(self.batcher.queued)
        self.running.set(self.batcher.running)

    def render(self) -> tuple[bytes, str]:
        """The metrics as Prometheus text, and its content type."""
        self.update()
        if os.environ.get(MULTIPROCESS_DIR):
            every = CollectorRegistry()
            multiprocess.MultiProcessCollector(every)
            return generate_latest(every), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware: every HTTP request counted by path and status, and timed."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.observe(scope["path"], status, time.perf_counter() - start)
