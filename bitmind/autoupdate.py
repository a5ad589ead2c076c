"""Auto-updater: follow the git remote, but only act on a new RELEASE (a higher `__version__`).

Why not every commit (as the 2024 reference did, hard-resetting every 60 s): a release is the unit the maintainers
test, and restarting a validator on every commit costs its in-flight challenge. The cycle:

  fetch → read `__version__` from `<remote>/<branch>:bitmind/__init__.py` → if higher than HEAD's: refuse when the
  worktree has uncommitted tracked changes or history has diverged; else fast-forward → install command → on
  success restart the apps; on a failed install reset to the previous commit, reinstall it and restart nothing
  (the running processes keep the old code), and skip that version until a newer one appears.

Run `python -m bitmind.autoupdate --once` for one check, or without `--once` to poll until SIGINT / SIGTERM (pm2 app
`bitmind_autoupdate`; a signal ends the process after the check in progress). After an update the loop re-executes
itself so it runs the new updater code too.
"""

import argparse
import enum
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Outcome", "UpdateError", "Updater", "main", "parse_version"]

logger = logging.getLogger("bitmind.autoupdate")

_VERSION_RE = re.compile(r"""^__version__\s*=\s*["'](\d+)\.(\d+)\.(\d+)["']""", re.MULTILINE)
DEFAULT_VERSION_FILE = "bitmind/__init__.py"


class UpdateError(RuntimeError):
    """A git or version problem that stops one update check (logged; the next check tries again)."""


class Outcome(enum.Enum):
    """What one check did."""

    UP_TO_DATE = "up_to_date"
    REFUSED = "refused"  # dirty worktree, wrong branch or diverged history: needs the operator
    SKIPPED_FAILED_VERSION = "skipped_failed_version"
    UPDATED = "updated"
    UPDATED_RESTART_FAILED = "updated_restart_failed"
    ROLLED_BACK = "rolled_back"
    ERROR = "error"


def parse_version(text: str) -> tuple[int, int, int]:
    """The `__version__ = "X.Y.Z"` of a Python source text, as a comparable tuple."""
    match = _VERSION_RE.search(text)
    if match is None:
        raise UpdateError('no `__version__ = "X.Y.Z"` line found')
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def _fmt(version: tuple[int, int, int]) -> str:
    return ".".join(str(part) for part in version)


