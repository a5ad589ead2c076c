"""A miner started with DEFAULT flags is reachable the way validators reach it.

Every server here is built from flags parsed by the miner's real `build_parser()` without `--axon.ip` (bittensor's
default `[::]`), through the miner's own `build_server`, on real sockets, and queried with a real Dendrite (via
`ValidatorClient`) or raw HTTP. The IPv6-disabled host and the offline host are network namespaces the test makes
with `unshare -n`.
"""

import dataclasses
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from bitmind.config import build_config
from bitmind.protocol import ImageSynapse
from bitmind.transport import MinerServer, ServeError, ValidatorClient
from neurons.miner import advertised_ip, build_parser, build_server
from tests._wallets import free_port, make_wallet

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[1]
# Documentation addresses (RFC 5737): never dialled. A validator whose own IP differs from the miner's makes the
# Dendrite dial the miner's address itself (for its own IP it dials 0.0.0.0).
ADVERTISED = "203.0.113.5"
VALIDATOR_IP = "198.51.100.7"
PREDICTION = 0.25
IMAGE = "aW1hZ2U="


async def forward(synapse: ImageSynapse) -> ImageSynapse:
    synapse.prediction = PREDICTION
    return synapse


def miner_config(port: int, *extra: str):
    """The miner's flags as an operator would give them: no --axon.ip."""
    return build_config(build_parser(), ["--axon.port", str(port), "--axon.external_ip", ADVERTISED, *extra])


@pytest.fixture
def wallets(tmp_path):
    return {name: make_wallet(tmp_path / "wallets", name) for name in ("miner", "validator")}


@pytest.fixture
def serve(wallets):
    """`serve(*flags)` starts the miner's axon on a free port from those flags; stopped after the test."""
    servers: list[MinerServer] = []

    def start(*flags: str) -> MinerServer:
        config = miner_config(free_port(), *flags)
        server = build_server(config, wallets["miner"], forward, None, advertised_ip(config))
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


def query(wallets, server: MinerServer, host: str):
    """One Dendrite query to the miner's port at `host`, signed by the validator wallet."""
    client = ValidatorClient(wallets["validator"], external_ip=VALIDATOR_IP)
    try:
        [answer] = client.query_sync([dataclasses.replace(server.info(), ip=host)], IMAGE, timeout=5.0)
    finally:
        client.close()
    return answer


def raw_post(host: str, port: int) -> str:
    """`curl -X POST http://host:port/ImageSynapse` by hand (no body, no Content-Length): the status line, or the
    connection error's name."""
    try:
        with socket.create_connection((host, port), timeout=5) as conn:
            conn.sendall("POST /ImageSynapse HTTP/1.1\r\nHost: miner\r\nConnection: close\r\n\r\n".encode())
            return conn.recv(4096).split(b"\r\n", 1)[0].decode()
    except OSError as exc:
        return type(exc).__name__


def test_default_axon_ip_is_the_wildcard_bittensor_sets():
    assert miner_config(8091).axon.ip == "[::]"  # the tests below really run on the default


def test_default_flag_miner_answers_a_dendrite_over_ipv4_and_ipv6(serve, wallets):
    server = serve()
    for host in ("127.0.0.1", "::1"):
        answer = query(wallets, server, host)
        assert (answer.status, answer.prediction) == (200, PREDICTION), host


def test_default_flag_miner_answers_raw_http_over_both_families(serve):
    server = serve()
    # Our guard answers a body-less POST with 411: the HTTP server is there, on each family.
    assert raw_post("127.0.0.1", server.port) == "HTTP/1.1 411 Length Required"
    assert raw_post("::1", server.port) == "HTTP/1.1 411 Length Required"


def test_miner_advertises_the_external_address_not_the_bound_one(serve):
    info = serve("--axon.external_port", "40123").info()
    assert (info.ip, info.port, info.ip_type) == (ADVERTISED, 40123, 4)


def test_explicit_ipv4_address_binds_ipv4_only(serve, wallets):
    server = serve("--axon.ip", "127.0.0.1")
    assert query(wallets, server, "127.0.0.1").status == 200
    assert raw_post("::1", server.port) == "ConnectionRefusedError"
    assert query(wallets, server, "::1").status == 503


def test_explicit_ipv6_address_binds_ipv6_only(serve, wallets):
    server = serve("--axon.ip", "::1")
    assert query(wallets, server, "::1").status == 200
    assert raw_post("127.0.0.1", server.port) == "ConnectionRefusedError"


@pytest.mark.parametrize("flags, bound", [((), "[::]"), (("--axon.ip", "127.0.0.1"), "127.0.0.1")])
def test_taken_port_is_a_clear_error(wallets, flags, bound):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = miner_config(port, *flags)
        server = build_server(config, wallets["miner"], forward, None, ADVERTISED)
        with pytest.raises(ServeError, match=re.escape(f"cannot serve on {bound}:{port}: Address already in use")):
            server.start()


