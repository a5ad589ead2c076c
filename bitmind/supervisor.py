"""Child processes that are always stopped: each runs in its own session (process group) with its output in a log
file, and stopping sends SIGTERM to the whole group, then SIGKILL after a grace period, so neither a child nor
anything it started is left behind, whatever ended the parent's run (an atexit hook covers a forgotten stop)."""

import atexit
import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["STOP_GRACE_S", "Child", "Supervisor"]

STOP_GRACE_S = 10.0
LOG_TAIL_LINES = 25


@dataclass
class Child:
    """One supervised process and where its output goes."""

    name: str
    role: str  # miner | validator | generator | setup
    argv: list[str]
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    one_shot: bool = False  # a set-up step: exiting with 0 is its success, not a failure
    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def exit_code(self) -> int | None:
        """The exit code (-N for signal N) once the process ended, else None. The ended process is left unreaped
        (a zombie) until `Supervisor.stop_all`, so its pid, which is also its process group id, cannot be reused
        by an unrelated process that a group signal would then reach."""
        if self.process is None:
            return None
        if self.process.returncode is not None or not hasattr(os, "waitid"):
            return self.process.poll()
        try:
            info = os.waitid(os.P_PID, self.process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return self.process.poll()
        if info is None:
            return None
        return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc})"
        tail = text.splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in tail) or "    (empty log)"


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if the orchestrator itself is killed with SIGKILL (no cleanup runs then)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Starts children in their own sessions and stops every one of them, whatever happens."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env = env
        self.cwd = cwd
        self.children: list[Child] = []
        self._reported: set[str] = set()
        atexit.register(self.stop_all)

    def start(self, child: Child) -> Child:
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        with child.log_path.open("ab") as log:
            child.process = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        self.children.append(child)
        return child

    def exited(self) -> list[tuple[Child, int]]:
        """Children that exited since the last call, with their exit codes (a set-up step's success excepted)."""
        found = []
        for child in self.children:
            code = child.exit_code()
            if code is not None and child.name not in self._reported:
                self._reported.add(child.name)
                if not (child.one_shot and code == 0):
                    found.append((child, code))
        return found

    def stop_all(self, grace_s: float = STOP_GRACE_S) -> list[str]:
        """`stop` every child. Idempotent; returns the children that had to be killed."""
        return self.stop(self.children, grace_s)

    def stop(self, children: list[Child], grace_s: float = STOP_GRACE_S) -> list[str]:
        """SIGTERM the children's process groups, wait up to `grace_s`, then SIGKILL the groups (which also reaches
        grandchildren left behind by a leader that exited); returns the children that had to be killed."""
        # Only groups whose leader is not yet reaped are signalled: their ids cannot belong to anyone else.
        started = [child for child in children if child.process is not None and child.process.returncode is None]
        for child in started:
            _signal_group(child.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        killed = []
        for child in started:
            while child.exit_code() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if child.exit_code() is None:
                killed.append(child.name)
        for child in started:
            _signal_group(child.process.pid, signal.SIGKILL)
            try:
                child.process.wait(timeout=5.0)  # reaps it
            except subprocess.TimeoutExpired:
                pass
        return killed


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass
