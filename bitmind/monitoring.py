"""Operational visibility for the long-running processes: heartbeat file, Prometheus metrics, watchdog, wandb.

Why each piece exists:
- `Heartbeat` writes a small JSON status file (atomically) that an operator, a cron job or `python -m
  bitmind.monitoring check` can read to see that a process is alive and what it last did.
- `Metrics` holds Prometheus counters/gauges in a per-process registry (never the global default one, so tests and
  the local demo can build several); `start_metrics_server` serves them on 127.0.0.1 by default.
- `Watchdog` turns a silent hang (stuck chain call, deadlocked GPU) into a process exit so pm2 restarts it.
- `WandbLogger` is optional experiment logging: wandb is imported lazily and everything is a no-op without it.
- `Monitor` bundles them from the parsed config, so a neuron needs three calls: `from_config`, `beat`, `close`.
"""

import argparse
import json
import logging
import math
import numbers
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import start_http_server

from bitmind import __version__
from bitmind.atomic import atomic_write_bytes

__all__ = [
    "LATENCY_BUCKETS",
    "WATCHDOG_EXIT_CODE",
    "Heartbeat",
    "Metrics",
    "MetricsServer",
    "Monitor",
    "MonitoringError",
    "WandbLogger",
    "Watchdog",
    "add_monitoring_args",
    "check_heartbeat",
    "start_metrics_server",
]

logger = logging.getLogger(__name__)

# 1 ms … 10 s: a miner's detector answers in tens of ms, the validator's timeout is ~9-12 s.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Distinct from crashes (1) and signals (128+n) so that pm2 logs show the watchdog was the cause.
WATCHDOG_EXIT_CODE = 75
DEFAULT_WATCHDOG_TIMEOUT_S = 900.0
_RESERVED_HEARTBEAT_KEYS = frozenset({"timestamp", "pid", "version", "role"})


class MonitoringError(RuntimeError):
    """A monitoring component could not start (for example the metrics port is taken)."""


# --------------------------------------------------------------------------------------------------- heartbeat
class Heartbeat:
    """Atomically rewritten JSON status file.

    Each `beat(**fields)` merges the fields into the status kept so far (so a `last_sync` reported once stays in the
    file while later beats report steps) and rewrites the whole file atomically (`bitmind.atomic`), so a
    reader never sees a partial file. Values that JSON cannot encode are written as strings. Write failures (disk
    full, permissions) are logged and reported as False: a status file must never take the process down.
    """

    def __init__(self, path: str | os.PathLike[str], role: str = "", version: str = __version__) -> None:
        self.path = Path(path).expanduser()
        self.role = role
        self.version = version
        self._fields: dict[str, Any] = {}
        self._lock = threading.Lock()

    def beat(self, **fields: Any) -> bool:
        """Record `fields` and rewrite the file; returns whether the write succeeded."""
        clash = _RESERVED_HEARTBEAT_KEYS.intersection(fields)
        if clash:
            raise ValueError(f"heartbeat fields {sorted(clash)} are reserved (written by Heartbeat itself)")
        with self._lock:
            self._fields.update(_json_safe(fields))
            status = {
                "timestamp": time.time(),
                "pid": os.getpid(),
                "version": self.version,
                "role": self.role,
                **self._fields,
            }
            try:
                atomic_write_bytes(self.path, json.dumps(status, allow_nan=False, sort_keys=True).encode())
            except OSError as exc:
                logger.warning("heartbeat write to %s failed: %s", self.path, exc)
                return False
        return True


