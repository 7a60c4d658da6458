"""Ports picked for a process to bind later."""

from __future__ import annotations

import socket
from pathlib import Path

from shared.processes import free_port


def test_a_port_picked_for_later_is_free_and_outside_what_bind_zero_hands_out() -> None:
    ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    picks = {free_port() for _ in range(50)}
    assert all(port < ephemeral_low for port in picks)
    for port in list(picks)[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))  # free, as promised
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        assert sock.getsockname()[1] >= ephemeral_low  # another process's bind(0) cannot take a pick
