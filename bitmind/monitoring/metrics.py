"""Prometheus metrics of one process, in a registry of its own (never the global default one, so tests and the
local demo can build several), and the endpoint that serves them (127.0.0.1 by default)."""

import logging
import math
import numbers
import threading
import time
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from bitmind import __version__

__all__ = ["LATENCY_BUCKETS", "Metrics", "MetricsServer", "MonitoringError", "is_real", "start_metrics_server"]

logger = logging.getLogger(__name__)

# 1 ms … 10 s: a miner's detector answers in tens of ms, the validator's timeout is ~9-12 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class MonitoringError(RuntimeError):
    """A monitoring component could not start (for example the metrics port is taken)."""


class Metrics:
    """The process's Prometheus metrics, in a registry of its own (pass `metrics.registry` to the server)."""

    def __init__(self, role: str = "", version: str = __version__, namespace: str = "bitmind") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.info = Gauge("build_info", "Constant 1, labelled with version and role.", ["version", "role"],
                          namespace=namespace, registry=reg)
        self.info.labels(version=version, role=role).set(1)
        self.requests = Counter("requests_total", "Requests handled (miner) or miner answers (validator).",
                                ["outcome"], namespace=namespace, registry=reg)
        self.request_latency = Histogram("request_latency_seconds", "Request latency in seconds.",
                                         buckets=LATENCY_BUCKETS, namespace=namespace, registry=reg)
        self.errors = Counter("errors_total", "Errors caught and survived, by kind.", ["kind"],
                              namespace=namespace, registry=reg)
        self.miner_score = Gauge("miner_score", "Validator's moving-average score per miner uid.", ["uid"],
                                 namespace=namespace, registry=reg)
        self.weights_set = Counter("weights_set_total", "Weight-setting attempts, by success.", ["ok"],
                                   namespace=namespace, registry=reg)
        self.last_weights_block = Gauge("last_weights_block", "Block of the last successful weight setting.",
                                        namespace=namespace, registry=reg)
        self.last_sync = Gauge("last_chain_sync_timestamp_seconds", "Unix time of the last successful chain sync.",
                               namespace=namespace, registry=reg)
        self.validator_steps = Counter("validator_steps_total", "Validator challenge steps completed.",
                                       namespace=namespace, registry=reg)
        self.generated_images = Counter("generated_images_total", "Synthetic images the generator cached, by model.",
                                        ["model"], namespace=namespace, registry=reg)
        self.synthetic_cache_items = Gauge("synthetic_cache_items", "Images in the generator's synthetic cache.",
                                           namespace=namespace, registry=reg)

    def record_request(self, outcome: str, latency_s: float | None = None) -> None:
        """Count one request by outcome (e.g. ok, blacklisted, bad_image, timeout, error); observe its latency."""
        self.requests.labels(outcome=outcome).inc()
        if latency_s is not None and is_real(latency_s) and latency_s >= 0:
            self.request_latency.observe(float(latency_s))

    def record_error(self, kind: str) -> None:
        """Count one error that the process caught and survived."""
        self.errors.labels(kind=kind).inc()

    def set_scores(self, scores: Mapping[int, float]) -> None:
        """Publish the current score of every uid (replacing the previous set, so departed uids disappear)."""
        self.miner_score.clear()
        for uid, score in scores.items():
            if is_real(score):
                self.miner_score.labels(uid=str(int(uid))).set(float(score))

    def record_weights(self, ok: bool, block: int | None = None) -> None:
        """Count one weight-setting attempt; a successful one also records its block."""
        self.weights_set.labels(ok=str(bool(ok)).lower()).inc()
        if ok and block is not None:
            self.last_weights_block.set(block)

    def record_sync(self, timestamp: float | None = None) -> None:
        """Mark a successful chain sync (now, unless a timestamp is given)."""
        self.last_sync.set(time.time() if timestamp is None else timestamp)

    def record_step(self) -> None:
        """Count one completed validator step."""
        self.validator_steps.inc()

    def record_image(self, model: str, cache_items: int) -> None:
        """Count one cached synthetic image and publish the cache's size after it."""
        self.generated_images.labels(model=model).inc()
        self.synthetic_cache_items.set(cache_items)


def is_real(value: Any) -> bool:
    """A finite real number, numpy scalars included (scores usually come out of numpy arrays)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


class MetricsServer:
    """A running metrics HTTP endpoint; `port` is the bound port (useful when 0 was asked for)."""

    def __init__(self, server: Any, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host, self.port = server.server_address[:2]

    def stop(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
                         ) -> MetricsServer:
    """Serve `registry` on http://host:port/metrics in a daemon thread (port 0 lets the OS choose one).

    Raises `MonitoringError` with the reason when the port is out of range or cannot be bound.
    """
    if registry is None:
        raise ValueError("pass the process's Metrics.registry (the global default registry is not used)")
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise MonitoringError(f"metrics port must be an integer in 0..65535, got {port!r}")
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise MonitoringError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    metrics_server = MetricsServer(server, thread)
    logger.info("metrics served on http://%s:%d/metrics", metrics_server.host, metrics_server.port)
    return metrics_server