@pytest.mark.parametrize(
    "flags, message",
    [
        (("--axon.ip", "localhost"), "--axon.ip must be an IP address"),
        (("--axon.external_port", "80"), "--axon.external_port must be in 1025..65534, got 80"),
    ],
)
def test_bad_axon_flags_are_clear_errors(wallets, flags, message):
    config = miner_config(free_port(), *flags)
    with pytest.raises(ServeError, match=message):
        build_server(config, wallets["miner"], forward, None, ADVERTISED).start()


# ---- hosts made by the test: network namespaces -----------------------------------------------------------------


def in_new_netns(command: list[str], setup: str = "") -> subprocess.CompletedProcess:
    """Run `command` in a fresh network namespace (only `lo`, brought up; then the `setup` shell commands)."""
    missing = [tool for tool in ("unshare", "ip") if shutil.which(tool) is None]
    probe = None if missing else subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if missing or probe.returncode != 0:
        reason = f"cannot make a network namespace: {missing or probe.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if "AXON" not in k} | {"READ_ONLY": "1", "PYTHONPATH": str(REPO)}
    script = f'ip link set lo up && {setup or "true"} && exec "$@"'
    return subprocess.run(
        ["unshare", "-n", "--", "sh", "-c", script, "sh", *command],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=150,
    )


IPV6_DISABLED_CHILD = """
import logging, socket, sys, tempfile
from bitmind.dev_wallets import make_wallet
from bitmind.ports import free_port
from neurons.miner import advertised_ip, build_server
from tests.test_miner_reachability import forward, miner_config, query, raw_post

logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
try:
    socket.socket(socket.AF_INET6).bind(("::1", 0))
    print("ipv6 loopback: usable")
except OSError as exc:
    print("ipv6 loopback:", exc.strerror)
root = tempfile.mkdtemp()
wallets = {name: make_wallet(root, name) for name in ("miner", "validator")}
config = miner_config(free_port())
server = build_server(config, wallets["miner"], forward, None, advertised_ip(config)).start()
answer = query(wallets, server, "127.0.0.1")
print("dendrite over 127.0.0.1:", answer.status, answer.prediction)
print("raw POST over 127.0.0.1:", raw_post("127.0.0.1", server.port))
server.stop()
"""


def test_default_flag_miner_starts_and_answers_where_ipv6_is_disabled():
    disable_ipv6 = "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && echo 1 > /proc/sys/net/ipv6/conf/lo/disable_ipv6"
    done = in_new_netns([sys.executable, "-c", IPV6_DISABLED_CHILD], setup=disable_ipv6)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "ipv6 loopback: Cannot assign requested address" in output  # the namespace really has no IPv6
    assert "serving ImageSynapse on 0.0.0.0:" in output and "(IPv4)" in output
    assert f"dendrite over 127.0.0.1: 200 {PREDICTION}" in output
    assert "raw POST over 127.0.0.1: HTTP/1.1 411 Length Required" in output


def test_offline_miner_on_the_real_chain_exits_with_one_line_naming_the_setting(tmp_path):
    make_wallet(tmp_path / "wallets", "miner")
    done = in_new_netns([
        sys.executable, "-m", "neurons.miner", "--wallet.path", str(tmp_path / "wallets"), "--wallet.name", "miner",
        "--wallet.hotkey", "default", "--axon.port", str(free_port()), "--neuron.state_dir", str(tmp_path / "state"),
        "--neuron.watchdog_timeout", "0",
    ])  # --chain defaults to the real bittensor chain; no --axon.external_ip
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "public IP lookup failed" in output  # the lookup really ran, and failed offline
    [line] = [line for line in done.stderr.splitlines() if "AXON_EXTERNAL_IP" in line]
    assert "--axon.external_ip" in line and "cannot find this machine's public IP" in line
    assert "Traceback" not in output


# ---- the advertised address -------------------------------------------------------------------------------------


def test_failed_lookup_on_a_local_chain_advertises_loopback(monkeypatch):
    import bittensor.utils.networking as networking

    def offline():
        raise networking.ExternalIPNotFound

    monkeypatch.setattr(networking, "get_external_ip", offline)
    config = build_config(build_parser(), ["--chain", "local"])
    assert advertised_ip(config) == "127.0.0.1"
    with pytest.raises(SystemExit, match="AXON_EXTERNAL_IP in miner.env \\(--axon.external_ip\\)"):
        advertised_ip(build_config(build_parser(), []))  # the real chain


def test_looked_up_ip_is_advertised_without_the_lookups_newline(monkeypatch):
    import bittensor.utils.networking as networking

    monkeypatch.setattr(networking, "get_external_ip", lambda: "203.0.113.9\n")  # as bittensor's curl fallback reads it
    assert advertised_ip(build_config(build_parser(), [])) == "203.0.113.9"


def test_external_ip_must_be_an_ip():
    with pytest.raises(SystemExit, match="--axon.external_ip must be an IP address, got 'miner.example'"):
        advertised_ip(build_config(build_parser(), ["--axon.external_ip", "miner.example"]))
    assert advertised_ip(build_config(build_parser(), ["--axon.external_ip", "2001:db8::5"])) == "2001:db8::5"
