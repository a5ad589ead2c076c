"""Helpers for the operator-script tests: a sandbox copy of the repository's scripts, env files filled in from the
real templates, and tools that CI must have (missing there: a failure, not a skip)."""

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from tests._required import missing

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
# Files the scripts read besides scripts/ (setup hashes them; the auto-updater reads the version).
PROJECT_FILES = ("setup.py", "pyproject.toml", "bitmind/__init__.py")
GIT_IDENTITY = {"GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.invalid",
                "GIT_COMMITTER_NAME": "test", "GIT_COMMITTER_EMAIL": "test@example.invalid"}


def require_tool(found: str | None, what: str, hint: str) -> str:
    """`found` (a path), or fail under CI (CI=true must run everything) / skip elsewhere with how to get it."""
    if not found:
        missing(f"{what} not found: {hint}")
    return found


def pm2_path() -> str:
    """The pinned pm2 that scripts/install_pm2.sh installed (the project's own setup; .ci/run runs it)."""
    done = subprocess.run(["bash", str(SCRIPTS / "install_pm2.sh"), "--print-path"], capture_output=True, text=True,
                          timeout=60)
    return require_tool(done.stdout.strip() if done.returncode == 0 else None, "pm2",
                        f"{done.stderr.strip()} (scripts/install_pm2.sh installs the pinned release)")


def make_repo(root: Path) -> Path:
    """A git checkout at `root/repo` holding a copy of scripts/ and the project files, with a bare `origin`."""
    repo = root / "repo"
    shutil.copytree(SCRIPTS, repo / "scripts")
    for relpath in PROJECT_FILES:
        (repo / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relpath, repo / relpath)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "release")
    git(root, "clone", "-q", "--bare", str(repo), str(root / "origin.git"))
    git(repo, "remote", "add", "origin", str(root / "origin.git"))
    git(repo, "fetch", "-q", "origin")
    git(repo, "branch", "-q", "--set-upstream-to", "origin/main")
    return repo


def git(cwd: Path, *args: str) -> str:
    env = {**os.environ, **GIT_IDENTITY}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
                          check=True).stdout


def write_env(path: Path, role: str, **values: str) -> Path:
    """`path` = scripts/<role>.env.example with the given variables set (each must exist in the template)."""
    text = (SCRIPTS / f"{role}.env.example").read_text()
    for name, value in values.items():
        text, count = re.subn(rf"^{name}=.*$", lambda _: f"{name}={shlex.quote(value)}", text, flags=re.MULTILINE)
        assert count == 1, f"{name} is not a variable of {role}.env.example"
    path.write_text(text)
    return path
