"""Local ports: free ones really are free and distinct; `port_answers` tells a listener from nobody."""

import socket

from bitmind.ports import free_port, free_ports, port_answers


def test_free_ports_are_distinct_and_bindable():
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports + [free_port()]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_port_answers_only_while_someone_listens():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert port_answers("127.0.0.1", port)
    assert not port_answers("127.0.0.1", port)