@dataclass
class Updater:
    """One git checkout to keep on the latest release of `remote/branch`."""

    repo: Path
    install_cmd: Sequence[str]
    restart_cmds: Sequence[Sequence[str]] = ()
    remote: str = "origin"
    branch: str | None = None  # None: the branch checked out now
    version_file: str = DEFAULT_VERSION_FILE
    git_timeout_s: float = 120.0
    install_timeout_s: float = 1800.0
    _failed_versions: set[tuple[int, int, int]] = field(default_factory=set, init=False)

    # ------------------------------------------------------------------------------------------------ commands
    def _git(self, *args: str) -> str:
        env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"}
        try:
            done = subprocess.run(["git", *args], cwd=self.repo, env=env, capture_output=True, text=True,
                                  timeout=self.git_timeout_s, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise UpdateError(f"git {' '.join(args)}: {exc}") from exc
        if done.returncode != 0:
            # git's cause comes first ("fatal: 'origin' does not appear to be a git repository"), advice after it.
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            causes = [line for line in lines if line.startswith(("fatal:", "error:"))] or lines
            raise UpdateError(f"git {' '.join(args)} failed ({done.returncode}): {' | '.join(causes[:3])}")
        return done.stdout.strip()

    def _run(self, cmd: Sequence[str], what: str, timeout_s: float) -> bool:
        """Run an install/restart command; True on exit status 0. Its output goes to our log on failure."""
        started = time.monotonic()
        try:
            done = subprocess.run(list(cmd), cwd=self.repo, capture_output=True, text=True, timeout=timeout_s,
                                  check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            logger.error("%s command %s could not complete: %s", what, shlex.join(cmd), exc)
            return False
        elapsed = time.monotonic() - started
        if done.returncode != 0:
            tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            logger.error("%s command %s failed with status %d after %.1f s: %s", what, shlex.join(cmd),
                         done.returncode, elapsed, tail)
            return False
        logger.info("%s command %s succeeded in %.1f s", what, shlex.join(cmd), elapsed)
        return True

    # ---------------------------------------------------------------------------------------------------- steps
    def _branch(self) -> str:
        current = self._git("rev-parse", "--abbrev-ref", "HEAD")
        if current == "HEAD":
            raise UpdateError("HEAD is detached; check out the branch to follow")
        return current

    def _versions(self, branch: str) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        local = parse_version(self._git("show", f"HEAD:{self.version_file}"))
        try:
            remote = parse_version(self._git("show", f"{self.remote}/{branch}:{self.version_file}"))
        except UpdateError as exc:
            raise UpdateError(f"remote {self.remote}/{branch}: {exc}") from exc
        return local, remote

    def _install(self, what: str) -> bool:
        return self._run(self.install_cmd, what, self.install_timeout_s)

    def check_once(self) -> Outcome:
        """Fetch, compare versions and update if a newer release is out. Never raises for git/command failures."""
        try:
            return self._check_once()
        except UpdateError as exc:
            logger.error("update check failed: %s", exc)
            return Outcome.ERROR

    def _check_once(self) -> Outcome:
        current = self._branch()
        branch = self.branch or current
        if current != branch:
            logger.warning("refusing to update: on branch %s, configured to follow %s", current, branch)
            return Outcome.REFUSED
        self._git("fetch", "--quiet", self.remote, branch)
        local, remote = self._versions(branch)
        if remote <= local:
            logger.debug("up to date: local %s, %s/%s %s", _fmt(local), self.remote, branch, _fmt(remote))
            return Outcome.UP_TO_DATE
        if remote in self._failed_versions:
            logger.info("not retrying %s: its install failed earlier (waiting for a newer release)", _fmt(remote))
            return Outcome.SKIPPED_FAILED_VERSION
        dirty = self._git("diff", "--name-only", "HEAD").splitlines()  # staged or not, tracked files only
        if dirty:
            logger.warning("refusing to update %s -> %s: uncommitted changes to tracked files (%s); commit or "
                           "discard them", _fmt(local), _fmt(remote), ", ".join(dirty))
            return Outcome.REFUSED
        old = self._git("rev-parse", "HEAD")
        target = f"{self.remote}/{branch}"
        try:
            self._git("merge", "--ff-only", "--quiet", target)
        except UpdateError as exc:
            logger.warning("refusing to update %s -> %s: cannot fast-forward to %s (local commits, or untracked "
                           "files in the way): %s", _fmt(local), _fmt(remote), target, exc)
            return Outcome.REFUSED
        new = self._git("rev-parse", "HEAD")
        logger.info("updating %s -> %s (%s -> %s)", _fmt(local), _fmt(remote), old[:10], new[:10])
        if not self._install("install"):
            self._failed_versions.add(remote)
            self._git("reset", "--hard", "--quiet", old)
            reinstalled = self._install("reinstall of previous version")
            logger.error("install of %s failed: rolled back to %s (%s); previous version reinstalled: %s; "
                         "running processes were NOT restarted", _fmt(remote), _fmt(local), old[:10],
                         "yes" if reinstalled else "NO - check the environment")
            return Outcome.ROLLED_BACK
        restarted = [self._run(cmd, "restart", self.git_timeout_s) for cmd in self.restart_cmds]
        if not all(restarted):
            logger.error("updated to %s but %d of %d restart commands failed", _fmt(remote),
                         restarted.count(False), len(restarted))
            return Outcome.UPDATED_RESTART_FAILED
        logger.info("updated to %s and ran %d restart commands", _fmt(remote), len(restarted))
        return Outcome.UPDATED


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Update this checkout when a new version is released on the git remote, reinstall, restart.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1],
                        help="Git checkout to update.")
    parser.add_argument("--remote", default="origin", help="Git remote to follow.")
    parser.add_argument("--branch", default=None, help="Branch to follow (default: the one checked out).")
    parser.add_argument("--interval", type=float, default=300.0, help="Seconds between checks (at least 10).")
    parser.add_argument("--install-cmd", default=f"{shlex.quote(sys.executable)} -m pip install -e .",
                        help="Command (run in --repo) that installs the checked-out code.")
    parser.add_argument("--restart-cmd", action="append", default=[],
                        help="Command run after a successful install, e.g. 'pm2 restart bitmind_miner' (repeatable).")
    parser.add_argument("--version-file", default=DEFAULT_VERSION_FILE, help="File holding __version__.")
    parser.add_argument("--install-timeout", type=float, default=1800.0, help="Seconds allowed for the install.")
    parser.add_argument("--once", action="store_true",
                        help="Check once and exit: status 0 when up to date or updated, 1 when it needs attention.")
    parser.add_argument("--debug", action="store_true", help="Also log checks that find nothing to do.")
    args = parser.parse_args(argv)
    if args.interval < 10:
        parser.error("--interval must be at least 10 seconds")
    if args.install_timeout <= 0:
        parser.error("--install-timeout must be positive")
    try:
        args.install_cmd = shlex.split(args.install_cmd)
        args.restart_cmd = [shlex.split(cmd) for cmd in args.restart_cmd]
    except ValueError as exc:
        parser.error(f"cannot parse a command: {exc}")
    if not args.install_cmd or not all(args.restart_cmd):
        parser.error("commands must not be empty")
    return args


def _stop_on_signals() -> tuple[threading.Event, list[str], Callable[[], None]]:
    """SIGINT / SIGTERM (`pm2 stop`, Ctrl-C) set an event instead of raising KeyboardInterrupt, so a check in
    progress ends cleanly (never half-way through an update) and the process exits with one log line instead of a
    traceback in pm2's error log. Returns the event, the names of the signals received and a function that puts the
    previous handlers back."""
    stop, received = threading.Event(), []

    def on_signal(signum: int, _frame: object) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    return stop, received, restore


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one check with --once, otherwise poll until stopped and re-exec after an update."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    updater = Updater(repo=args.repo.resolve(), install_cmd=args.install_cmd, restart_cmds=args.restart_cmd,
                      remote=args.remote, branch=args.branch, version_file=args.version_file,
                      install_timeout_s=args.install_timeout)
    logger.info("auto-updater watching %s (%s/%s) every %.0f s; restart commands: %s", updater.repo, args.remote,
                args.branch or "<current branch>", args.interval,
                "; ".join(shlex.join(cmd) for cmd in args.restart_cmd) or "none")
    stop, received, restore = _stop_on_signals()
    try:
        if args.once:
            outcome = updater.check_once()
            return 0 if outcome in (Outcome.UP_TO_DATE, Outcome.UPDATED, Outcome.SKIPPED_FAILED_VERSION) else 1
        while not stop.is_set():
            outcome = updater.check_once()
            if stop.is_set():
                break
            if outcome in (Outcome.UPDATED, Outcome.UPDATED_RESTART_FAILED):
                logger.info("re-executing the auto-updater to run the updated code")
                os.execv(sys.executable, [sys.executable, "-m", "bitmind.autoupdate", *argv])
            stop.wait(args.interval)
        logger.info("auto-updater stopped by %s", received[0])
        return 0
    finally:
        restore()


if __name__ == "__main__":
    sys.exit(main())
