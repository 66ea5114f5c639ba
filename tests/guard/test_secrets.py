"""The master secret file: created once, whole, whoever races to create it."""

from __future__ import annotations

import threading
from pathlib import Path

from bastion.guard.secrets import SECRET_BYTES, load_or_create_secret


def test_racing_creators_all_read_the_one_complete_secret(tmp_path: Path) -> None:
    # Two servers (or workers) started at once on a new key store both create the secret;
    # one used to read the file after the other created it but before it wrote the bytes.
    for attempt in range(20):
        path = tmp_path / f"keys{attempt}.db.secret"
        barrier = threading.Barrier(8)
        got: list[bytes | BaseException] = []

        def create(path: Path = path, barrier: threading.Barrier = barrier, got: list = got) -> None:
            barrier.wait()
            try:
                got.append(load_or_create_secret(path))
            except BaseException as err:  # surfaced below
                got.append(err)

        threads = [threading.Thread(target=create) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not [g for g in got if isinstance(g, BaseException)], got
        assert len(set(got)) == 1 and len(got[0]) == SECRET_BYTES  # type: ignore[arg-type]
        assert path.read_bytes() == got[0]
        assert (path.stat().st_mode & 0o777) == 0o600
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no leftovers
