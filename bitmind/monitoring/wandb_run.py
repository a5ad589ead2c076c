"""Optional Weights & Biases logging: wandb is imported lazily and everything is a no-op without it."""

import logging
from collections.abc import Mapping
from typing import Any

__all__ = ["WandbLogger"]

logger = logging.getLogger(__name__)


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
