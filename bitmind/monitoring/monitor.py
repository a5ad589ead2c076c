"""The monitoring a neuron's main loop needs, built from its flags: three calls (`Monitor.from_config`, `beat`,
`close`) give it a heartbeat file, a metrics endpoint, a watchdog and optional wandb logging."""

import argparse
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bitmind import __version__
from bitmind.monitoring.heartbeat import Heartbeat
from bitmind.monitoring.metrics import Metrics, MetricsServer, MonitoringError, is_real, start_metrics_server
from bitmind.monitoring.wandb_run import WandbLogger
from bitmind.monitoring.watchdog import DEFAULT_WATCHDOG_TIMEOUT_S, Watchdog

__all__ = ["Monitor", "add_monitoring_args"]

logger = logging.getLogger(__name__)


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
        if not is_real(timeout) or timeout < 0:
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
