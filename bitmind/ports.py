"""Local TCP ports for the local subnet, benchmarks and tests: free ones to bind, and whether one answers."""

import socket

__all__ = ["free_port", "free_ports", "port_answers"]


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports nobody listens on right now (on every interface, as uvicorn binds 0.0.0.0)."""
    ports: list[int] = []
    while len(ports) < count:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        if port not in ports:
            ports.append(port)
    return ports


def free_port() -> int:
    """One TCP port nobody listens on right now."""
    return free_ports(1)[0]


def port_answers(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False
