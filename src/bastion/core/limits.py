"""Request limits: every bound a request must stay within, in one place.

Each is configurable (``bastion serve`` flags / config file) and each violation is a
4xx naming the limit: 413 for size, 400 for shape/structure, 504 for time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RequestLimits:
    max_body_bytes: int = 64 << 20  # HTTP body / gRPC message, after decompression
    max_elements: int = 1 << 26  # elements over all input tensors of one request
    max_batch_size: int | None = None  # server-wide cap on rows per request (models' own cap applies too)
    max_string_bytes: int = 1 << 20  # one BYTES element
    max_json_depth: int = 32  # nesting of a JSON request body
    request_timeout_s: float | None = 30.0  # queue + compute time inside the server; None = no limit


# The defaults, once: codecs take it when called without the server's limits (clients,
# tests), and every serve option's default is read from it.
DEFAULT_LIMITS = RequestLimits()
