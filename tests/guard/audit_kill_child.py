"""Child process of the audit kill test: append records as fast as it can and, after each
``append`` returns, acknowledge it on stdout ("<seq> <request_id>") the way a server sends
a response. The parent SIGKILLs it at an arbitrary moment.

usage: python audit_kill_child.py DIRECTORY CHAIN_KEY_HEX WRITER_ID
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from bastion.guard.audit import AuditLog


def main() -> None:
    directory, key_hex, writer = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    # small segments: the kill also lands around rotations
    log = AuditLog(directory, bytes.fromhex(key_hex), writer_id=writer, max_segment_bytes=16 << 10)
    i = 0
    while True:
        request_id = f"{writer}-{os.getpid()}-{i}"
        log.append({"tenant": "acme", "key_id": "k1", "transport": "rest", "action": "infer", "model": "digits",
                    "variant": None, "version": "1", "request_id": request_id, "input_digest": "ab" * 16,
                    "output_digest": "cd" * 16, "decision": "served", "status": 200, "reason": "",
                    "latency_ms": 0.5})
        # one write() on the pipe: the acknowledgement is all there or not at all
        os.write(1, f"{log.last_seq} {request_id}\n".encode())
        i += 1


if __name__ == "__main__":
    main()
