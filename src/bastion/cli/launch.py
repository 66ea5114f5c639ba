"""The entry point of ``bastion serve``: one server process, or a supervisor of several.

It sits above both ``serve`` (one process) and ``workers`` (the supervisor, which imports
``serve``), so the choice between them creates no import cycle.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from bastion.cli.serve_options import ServeOptions

log = logging.getLogger("bastion.serve")


def run(opts: ServeOptions, *, progress: Callable[[str, int, int], None] | None = None) -> int:
    """Blocking entry point of ``bastion serve``; returns the process exit code."""
    from bastion.observability.logs import configure_logging

    configure_logging(opts.log_level, opts.log_format)
    from bastion.core.errors import BastionError

    try:
        opts.check_security()
    except (ValueError, OSError, BastionError) as err:
        log.error("cannot serve: %s", err)
        print(f"bastion serve: {err}", file=sys.stderr)
        return 2
    if opts.workers > 1:
        from bastion.cli.workers import supervise

        return supervise(opts)  # progress is per process; the supervisor has none to show
    from bastion.cli.serve import run_server

    return run_server(opts, progress=progress)
