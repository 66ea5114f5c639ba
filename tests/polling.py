"""Wait for a condition instead of sleeping a fixed time and hoping it happened.

``wait_until(predicate, timeout, interval, what=...)`` returns as soon as ``predicate()``
is true, so a generous deadline costs nothing on a fast machine and saves a slow one (a
loaded CI runner is slow, not wrong). On timeout it fails with a message naming what was
awaited, the last value seen and, when given, ``details()`` (a server's log, say).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 30.0


class NotReached(AssertionError):
    """The awaited condition did not hold by the deadline."""


def _message(what: str, timeout: float, last: object, details: Callable[[], str] | None) -> str:
    text = f"timed out after {timeout:g} s waiting for {what} (last value: {last!r})"
    if details is not None:
        text += "\n" + details()
    return text


def wait_until(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.05,
    *,
    what: str = "the condition",
    details: Callable[[], str] | None = None,
) -> T:
    """Call ``predicate`` every ``interval`` s until it returns something truthy and return
    that; raise :class:`NotReached` (an ``AssertionError``) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise NotReached(_message(what, timeout, last, details))
        time.sleep(interval)


async def async_wait_until(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT_S,
    interval: float = 0.001,
    *,
    what: str = "the condition",
    details: Callable[[], str] | None = None,
) -> T:
    """:func:`wait_until` for a coroutine: the event loop keeps running between checks."""
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise NotReached(_message(what, timeout, last, details))
        await asyncio.sleep(interval)
