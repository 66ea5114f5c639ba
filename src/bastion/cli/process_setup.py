"""Process-level setup shared by a server process and the supervisor of several.

Kept apart from ``serve.py`` and ``workers.py`` so that both can use it without
importing each other: the supervisor probes the port with the same socket a worker binds.
"""

from __future__ import annotations

import asyncio
import socket
import sys


def http_socket(host: str, port: int, reuse_port: bool, *, listen: bool = True) -> socket.socket:
    """A bound, non-blocking TCP socket for the HTTP server, listening unless ``listen`` is
    False (then the HTTP server starts listening when it starts serving on it).

    Bound before any model loads, so a port clash fails in milliseconds rather than after
    minutes of loading; ``reuse_port`` lets several workers share the port (SO_REUSEPORT).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    if listen:
        sock.listen(2048)
    sock.setblocking(False)
    return sock


def install_uvloop() -> None:
    """Make the next ``asyncio.run`` use uvloop (where installed): the HTTP server's
    protocol callbacks cost noticeably less on it than on the default loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return
    if sys.version_info >= (3, 12):
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        uvloop.install()
