"""Auto-updater against a local bare git repository: update only on a version bump, roll back a failed install,
never touch local changes."""

import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bitmind.autoupdate import Outcome, Updater, UpdateError, main, parse_version

INSTALLER = """\
import pathlib, re, sys
version = re.search(r'"(.+)"', pathlib.Path("bitmind/__init__.py").read_text()).group(1)
broken = pathlib.Path("BROKEN").exists()
with open(sys.argv[1], "a") as log:
    log.write(("fail " if broken else "ok ") + version + "\\n")
sys.exit(1 if broken else 0)
"""
RESTARTER = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


class Sandbox:
    """An upstream bare repo, a maintainer's clone that publishes to it, and the operator's node checkout."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.publisher = root / "publisher"
        self.upstream = root / "upstream.git"
        self.node = root / "node"
        self.install_log = root / "install.log"
        self.restart_log = root / "restart.log"
        self.installer = root / "install.py"
        self.installer.write_text(INSTALLER)
        self.publisher.mkdir()
        git(self.publisher, "init", "-q", "-b", "main")
        self.write("bitmind/__init__.py", '__version__ = "1.0.0"\n')
        self.write("README.md", "node\n")
        self.commit("release 1.0.0")
        git(root, "clone", "-q", "--bare", str(self.publisher), str(self.upstream))
        git(self.publisher, "remote", "add", "origin", str(self.upstream))
        git(root, "clone", "-q", str(self.upstream), str(self.node))

    def write(self, relpath: str, text: str, repo: Path | None = None) -> None:
        path = (repo or self.publisher) / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def commit(self, message: str, repo: Path | None = None) -> None:
        git(repo or self.publisher, "add", "-A")
        git(repo or self.publisher, "commit", "-q", "-m", message)

    def publish(self, message: str, version: str | None = None, files: dict[str, str] | None = None,
                remove: tuple[str, ...] = ()) -> str:
        if version is not None:
            self.write("bitmind/__init__.py", f'__version__ = "{version}"\n')
        for relpath, text in (files or {}).items():
            self.write(relpath, text)
        for relpath in remove:
            (self.publisher / relpath).unlink()
        self.commit(message)
        git(self.publisher, "push", "-q", "origin", "main")
        return git(self.publisher, "rev-parse", "HEAD")

    def updater(self, **overrides) -> Updater:
        settings = dict(
            repo=self.node,
            install_cmd=[sys.executable, str(self.installer), str(self.install_log)],
            restart_cmds=[[sys.executable, "-c", RESTARTER, str(self.restart_log), app]
                          for app in ("bitmind_miner", "bitmind_generator")],
        )
        settings.update(overrides)
        return Updater(**settings)

    def head(self) -> str:
        return git(self.node, "rev-parse", "HEAD")

    def installs(self) -> list[str]:
        return self.install_log.read_text().splitlines() if self.install_log.exists() else []

    def restarts(self) -> list[str]:
        return self.restart_log.read_text().splitlines() if self.restart_log.exists() else []


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    # Isolate git from the machine's configuration and give commits an identity.
    empty = tmp_path / "gitconfig"
    empty.write_text("")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(empty))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for key in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME"):
        monkeypatch.setenv(key, "Test")
    for key in ("GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(key, "test@example.invalid")
    return Sandbox(tmp_path)


def test_commit_without_version_bump_changes_nothing(sandbox: Sandbox) -> None:
    start = sandbox.head()
    sandbox.publish("docs only", files={"README.md": "better docs\n"})
    assert sandbox.updater().check_once() is Outcome.UP_TO_DATE
    assert sandbox.head() == start
    assert sandbox.installs() == [] and sandbox.restarts() == []


def test_version_bump_fast_forwards_installs_and_restarts(sandbox: Sandbox) -> None:
    sandbox.publish("docs only", files={"README.md": "better docs\n"})
    new = sandbox.publish("release 1.1.0", version="1.1.0")
    assert sandbox.updater().check_once() is Outcome.UPDATED
    assert sandbox.head() == new
    assert sandbox.installs() == ["ok 1.1.0"]  # installed from the updated checkout
    assert sandbox.restarts() == ["bitmind_miner", "bitmind_generator"]
    assert sandbox.updater().check_once() is Outcome.UP_TO_DATE  # nothing more to do
    assert sandbox.installs() == ["ok 1.1.0"]


def test_failed_install_rolls_back_and_keeps_running_version(sandbox: Sandbox) -> None:
    start = sandbox.head()
    sandbox.publish("release 1.1.0 (broken)", version="1.1.0", files={"BROKEN": "yes\n"})
    updater = sandbox.updater()
    assert updater.check_once() is Outcome.ROLLED_BACK
    assert sandbox.head() == start
    assert not (sandbox.node / "BROKEN").exists()
    assert git(sandbox.node, "status", "--porcelain") == ""
    assert sandbox.installs() == ["fail 1.1.0", "ok 1.0.0"]  # the previous version reinstalled
    assert sandbox.restarts() == []  # running processes keep the old code

    assert updater.check_once() is Outcome.SKIPPED_FAILED_VERSION  # no install loop every interval
    assert sandbox.installs() == ["fail 1.1.0", "ok 1.0.0"]

    fixed = sandbox.publish("release 1.1.1", version="1.1.1", remove=("BROKEN",))
    assert updater.check_once() is Outcome.UPDATED
    assert sandbox.head() == fixed
    assert sandbox.installs()[-1] == "ok 1.1.1"
    assert sandbox.restarts() == ["bitmind_miner", "bitmind_generator"]


def test_dirty_worktree_is_refused_and_kept(sandbox: Sandbox) -> None:
    start = sandbox.head()
    (sandbox.node / "README.md").write_text("operator's local edit\n")
    sandbox.publish("release 1.1.0", version="1.1.0")
    assert sandbox.updater().check_once() is Outcome.REFUSED
    assert sandbox.head() == start
    assert (sandbox.node / "README.md").read_text() == "operator's local edit\n"
    assert sandbox.installs() == [] and sandbox.restarts() == []

    git(sandbox.node, "add", "README.md")  # staged changes count too
    assert sandbox.updater().check_once() is Outcome.REFUSED
    assert sandbox.head() == start


def test_untracked_files_do_not_block_and_survive(sandbox: Sandbox) -> None:
    (sandbox.node / "miner.env").write_text("WALLET_NAME=w\n")
    new = sandbox.publish("release 1.1.0", version="1.1.0")
    assert sandbox.updater().check_once() is Outcome.UPDATED
    assert sandbox.head() == new
    assert (sandbox.node / "miner.env").read_text() == "WALLET_NAME=w\n"


def test_diverged_history_is_refused(sandbox: Sandbox) -> None:
    sandbox.write("local.txt", "mine\n", repo=sandbox.node)
    sandbox.commit("local commit", repo=sandbox.node)
    local = sandbox.head()
    sandbox.publish("release 1.1.0", version="1.1.0")
    assert sandbox.updater().check_once() is Outcome.REFUSED
    assert sandbox.head() == local
    assert sandbox.installs() == []


def test_no_downgrade_and_wrong_branch(sandbox: Sandbox) -> None:
    sandbox.write("bitmind/__init__.py", '__version__ = "2.0.0"\n', repo=sandbox.node)
    sandbox.commit("local 2.0.0", repo=sandbox.node)
    sandbox.publish("release 1.5.0", version="1.5.0")
    assert sandbox.updater().check_once() is Outcome.UP_TO_DATE

    git(sandbox.node, "checkout", "-q", "-b", "feature")
    assert sandbox.updater(branch="main").check_once() is Outcome.REFUSED
    git(sandbox.node, "checkout", "-q", "--detach")
    assert sandbox.updater().check_once() is Outcome.ERROR


def test_git_and_version_problems_are_errors_not_crashes(sandbox: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    sandbox.publish("no version", files={"bitmind/__init__.py": "VERSION = 'oops'\n"})
    assert sandbox.updater().check_once() is Outcome.ERROR
    git(sandbox.node, "remote", "set-url", "origin", str(sandbox.root / "gone.git"))
    with caplog.at_level(logging.ERROR):
        assert sandbox.updater().check_once() is Outcome.ERROR
    assert "fatal: '" in caplog.text and "does not appear to be a git repository" in caplog.text  # git's cause
    assert sandbox.updater(repo=sandbox.root / "not-a-repo").check_once() is Outcome.ERROR
    assert sandbox.installs() == []


def test_failed_restart_is_reported(sandbox: Sandbox) -> None:
    sandbox.publish("release 1.1.0", version="1.1.0")
    updater = sandbox.updater(restart_cmds=[[sys.executable, "-c", "raise SystemExit(3)"],
                                            ["/nonexistent/pm2", "restart", "x"]])
    assert updater.check_once() is Outcome.UPDATED_RESTART_FAILED
    assert sandbox.installs() == ["ok 1.1.0"]


def test_cli_once(sandbox: Sandbox) -> None:
    new = sandbox.publish("release 1.1.0", version="1.1.0")
    install = f"{sys.executable} {sandbox.installer} {sandbox.install_log}"
    restart = f"{sys.executable} -c \"{RESTARTER}\" {sandbox.restart_log} bitmind_validator"
    assert main(["--repo", str(sandbox.node), "--once", "--install-cmd", install, "--restart-cmd", restart]) == 0
    assert sandbox.head() == new
    assert sandbox.restarts() == ["bitmind_validator"]
    (sandbox.node / "README.md").write_text("dirty\n")
    sandbox.publish("release 1.2.0", version="1.2.0")
    assert main(["--repo", str(sandbox.node), "--once", "--install-cmd", install]) == 1  # refused: needs attention


@pytest.mark.parametrize("argv", [
    ["--interval", "5"],
    ["--install-cmd", ""],
    ["--install-cmd", "pip 'unterminated"],
    ["--restart-cmd", ""],
    ["--install-timeout", "0"],
])
def test_cli_rejects_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--once", *argv])
    assert excinfo.value.code == 2
    assert "error" in capsys.readouterr().err


def test_parse_version() -> None:
    assert parse_version('"""Doc."""\n\n__version__ = "2.10.3"\n') == (2, 10, 3)
    assert parse_version("__version__ = '1.2.3'") < parse_version('__version__ = "1.10.0"')  # numeric, not text
    for bad in ("", "__version__ = '1.2'", "version = '1.2.3'", "__version__ = '1.2.3rc1'"):
        with pytest.raises(UpdateError):
            parse_version(bad)


def _start_cli(sandbox: Sandbox, install: str) -> subprocess.Popen:
    restart = f"{sys.executable} -c \"{RESTARTER}\" {sandbox.restart_log} bitmind_miner"
    argv = ["--repo", str(sandbox.node), "--interval", "10", "--debug", "--install-cmd", install,
            "--restart-cmd", restart]
    return subprocess.Popen([sys.executable, "-m", "bitmind.autoupdate", *argv], cwd=Path(__file__).parents[1],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(proc: subprocess.Popen, text: str) -> None:
    for line in proc.stdout:  # the updater logs every check with --debug; a dead process ends the loop
        if text in line:
            return
    raise AssertionError(f"the auto-updater exited (status {proc.wait()}) before logging {text!r}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_signal_while_waiting_exits_with_one_line(sandbox: Sandbox, signum: int) -> None:
    proc = _start_cli(sandbox, f"{sys.executable} {sandbox.installer} {sandbox.install_log}")
    try:
        _read_until(proc, "up to date")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert out.count("auto-updater stopped by") == 1 and f"auto-updater stopped by {signum.name}" in out


def test_stop_signal_during_an_update_lets_it_finish_first(sandbox: Sandbox) -> None:
    # The install command itself sends SIGINT to the updater (as `pm2 stop` would, mid-install).
    new = sandbox.publish("release 1.1.0", version="1.1.0")
    install = f"{sys.executable} -c \"import os, signal; os.kill(os.getppid(), signal.SIGINT)\""
    proc = _start_cli(sandbox, install)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert sandbox.head() == new and sandbox.restarts() == ["bitmind_miner"]  # installed and restarted, not half
    assert "updated to 1.1.0" in out and "re-executing" not in out
    assert out.rstrip().endswith("auto-updater stopped by SIGINT")
