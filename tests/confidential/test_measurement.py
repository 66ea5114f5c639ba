"""The dev worker's measurement: what changes it and what does not."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from bastion.confidential import measurement
from bastion.confidential.measurement import code_digest, worker_measurement

CODE = hashlib.sha384(b"code").digest()
MODELS = {"iris": "aa" * 32, "resnet": "bb" * 32}


@pytest.fixture
def pkg(tmp_path: Path) -> Path:
    root = tmp_path / "bastion"
    (root / "core").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "core" / "a.py").write_text("x = 1\n")
    (root / "core" / "b.py").write_text("y = 2\n")
    return root


def test_code_digest_is_a_stable_sha384(pkg: Path) -> None:
    first = code_digest(pkg)
    assert len(first) == 48 and code_digest(pkg) == first


def test_code_digest_follows_sources_only(pkg: Path) -> None:
    base = code_digest(pkg)
    (pkg / "core" / "data.yaml").write_text("not code")
    (pkg / "core" / "__pycache__").mkdir()
    (pkg / "core" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"\x00")
    (pkg / "core" / "__pycache__" / "stray.py").write_text("z = 3\n")
    assert code_digest(pkg) == base

    (pkg / "core" / "a.py").write_text("x = 2\n")
    changed = code_digest(pkg)
    assert changed != base
    (pkg / "core" / "a.py").write_text("x = 1\n")
    assert code_digest(pkg) == base

    (pkg / "core" / "a.py").rename(pkg / "core" / "c.py")
    assert code_digest(pkg) != base


def test_code_digest_frames_each_file(pkg: Path) -> None:
    """Moving bytes from one file to the next changes the digest (lengths are hashed)."""
    (pkg / "core" / "a.py").write_text("x = 1\ny")
    (pkg / "core" / "b.py").write_text(" = 2\n")
    one = code_digest(pkg)
    (pkg / "core" / "a.py").write_text("x = 1\n")
    (pkg / "core" / "b.py").write_text("y = 2\n")
    assert code_digest(pkg) != one


def test_code_digest_includes_library_versions(pkg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = code_digest(pkg)
    monkeypatch.setitem(measurement.MEASURED_DISTRIBUTIONS, "numpy", ("no-such-distribution",))
    assert code_digest(pkg) != base


def test_code_digest_of_the_installed_package() -> None:
    assert len(code_digest()) == 48


def test_worker_measurement_known_answer() -> None:
    """The encoding, spelled out: a domain tag, then length-prefixed items."""

    def item(data: bytes) -> bytes:
        return len(data).to_bytes(8, "big") + data

    config = {"b": [1, 2], "a": "é"}
    stream = (
        b"bastion/worker-measurement/v1\x00"
        + item(CODE)
        + item('{"a":"é","b":[1,2]}'.encode())
        + (2).to_bytes(8, "big")
        + item(b"iris")
        + item(bytes.fromhex("aa" * 32))
        + item(b"resnet")
        + item(bytes.fromhex("bb" * 32))
    )
    assert worker_measurement(CODE, config, MODELS) == hashlib.sha384(stream).digest()


def test_worker_measurement_is_canonical() -> None:
    base = worker_measurement(CODE, {"a": 1, "b": {"c": 2, "d": 3}}, MODELS)
    assert worker_measurement(CODE, {"b": {"d": 3, "c": 2}, "a": 1}, dict(reversed(MODELS.items()))) == base
    assert worker_measurement(CODE, {"a": 1, "b": {"c": 2, "d": 3}}, {k: v.upper() for k, v in MODELS.items()}) == base


@pytest.mark.parametrize(
    ("code", "config", "models"),
    [
        (hashlib.sha384(b"other code").digest(), {"a": 1}, MODELS),
        (CODE, {"a": 2}, MODELS),
        (CODE, {"a": 1, "extra": None}, MODELS),
        (CODE, {"a": 1}, {"iris": "aa" * 32}),
        (CODE, {"a": 1}, {"iris": "aa" * 32, "resnet": "bc" * 32}),
        (CODE, {"a": 1}, {"iris2": "aa" * 32, "resnet": "bb" * 32}),
    ],
)
def test_worker_measurement_changes_with_every_input(code: bytes, config: dict, models: dict) -> None:
    assert worker_measurement(code, config, models) != worker_measurement(CODE, {"a": 1}, MODELS)


def test_worker_measurement_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match=r"code digest: expected 48 bytes"):
        worker_measurement(b"short", {}, {})
    with pytest.raises(ValueError, match=r"model digests: iris: expected 64 hex digits"):
        worker_measurement(CODE, {}, {"iris": "abc"})
    with pytest.raises(ValueError, match=r"config: cannot be encoded as canonical JSON"):
        worker_measurement(CODE, {"a": {1, 2}}, {})
    with pytest.raises(ValueError, match=r"config: cannot be encoded as canonical JSON"):
        worker_measurement(CODE, {"a": float("nan")}, {})
