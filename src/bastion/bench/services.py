"""Real Redis and PostgreSQL servers for tests and benchmarks: started from the Debian
binaries on a free loopback port, in a temporary directory, stopped (and the directory
removed) on exit. Nothing here is a mock: the shared-state backends talk to these.

PostgreSQL refuses to run as root, so when this process is root the server runs as the
``postgres`` system user that Debian's package creates (``runuser``), in a directory owned
by that user. ``unavailable()`` says why a service cannot be started here (binary missing,
no user to run it as), for a test's skip reason.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from bastion.bench.launcher import free_port

__all__ = ["PostgresServer", "RedisServer", "postgres_unavailable", "redis_unavailable", "wait_port"]


def wait_port(port: int, timeout_s: float, proc: subprocess.Popen[bytes] | None = None, what: str = "server") -> None:
    """Until ``127.0.0.1:port`` accepts a connection (or the process exits: an error)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening on port {port}")
        with socket.socket() as s:
            s.settimeout(0.2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:g} s")


# -- Redis ----------------------------------------------------------------------------


def redis_unavailable() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server is not installed (Debian package redis-server; `make system-deps` installs it as root)"
    return None


@dataclass
class RedisServer:
    """``redis-server`` on a free loopback port, no persistence, a password (``url`` has it)."""

    port: int
    password: str
    directory: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @classmethod
    @contextlib.contextmanager
    def running(cls, *, port: int | None = None) -> Iterator[RedisServer]:
        reason = redis_unavailable()
        if reason:
            raise RuntimeError(reason)
        directory = Path(tempfile.mkdtemp(prefix="bastion-redis-"))
        server = cls(port or free_port(), secrets.token_hex(16), directory)
        try:
            server.start()
            yield server
        finally:
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)

    def start(self) -> None:
        """Start (or restart, same port and password: the fault tests stop and restart it)."""
        conf = self.directory / "redis.conf"
        # the password in a config file, not on the command line where ps shows it
        conf.write_text(f"bind 127.0.0.1\nport {self.port}\nrequirepass {self.password}\nsave \"\"\n"
                        f"appendonly no\ndir {self.directory}\nprotected-mode yes\n")
        self.proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(self.port, 15, self.proc, "redis-server")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None


# -- PostgreSQL -------------------------------------------------------------------------


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


def _run_as() -> list[str]:
    """Root cannot run PostgreSQL: run it as Debian's ``postgres`` user."""
    if os.geteuid() != 0:
        return []
    return ["runuser", "-u", "postgres", "--"]


def postgres_unavailable() -> str | None:
    if _pg_bindir() is None:
        return "PostgreSQL is not installed (Debian package postgresql; `make system-deps` installs it as root)"
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (util-linux)"
    return None


@dataclass
class PostgresServer:
    """A PostgreSQL cluster of its own (initdb) on a free loopback port, SCRAM passwords,
    one database ``bastion`` owned by the role ``bastion``."""

    port: int
    password: str
    directory: Path
    started: bool = False

    @property
    def url(self) -> str:
        return f"postgresql://bastion:{self.password}@127.0.0.1:{self.port}/bastion"

    @classmethod
    @contextlib.contextmanager
    def running(cls, *, port: int | None = None) -> Iterator[PostgresServer]:
        reason = postgres_unavailable()
        if reason:
            raise RuntimeError(reason)
        directory = Path(tempfile.mkdtemp(prefix="bastion-pg-"))
        server = cls(port or free_port(), secrets.token_hex(16), directory)
        try:
            server._init()
            server.start()
            server._create_database()
            yield server
        finally:
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)

    @property
    def _data(self) -> Path:
        return self.directory / "data"

    def _cmd(self, tool: str, *args: str) -> list[str]:
        return [*_run_as(), str(_pg_bindir() / tool), *args]  # type: ignore[operator]

    def _init(self) -> None:
        pwfile = self.directory / "pw"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        os.chmod(self.directory, 0o700)
        subprocess.run(self._cmd("initdb", "-D", str(self._data), "-U", "postgres", "--auth=scram-sha-256",
                                 f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"),
                       check=True, capture_output=True, timeout=120)
        pwfile.unlink()
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.directory}'\nfsync = off\n"
                       "synchronous_commit = off\nfull_page_writes = off\nmax_connections = 200\n")

    def start(self) -> None:
        """Start (or restart after ``stop``: the fault tests restart it)."""
        subprocess.run(self._cmd("pg_ctl", "-D", str(self._data), "-l", str(self.directory / "log"),
                                 "-w", "-t", "60", "start"), check=True, capture_output=True, timeout=90)
        self.started = True
        wait_port(self.port, 30, what="postgres")

    def stop(self, mode: str = "fast") -> None:
        if self.started:
            subprocess.run(self._cmd("pg_ctl", "-D", str(self._data), "-m", mode, "-w", "stop"),
                           capture_output=True, timeout=60, check=False)
            self.started = False

    def _create_database(self) -> None:
        import psycopg

        admin = f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"CREATE ROLE bastion LOGIN PASSWORD '{self.password}'")  # hex: nothing to escape
            conn.execute("CREATE DATABASE bastion OWNER bastion")

    def log(self) -> str:
        path = self.directory / "log"
        return path.read_text(errors="replace") if path.exists() else ""
