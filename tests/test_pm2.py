"""The operator's path under REAL pm2 (the pinned release scripts/install_pm2.sh installs): scripts/ecosystem.config.js
starts the miner, the validator, the generator (tiny random Stable Diffusion) and the auto-updater from env files
filled in from the templates, against a LocalChain. The test waits for each heartbeat, for weights on the chain,
freezes the miner so the validator's watchdog exits 75 and pm2 restarts it, publishes a release the auto-updater
installs (it restarts the generator through pm2), and leaves no process behind (`pm2 kill` on its own PM2_HOME).

Runs in a git sandbox holding a copy of scripts/ (the auto-updater must not touch this checkout); the processes are
the project's installed console scripts (VENV_DIR = this interpreter's venv)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bitmind.chain.local import LocalChain
from bitmind.dev_wallets import make_wallet
from bitmind.ports import free_port
from tests._scripts_sandbox import git, make_repo, pm2_path, write_env

NETUID = 34
APPS = ("bitmind_miner", "bitmind_validator", "bitmind_generator", "bitmind_autoupdate")
# The validator's watchdog: above its start-up (real-image prefill, first step: ~15 s on 2 busy cores), below its
# query timeout, so a frozen miner stalls a step past it.
WATCHDOG_S = 30
QUERY_TIMEOUT_S = 90
WAIT_S = 240  # bound on every wait below
CHILD_ENV = {"READ_ONLY": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie counts as gone: it runs nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Pm2:
    """The pm2 CLI on a private PM2_HOME, and what the test saw of it (for diagnostics and the leftover check)."""

    def __init__(self, exe: str, repo: Path, env: dict[str, str]) -> None:
        self.exe, self.repo, self.env = exe, repo, env
        self.home = Path(env["PM2_HOME"])
        self.pids: set[int] = set()

    def __call__(self, *args: str, timeout: float = 120) -> str:
        done = subprocess.run([self.exe, *args], cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"pm2 {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def apps(self) -> dict[str, dict[str, Any]]:
        """name -> {pid, status, restarts, exit_code, out_log} from `pm2 jlist`."""
        out = self("jlist")
        found = {}
        for app in json.loads(out[out.index("["):]):
            env = app["pm2_env"]
            found[app["name"]] = {"pid": app["pid"], "status": env["status"], "restarts": env["restart_time"],
                                  "exit_code": env.get("exit_code"), "out_log": env["pm_out_log_path"]}
            if app["pid"]:
                self.pids.add(app["pid"])
        return found

    def log(self, app: str) -> str:
        """Everything `app` printed to stdout so far (the file pm2 writes it to)."""
        return Path(self.apps()[app]["out_log"]).read_text(errors="replace")

    def logs(self) -> str:
        """The tail of every app's log (what `pm2 logs` shows), for failure messages."""
        parts = []
        for path in sorted((self.home / "logs").glob("*.log")):
            lines = path.read_text(errors="replace").splitlines()[-40:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def kill(self) -> None:
        """`pm2 kill`: stops every app (SIGINT, then SIGKILL after its kill_timeout) and the daemon."""
        pid_file = self.home / "pm2.pid"
        if pid_file.exists():
            self.pids.add(int(pid_file.read_text()))
        subprocess.run([self.exe, "kill"], cwd=self.repo, env=self.env, capture_output=True, timeout=180)


def _wait(condition: Callable[[], Any], what: str, pm2: Pm2, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}\n{pm2.apps()}\n{pm2.logs()}")


def _heartbeat(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _beating(path: Path, pm2: Pm2, app: str, not_pid: int | None = None) -> dict[str, Any] | None:
    """The heartbeat when the process pm2 runs now for `app` wrote it (and it is not `not_pid`)."""
    beat = _heartbeat(path)
    pid = pm2.apps().get(app, {}).get("pid")
    if beat and beat.get("pid") == pid and pid != not_pid:
        return beat
    return None


def _release(root: Path) -> str:
    """Publish a higher version on the sandbox's origin (as maintainers do); returns the new commit."""
    dev = root / "dev"
    git(root, "clone", "-q", str(root / "origin.git"), str(dev))
    init = dev / "bitmind" / "__init__.py"
    major, minor, patch = re.search(r'__version__ = "(\d+)\.(\d+)\.(\d+)"', init.read_text()).groups()
    init.write_text(init.read_text().replace(f'"{major}.{minor}.{patch}"', f'"{major}.{minor}.{int(patch) + 1}"'))
    git(dev, "commit", "-q", "-am", "release")
    git(dev, "push", "-q", "origin", "main")
    return git(dev, "rev-parse", "HEAD").strip()


def _write_env_files(repo: Path, root: Path, chain_path: Path, tiny_sd: Path) -> dict[str, Path]:
    """miner.env and validator.env at the sandbox's root, from the templates; returns each process's state folder."""
    state = {name: root / "state" / name for name in ("miner", "validator", "generator")}
    common = {"CHAIN": "local", "CHAIN_PATH": str(chain_path), "WALLET_PATH": str(root / "wallets"), "DEVICE": "cpu"}
    write_env(repo / "miner.env", "miner", **common, WALLET_NAME="pm2-miner", WALLET_HOTKEY="default",
              AXON_PORT=str(free_port()), AXON_EXTERNAL_IP="127.0.0.1", DETECTOR="baseline",
              STATE_DIR=str(state["miner"]), WATCHDOG_TIMEOUT="0",
              EXTRA_ARGS="--neuron.sync_interval 5 --miner.workers 1 --miner.torch_threads 1")
    write_env(repo / "validator.env", "validator", **common, WALLET_NAME="pm2-validator", WALLET_HOTKEY="default",
              SAMPLE_SIZE="1", QUERY_TIMEOUT=str(QUERY_TIMEOUT_S), STATE_DIR=str(state["validator"]),
              WATCHDOG_TIMEOUT=str(WATCHDOG_S), SYNTHETIC_CACHE=str(root / "synthetic"), EXTERNAL_IP="127.0.0.1",
              EXTRA_ARGS=f"--neuron.epoch_length 4 --neuron.step_interval 1 --neuron.sync_interval 5 "
                         f"--validator.real_datasets packaged --validator.real_cache {root / 'real'} "
                         "--validator.prefill_images 4 --validator.augment_probs 0:1",
              GENERATOR_STATE_DIR=str(state["generator"]),
              GENERATOR_EXTRA_ARGS=f"--generator.models {tiny_sd} --generator.prompt_mode static "
                                   "--generator.captioner none --generator.rewriter none --generator.resolution 64 "
                                   "--generator.steps 2 --generator.batch 1 --generator.interval 5 "
                                   "--generator.torch_threads 1",
              AUTOUPDATE_INTERVAL="10", AUTOUPDATE_APPS="bitmind_generator", AUTOUPDATE_INSTALL_CMD="true")
    return state


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pm2_runs_the_node_from_the_env_files(tmp_path: Path) -> None:
    started = time.monotonic()
    exe = pm2_path()
    repo = make_repo(tmp_path)
    chain_path = tmp_path / "chain.sqlite"
    chain = LocalChain(chain_path, netuid=NETUID, seconds_per_block=0.5, weights_rate_limit=3)
    validator_wallet = make_wallet(tmp_path / "wallets", "pm2-validator")
    miner_wallet = make_wallet(tmp_path / "wallets", "pm2-miner")
    validator_hotkey = validator_wallet.hotkey.ss58_address
    chain.register_hotkey(validator_hotkey, validator_wallet.coldkeypub.ss58_address, stake=1000.0)
    miner_uid = chain.register_hotkey(miner_wallet.hotkey.ss58_address, miner_wallet.coldkeypub.ss58_address)
    tiny_sd = tmp_path / "tiny-sd"
    state = _write_env_files(repo, tmp_path, chain_path, tiny_sd)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "PM2_HOME": str(tmp_path / "pm2"),
           "BITMIND_HOME": str(tmp_path / "bitmind"), "VENV_DIR": sys.prefix, "PM2_BIN": exe, **CHILD_ENV}
    pm2 = Pm2(exe, repo, env)
    frozen: int | None = None
    builder: subprocess.Popen | None = None
    try:
        # The tiny diffusion pipeline is built while the miner and validator start; then the generator starts.
        builder = subprocess.Popen(
            [sys.executable, "-c", "import pathlib, sys; from validator.generation.tiny_models import build_tiny_sd; "
             "build_tiny_sd(pathlib.Path(sys.argv[1]))", str(tiny_sd)],
            env={**os.environ, **CHILD_ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        pm2("start", "scripts/ecosystem.config.js", "--only", "bitmind_miner,bitmind_validator,bitmind_autoupdate")
        assert builder.wait(timeout=WAIT_S) == 0, builder.stderr.read()
        pm2("start", "scripts/ecosystem.config.js", "--only", "bitmind_generator")

        # Every process runs under pm2 and reports progress.
        beats = {name: _wait(lambda name=name: _beating(state[name] / "heartbeat.json", pm2, f"bitmind_{name}"),
                             f"the {name}'s heartbeat", pm2) for name in state}
        assert beats["validator"]["role"] == "validator" and beats["miner"]["role"] == "miner"
        assert pm2.apps()["bitmind_autoupdate"]["status"] == "online"

        # The validator scores the miner and its weights land on the chain.
        weights = _wait(lambda: chain.last_weights_block(validator_hotkey) is not None
                        and chain.get_weights(validator_hotkey), "weights on the local chain", pm2)
        assert weights.get(miner_uid, 0) > 0, weights

        # A release on origin: the auto-updater fast-forwards the checkout and has pm2 restart the generator.
        generator_pid = pm2.apps()["bitmind_generator"]["pid"]
        new_commit = _release(tmp_path)
        # Meanwhile a frozen miner stalls the validator's step past its watchdog: exit 75, and pm2 restarts it.
        before = pm2.apps()["bitmind_validator"]
        watchdog_exits = pm2.log("bitmind_validator").count("watchdog: no progress for")
        frozen = pm2.apps()["bitmind_miner"]["pid"]
        os.kill(frozen, signal.SIGSTOP)
        restarted = _wait(lambda: (app := pm2.apps()["bitmind_validator"])["restarts"] > before["restarts"] and app,
                          "pm2 to restart the validator after its watchdog exit", pm2)
        assert restarted["exit_code"] == 75, restarted
        assert pm2.log("bitmind_validator").count("watchdog: no progress for") == watchdog_exits + 1
        os.kill(frozen, signal.SIGCONT)
        frozen = None
        _wait(lambda: _beating(state["validator"] / "heartbeat.json", pm2, "bitmind_validator", before["pid"]),
              "the restarted validator's heartbeat", pm2)

        _wait(lambda: git(repo, "rev-parse", "HEAD").strip() == new_commit, "the auto-updater's fast-forward", pm2)
        _wait(lambda: _beating(state["generator"] / "heartbeat.json", pm2, "bitmind_generator", generator_pid),
              "the generator restarted by the auto-updater", pm2)
        apps = pm2.apps()
        assert {name: app["status"] for name, app in apps.items()} == dict.fromkeys(APPS, "online"), apps
        assert apps["bitmind_miner"]["restarts"] == 0, pm2.logs()  # nothing else restarted
    finally:
        if frozen is not None:
            os.kill(frozen, signal.SIGCONT)
        if builder is not None and builder.poll() is None:
            builder.kill()
            builder.wait(timeout=30)
        pm2.kill()
        chain.close()
    left = [pid for pid in pm2.pids if _alive(pid)]
    assert left == [], f"still running after pm2 kill: {left}"
    print(f"pm2 end-to-end wall time {time.monotonic() - started:.1f} s")
