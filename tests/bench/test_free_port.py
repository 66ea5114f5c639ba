"""free_port: a free loopback port, from the process's own range when one is set."""

from __future__ import annotations

import socket

import pytest

from bastion.bench.launcher import PORT_RANGE_ENV, free_port


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _held_port_with_free_neighbours() -> socket.socket:
    """A listening socket whose next three ports are free now: the kernel hands them out to
    other processes too (the suite's servers and clients run beside this test), and a
    neighbour taken by one of them is not what this test is about."""
    for _ in range(50):
        held = socket.socket()
        held.bind(("127.0.0.1", 0))
        busy = held.getsockname()[1]
        if all(_bindable(busy + i) for i in (1, 2, 3)):
            held.listen(1)
            return held
        held.close()
    raise RuntimeError("no port with three free neighbours")


def test_a_range_confines_the_ports_and_skips_the_ones_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    held = _held_port_with_free_neighbours()
    busy = held.getsockname()[1]
    try:
        monkeypatch.setenv(PORT_RANGE_ENV, f"{busy}-{busy + 1}")
        # the range's only other port, wherever the cursor is: the listening one is taken
        for _ in range(10):
            assert free_port() == busy + 1
        monkeypatch.setenv(PORT_RANGE_ENV, f"{busy + 1}-{busy + 3}")
        picked = [free_port() for _ in range(3)]
        assert sorted(picked) == [busy + 1, busy + 2, busy + 3]  # one after another, not the same twice
        monkeypatch.setenv(PORT_RANGE_ENV, f"{busy}-{busy}")
        with pytest.raises(OSError, match="no free port in the range"):
            free_port()
    finally:
        held.close()


def test_without_a_range_the_kernel_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PORT_RANGE_ENV, raising=False)
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # it was free
