"""Child process of the audit kill test: append records as fast as it can and, after each
append is done, acknowledge it on stdout ("<seq> <request_id>") the way a server sends a
response. The parent SIGKILLs it at an arbitrary moment.

usage: python audit_kill_child.py DIRECTORY CHAIN_KEY_HEX WRITER_ID [sync|batched]

``batched``: 16 tasks on one event loop, each awaiting ``append_batched`` (the server's
path) before it acknowledges; a batched record's seq is not known to its request, so the
acknowledgement says -1.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

from bastion.guard.audit import AuditLog


def _record(request_id: str) -> dict[str, Any]:
    return {"tenant": "acme", "key_id": "k1", "transport": "rest", "action": "infer", "model": "digits",
            "variant": None, "version": "1", "request_id": request_id, "input_digest": "ab" * 16,
            "output_digest": "cd" * 16, "decision": "served", "status": 200, "reason": "", "latency_ms": 0.5}


def run_sync(log: AuditLog, writer: str) -> None:
    i = 0
    while True:
        request_id = f"{writer}-{os.getpid()}-{i}"
        log.append(_record(request_id))
        # one write() on the pipe: the acknowledgement is all there or not at all
        os.write(1, f"{log.last_seq} {request_id}\n".encode())
        i += 1


async def run_batched(log: AuditLog, writer: str) -> None:
    async def client(c: int) -> None:
        i = 0
        while True:
            request_id = f"{writer}-{os.getpid()}-{c}-{i}"
            await log.append_batched(_record(request_id))
            os.write(1, f"-1 {request_id}\n".encode())
            i += 1

    await asyncio.gather(*(client(c) for c in range(16)))


def main() -> None:
    directory, key_hex, writer = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "sync"
    # small segments: the kill also lands around rotations
    log = AuditLog(directory, bytes.fromhex(key_hex), writer_id=writer, max_segment_bytes=16 << 10)
    if mode == "batched":
        asyncio.run(run_batched(log, writer))
    else:
        run_sync(log, writer)


if __name__ == "__main__":
    main()
