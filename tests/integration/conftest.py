"""Shared pieces of the integration tests: one default TLS context for httpx, and servers
that several read-only tests can share (``demo_server`` itself lives in tests/conftest.py).

A server start costs one to three seconds (Python imports, model loads), so a test that
only reads from a server with the same flags as another's uses the shared one; tests that
change a server's state (load/unload, revoke, kill, drain, reload) keep their own.
"""

from __future__ import annotations

import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.serverproc import ServerProcess, default_ssl_context


@pytest.fixture(scope="package", autouse=True)
def _one_default_tls_context() -> Iterator[None]:
    """Every ``httpx.get``/``post``/``Client()`` builds an ``ssl.SSLContext`` loading
    certifi's bundle (20-70 ms a call), even for plain http:// URLs; these tests make
    hundreds of such calls. With the defaults (``verify=True``, no client certificate) they
    get one context built the same way instead, while this package's tests run. Explicit
    ``verify=``/``cert=`` arguments and SSL_CERT_FILE/SSL_CERT_DIR are honoured as before."""
    try:
        from httpx._transports import default as transports
    except ImportError:  # another httpx layout: correct, only slower
        yield
        return
    original = getattr(transports, "create_ssl_context", None)
    if original is None:
        yield
        return

    def create_ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> ssl.SSLContext:
        if verify is True and cert is None:
            return default_ssl_context(trust_env)
        return original(verify=verify, cert=cert, trust_env=trust_env)

    transports.create_ssl_context = create_ssl_context
    try:
        yield
    finally:
        transports.create_ssl_context = original


@pytest.fixture(scope="session")
def small_body_server(onnx_demo_repo: Path) -> Iterator[ServerProcess]:
    """The demo's ONNX models open on loopback with ``--max-body-bytes 1000`` (REST only):
    the body-limit tests of test_http_server.py and test_raw_http.py share it."""
    server = ServerProcess(onnx_demo_repo, "--poll-interval", "0", "--max-body-bytes", "1000", "--grpc-port", "-1")
    yield server
    code = server.stop()
    assert code == 0, server.logs()


# Models without scikit-learn at serving time: loading digits_skops imports scikit-learn,
# about 2 of the 2.8 s a demo-repository server takes to be ready here.
ONNX_DEMO_MODELS = ("simple", "simple_string", "digits")


@pytest.fixture(scope="session")
def onnx_demo_repo(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository without ``digits_skops``, for the tests that start their own
    server to check a flag or a state change on ``simple``/``digits``: it is ready in a
    fraction of the time. Read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("onnx-demo") / "repo"
    for name in ONNX_DEMO_MODELS:
        shutil.copytree(demo_repo / name, out / name)
    return out


@pytest.fixture(scope="session")
def _digits_zoo_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/zoo_fixture.py's zoo, trained once for the session (three scikit-learn fits,
    the MLP's the longest); the tests copy it. One BLAS thread: these fits are tiny, and
    OpenBLAS' threads spinning against a busy server or test process make them up to ten
    times slower on a two-core machine."""
    from threadpoolctl import threadpool_limits

    from tests.zoo_fixture import build_digits_zoo

    repo = tmp_path_factory.mktemp("digits-zoo-template") / "repo"
    repo.mkdir()
    with threadpool_limits(1):
        build_digits_zoo(repo)
    return repo


@pytest.fixture(scope="session")
def make_digits_zoo(_digits_zoo_template: Path) -> Callable[..., Path]:
    """``make_digits_zoo(repo, name="digits_zoo", **spec_overrides)``: what
    ``build_digits_zoo`` writes (the same models, evaluation set and zoo.yaml with the
    overrides), copied from the session's template instead of trained again."""

    def make(repo: Path, *, name: str = "digits_zoo", **spec_overrides: object) -> Path:
        shutil.copytree(_digits_zoo_template, repo, dirs_exist_ok=True)
        zoo_dir = repo / name
        if name != "digits_zoo":
            (repo / "digits_zoo").rename(zoo_dir)
        spec = yaml.safe_load((zoo_dir / "zoo.yaml").read_text())
        (zoo_dir / "zoo.yaml").write_text(yaml.safe_dump({**spec, **spec_overrides}))
        return zoo_dir

    return make