def _json_safe(value: Any) -> Any:
    """NaN/inf become None (JSON has no such numbers); anything else JSON cannot encode becomes its str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)


def check_heartbeat(path: str | os.PathLike[str], max_age_s: float) -> tuple[bool, str]:
    """Is the heartbeat file present, valid and younger than `max_age_s`? Returns (ok, one-line reason)."""
    path = Path(path).expanduser()
    try:
        status = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, f"{path}: no heartbeat file"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return False, f"{path}: unreadable heartbeat ({exc})"
    timestamp = status.get("timestamp") if isinstance(status, dict) else None
    if not isinstance(timestamp, (int, float)) or not math.isfinite(timestamp):
        return False, f"{path}: heartbeat has no valid timestamp"
    age = time.time() - timestamp
    summary = f"{status.get('role') or 'process'} pid {status.get('pid')} v{status.get('version')}"
    if age > max_age_s:
        return False, f"{path}: STALE, {summary} last beat {age:.0f} s ago (limit {max_age_s:.0f} s)"
    return True, f"{path}: ok, {summary} last beat {age:.0f} s ago"


# ----------------------------------------------------------------------------------------------------- metrics
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
        if latency_s is not None and _is_real(latency_s) and latency_s >= 0:
            self.request_latency.observe(float(latency_s))

    def record_error(self, kind: str) -> None:
        """Count one error that the process caught and survived."""
        self.errors.labels(kind=kind).inc()

    def set_scores(self, scores: Mapping[int, float]) -> None:
        """Publish the current score of every uid (replacing the previous set, so departed uids disappear)."""
        self.miner_score.clear()
        for uid, score in scores.items():
            if _is_real(score):
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


def _is_real(value: Any) -> bool:
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


# ---------------------------------------------------------------------------------------------------- watchdog
def _exit_process(idle_s: float) -> None:
    logger.critical("watchdog: no progress for %.0f s, exiting with code %d so the supervisor restarts us",
                    idle_s, WATCHDOG_EXIT_CODE)
    logging.shutdown()
    os._exit(WATCHDOG_EXIT_CODE)


class Watchdog:
    """Calls `on_expire(idle_seconds)` once if `kick()` is not called for `timeout_s` seconds.

    The default `on_expire` logs and `os._exit`s with `WATCHDOG_EXIT_CODE`: a hung main loop cannot be unwound
    from another thread, and pm2 restarts an exited process.
    """

    def __init__(self, timeout_s: float, on_expire: Callable[[float], None] | None = None,
                 name: str = "watchdog") -> None:
        if not _is_real(timeout_s) or timeout_s <= 0:
            raise ValueError(f"watchdog timeout must be a positive number of seconds, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self._on_expire = on_expire or _exit_process
        self._last_kick = time.monotonic()
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self.fired = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> "Watchdog":
        """Start watching (the timeout counts from now)."""
        self.kick()
        self._thread.start()
        return self

    def kick(self) -> None:
        """Report progress: the timeout restarts from now."""
        with self._lock:
            self._last_kick = time.monotonic()

    def stop(self) -> None:
        """Stop watching (e.g. on a clean shutdown); the callback will not fire afterwards."""
        self._stopped.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> "Watchdog":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stopped.is_set():
            with self._lock:
                idle = time.monotonic() - self._last_kick
            if idle >= self.timeout_s:
                self.fired.set()
                try:
                    self._on_expire(idle)
                except Exception:  # noqa: BLE001 - a broken callback must not hide that the watchdog fired
                    logger.exception("watchdog on_expire callback failed")
                return
            self._stopped.wait(self.timeout_s - idle)


# ------------------------------------------------------------------------------------------------------- wandb
class WandbLogger:
    """Optional wandb run: a no-op when disabled, when wandb is not installed, or after wandb itself fails."""

    def __init__(self, enabled: bool, project: str, entity: str | None = None, run_name: str | None = None,
                 run_config: Mapping[str, Any] | None = None) -> None:
        self._run: Any = None
        if not enabled:
            return
        try:
            import wandb  # noqa: PLC0415 - optional dependency, imported only when asked for
        except ImportError:
            logger.warning("--wandb.on given but wandb is not installed (pip install -e '.[wandb]'); not logging")
            return
        try:
            self._run = wandb.init(project=project, entity=entity or None, name=run_name,
                                   config=dict(run_config or {}))
        except Exception as exc:  # noqa: BLE001 - wandb raises many types (network, auth); logging is optional
            logger.warning("wandb.init failed, continuing without wandb: %s", exc)
            return
        logger.info("wandb run started: project=%s entity=%s name=%s", project, entity or "-", run_name or "-")

    @property
    def active(self) -> bool:
        return self._run is not None

    def log(self, data: Mapping[str, Any], step: int | None = None) -> None:
        """Log a dict of values; failures are logged once and switch wandb off."""
        if self._run is None:
            return
        try:
            self._run.log(dict(data), step=step)
        except Exception as exc:  # noqa: BLE001
            logger.warning("wandb log failed, disabling wandb: %s", exc)
            self._run = None

    def finish(self) -> None:
        if self._run is None:
            return
        try:
            self._run.finish()
        except Exception as exc:  # noqa: BLE001
            logger.warning("wandb finish failed: %s", exc)
        self._run = None


# ------------------------------------------------------------------------------------------------------- flags
def add_monitoring_args(parser: argparse.ArgumentParser) -> None:
    """Heartbeat, watchdog and wandb flags (the metrics port/host come from `config.add_neuron_args`)."""
    parser.add_argument(
        "--neuron.heartbeat_file",
        type=str,
        default="",
        help="JSON status file rewritten on every step (empty: <neuron.state_dir>/heartbeat.json).",
    )
    parser.add_argument(
        "--neuron.watchdog_timeout",
        type=float,
        default=DEFAULT_WATCHDOG_TIMEOUT_S,
        help="Exit (so pm2 restarts the process) after this many seconds without progress; 0 disables.",
    )
    parser.add_argument("--wandb.on", action="store_true", help="Log to Weights & Biases (needs the wandb extra).")
    parser.add_argument("--wandb.project", type=str, default="bitmind-subnet34", help="wandb project.")
    parser.add_argument("--wandb.entity", type=str, default="", help="wandb entity (team or user); empty: default.")


def _section(config: Any, name: str) -> Mapping[str, Any]:
    section = config.get(name) if hasattr(config, "get") else None
    return section if isinstance(section, Mapping) else {}


class Monitor:
    """Everything a neuron's main loop needs for monitoring, built from its config.

    `beat(**fields)` writes the heartbeat and kicks the watchdog; `metrics` records events; `wandb.log(...)` logs
    experiment values; `close()` stops the watchdog, the metrics server and wandb.
    """

    def __init__(self, heartbeat: Heartbeat, metrics: Metrics, server: MetricsServer | None = None,
                 watchdog: Watchdog | None = None, wandb: WandbLogger | None = None) -> None:
        self.heartbeat = heartbeat
        self.metrics = metrics
        self.server = server
        self.watchdog = watchdog
        self.wandb = wandb or WandbLogger(enabled=False, project="")

    @classmethod
    def from_config(cls, config: Any, role: str, on_watchdog_expire: Callable[[float], None] | None = None,
                    run_name: str | None = None) -> "Monitor":
        """Build from `--neuron.*`/`--wandb.*` flags; starts the metrics server and watchdog when enabled.

        The watchdog counts from here: build the Monitor once start-up work (model downloads, first sync) is done,
        or call `beat()` during it. Raises `MonitoringError` when the metrics port cannot be served or a value is
        out of range.
        """
        neuron, wandb_cfg = _section(config, "neuron"), _section(config, "wandb")
        heartbeat_file = neuron.get("heartbeat_file") or ""
        if not heartbeat_file:
            state_dir = neuron.get("state_dir") or "."
            heartbeat_file = str(Path(state_dir).expanduser() / "heartbeat.json")
        timeout = neuron.get("watchdog_timeout") or 0
        if not _is_real(timeout) or timeout < 0:
            raise MonitoringError(f"--neuron.watchdog_timeout must be >= 0 seconds, got {timeout!r}")
        metrics = Metrics(role=role)
        port = neuron.get("metrics_port") or 0
        server = None
        if port:
            server = start_metrics_server(port, host=neuron.get("metrics_host") or "127.0.0.1",
                                          registry=metrics.registry)
        watchdog = Watchdog(timeout, on_expire=on_watchdog_expire, name=f"{role}-watchdog").start() if timeout else None
        wandb = WandbLogger(
            enabled=bool(wandb_cfg.get("on")),
            project=wandb_cfg.get("project") or "bitmind-subnet34",
            entity=wandb_cfg.get("entity") or None,
            run_name=run_name or role,
            run_config={"role": role, "version": __version__},
        )
        logger.info("monitoring: heartbeat=%s metrics=%s watchdog=%s wandb=%s", heartbeat_file,
                    f"{server.host}:{server.port}" if server else "off",
                    f"{timeout:.0f}s" if watchdog else "off", "on" if wandb.active else "off")
        return cls(Heartbeat(heartbeat_file, role=role), metrics, server, watchdog, wandb)

    def beat(self, **fields: Any) -> bool:
        """Report progress: kicks the watchdog and rewrites the heartbeat file."""
        if self.watchdog is not None:
            self.watchdog.kick()
        return self.heartbeat.beat(**fields)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.server is not None:
            self.server.stop()
        self.wandb.finish()


def main(argv: list[str] | None = None) -> int:
    """`python -m bitmind.monitoring check FILE --max-age S`: exit 0 when the heartbeat is fresh, 1 otherwise."""
    parser = argparse.ArgumentParser(description="Check a neuron's heartbeat file (for cron or a health probe).")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="Exit 1 when the heartbeat file is missing, invalid or stale.")
    check.add_argument("path", help="Heartbeat file, e.g. ~/.bitmind/validator/heartbeat.json")
    check.add_argument("--max-age", type=float, default=DEFAULT_WATCHDOG_TIMEOUT_S, help="Seconds.")
    args = parser.parse_args(argv)
    ok, message = check_heartbeat(args.path, args.max_age)
    print(message)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
