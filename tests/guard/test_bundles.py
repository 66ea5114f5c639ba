"""Sealed bundles: round trip, every refusal before decryption, key providers."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
from pathlib import Path

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bastion.guard import bundles
from bastion.guard.bundles import (
    BadSignature,
    BundleDecryptError,
    BundleFormatError,
    BundleKeyError,
    BundleUnsigned,
    SealError,
    UntrustedSigner,
    fingerprint,
    generate_signing_key,
    inspect_bundle,
    load_private_key,
    load_public_key,
    open_bundle,
    seal_bundle,
    verify_bundle,
    write_private_key,
    write_public_key,
)
from bastion.guard.keyproviders import (
    EnvKeyProvider,
    FileKeyProvider,
    KeyProvider,
    KeyProviderError,
    KeyUnwrapError,
    encode_master_key,
    generate_master_key,
    load_key_provider,
    write_master_key,
)

MODEL_V1 = b"\x08\x07model-one" * 300  # spans several 1 KiB chunks
MODEL_V2 = b"model-two"
SIGNER = generate_signing_key()


class FixedKey(EnvKeyProvider):
    """An env provider without the environment (tests only)."""

    def __init__(self, key: bytes) -> None:
        self.var = "TEST"
        self._key = key


def _model_dir(root: Path, name: str = "m") -> Path:
    model_dir = root / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "2" / "assets").mkdir(parents=True)
    (model_dir / "config.yaml").write_text(yaml.safe_dump({"runtime": "onnx"}))
    (model_dir / "1" / "model.onnx").write_bytes(MODEL_V1)
    (model_dir / "2" / "model.onnx").write_bytes(MODEL_V2)
    (model_dir / "2" / "assets" / "vocab.txt").write_bytes(b"")  # an empty file is still sealed
    (model_dir / "2" / ".hidden.tmp").write_bytes(b"ignored")
    (model_dir / "metrics.json").write_text("{}")  # not part of the model
    return model_dir


@pytest.fixture
def provider() -> FixedKey:
    return FixedKey(generate_master_key())


@pytest.fixture
def sealed(tmp_path: Path, provider: FixedKey) -> Path:
    out = tmp_path / "m.bundle"
    seal_bundle(_model_dir(tmp_path), out, key_id="k1", signing_key=SIGNER, key_provider=provider, chunk_size=1024)
    return out


def test_round_trip(sealed: Path, provider: FixedKey) -> None:
    data = sealed.read_bytes()
    assert MODEL_V1[:64] not in data and b"runtime" not in data  # no plaintext in the file
    opened = open_bundle(data, [SIGNER.public_key()], provider, source=sealed.name)
    assert opened.header.model == "m" and opened.versions == (1, 2)
    assert opened.header.signer == fingerprint(SIGNER)
    paths = [f.path for f in opened.header.files]
    assert paths == ["config.yaml", "1/model.onnx", "2/assets/vocab.txt", "2/model.onnx"]
    assert yaml.safe_load(opened.read("config.yaml")) == {"runtime": "onnx"}
    assert opened.read_version(1) == {"model.onnx": MODEL_V1}
    assert opened.read_version(2) == {"model.onnx": MODEL_V2, "assets/vocab.txt": b""}
    assert dict(opened.read_all())["1/model.onnx"] == len(MODEL_V1)
    assert not list(sealed.parent.glob(".*.tmp"))  # the temp file was renamed into place


def test_inspect_reads_the_header_without_keys(sealed: Path) -> None:
    info = inspect_bundle(sealed)
    assert info.header.model == "m" and info.header.key_id == "k1" and info.header.versions == (1, 2)
    assert info.signed_by == fingerprint(SIGNER) == info.header.signer
    assert {f.path: f.size for f in info.header.files}["1/model.onnx"] == len(MODEL_V1)
    assert info.size == sealed.stat().st_size


class _NoUnwrap:
    """A key provider that fails the test if anything reaches the decryption stage."""

    def wrap_key(self, key_id: str, data_key: bytes) -> bytes:
        raise AssertionError("not used")

    def unwrap_key(self, key_id: str, wrapped: bytes) -> bytes:
        raise AssertionError("unwrap reached before the signature was checked")


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _header_end(data: bytes) -> int:
    (header_len,) = struct.unpack_from(">I", data, 10)
    return 14 + header_len


@pytest.mark.parametrize("where", ["magic", "version", "header", "ciphertext", "last-chunk", "signature", "pubkey"])
def test_tampering_is_refused_before_decryption(sealed: Path, where: str) -> None:
    data = sealed.read_bytes()
    at = {
        "magic": 0,
        "version": 9,
        "header": 20,
        "ciphertext": _header_end(data) + 5,
        "last-chunk": len(data) - 105,
        "signature": len(data) - 1,
        "pubkey": len(data) - 90,
    }[where]
    expected = {
        "magic": (BundleFormatError, "not a Bastion sealed bundle"),
        "version": (BundleFormatError, "format version 0 is not supported"),
        "pubkey": (UntrustedSigner, "not a trusted signer"),
    }.get(where, (BadSignature, "modified after it was signed"))
    with pytest.raises(expected[0], match=expected[1]):
        open_bundle(_flip(data, at), [SIGNER.public_key()], _NoUnwrap(), source="m.bundle")


def test_unsigned_truncated_and_empty(sealed: Path) -> None:
    data = sealed.read_bytes()
    trusted = [SIGNER.public_key()]
    with pytest.raises(BundleUnsigned, match="not signed"):
        verify_bundle(data[:-104], trusted)
    with pytest.raises(BundleUnsigned):
        verify_bundle(data[:-104] + b"\0" * 104, trusted)
    with pytest.raises(BundleFormatError, match="too short"):
        verify_bundle(data[:50], trusted)
    with pytest.raises(BundleFormatError, match="too short"):
        verify_bundle(b"", trusted)


def test_wrong_signer_and_no_signers(sealed: Path) -> None:
    data = sealed.read_bytes()
    other = generate_signing_key()
    with pytest.raises(UntrustedSigner, match=rf"signed by {fingerprint(SIGNER)}, which is not a trusted signer"):
        verify_bundle(data, [other.public_key()])
    with pytest.raises(UntrustedSigner, match="no trusted signers configured"):
        verify_bundle(data, [])
    assert verify_bundle(data, [other.public_key(), SIGNER.public_key()]).signer == fingerprint(SIGNER)


def test_resigned_by_an_untrusted_key_is_refused(sealed: Path) -> None:
    """Swapping in another key's signature block does not help an attacker."""
    data = sealed.read_bytes()
    attacker = generate_signing_key()
    body = data[:-104]
    raw = attacker.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    forged = body + b"BSTNSIG1" + raw + attacker.sign(bundles.SIGNATURE_CONTEXT + hashlib.sha256(body).digest())
    with pytest.raises(UntrustedSigner):
        verify_bundle(forged, [SIGNER.public_key()])
    with pytest.raises(BundleFormatError, match="header names signer"):
        verify_bundle(forged, [attacker.public_key()])  # even if trusted, the signed header names SIGNER


def test_wrong_master_key(sealed: Path) -> None:
    verified = verify_bundle(sealed.read_bytes(), [SIGNER.public_key()], source="m.bundle")
    with pytest.raises(BundleKeyError, match=r"m\.bundle: wrong master key for key id 'k1'.*not the master key"):
        verified.unseal(FixedKey(generate_master_key()))


def test_a_wrong_data_key_from_a_provider_is_caught_per_file(sealed: Path) -> None:
    class Liar:
        def wrap_key(self, key_id: str, data_key: bytes) -> bytes:
            return b"x"

        def unwrap_key(self, key_id: str, wrapped: bytes) -> bytes:
            return b"\0" * 32

    opened = verify_bundle(sealed.read_bytes(), [SIGNER.public_key()]).unseal(Liar())
    with pytest.raises(BundleDecryptError, match="does not decrypt"):
        opened.read("config.yaml")


def test_kms_plugin_errors_become_bundle_errors(sealed: Path) -> None:
    class Down:
        def wrap_key(self, key_id: str, data_key: bytes) -> bytes:
            raise ConnectionError("kms unreachable")

        unwrap_key = wrap_key

    verified = verify_bundle(sealed.read_bytes(), [SIGNER.public_key()])
    with pytest.raises(BundleKeyError, match="kms unreachable"):
        verified.unseal(Down())


def test_ciphertext_cannot_move_between_bundles(tmp_path: Path, provider: FixedKey) -> None:
    """Same key, same files: the per-chunk AAD binds each chunk to its own header."""
    model_dir = _model_dir(tmp_path)
    a, b = tmp_path / "a.bundle", tmp_path / "b.bundle"
    kwargs = {"key_id": "k1", "signing_key": SIGNER, "key_provider": provider, "model_name": "m"}
    seal_bundle(model_dir, a, **kwargs)  # type: ignore[arg-type]
    seal_bundle(model_dir, b, **kwargs)  # type: ignore[arg-type]
    da, db = a.read_bytes(), b.read_bytes()
    opened_a = verify_bundle(da, [SIGNER.public_key()]).unseal(provider)
    # b's ciphertext under a's header (as if a signer had been tricked into signing the splice)
    spliced = da[: _header_end(da)] + db[_header_end(db) : -104]
    verified = bundles.VerifiedBundle(spliced, opened_a.header, opened_a._verified._header_digest, "spliced")
    with pytest.raises(BundleDecryptError):
        verified.unseal(provider).read("config.yaml")


def test_malicious_header_is_bounded(tmp_path: Path) -> None:
    """inspect parses unverified headers: huge claims fail on parsing, not on allocation."""

    def bundle_with(header: object, header_len: int | None = None) -> Path:
        raw = json.dumps(header).encode()
        path = tmp_path / "evil.bundle"
        length = len(raw) if header_len is None else header_len
        path.write_bytes(b"BSTNBNDL" + struct.pack(">HI", 1, length) + raw + b"\0" * 104)
        return path

    with pytest.raises(BundleFormatError, match="header length 4294967295 is out of bounds"):
        inspect_bundle(bundle_with({}, header_len=0xFFFFFFFF))
    with pytest.raises(BundleFormatError, match="expected the keys"):
        inspect_bundle(bundle_with({"model": "m"}))
    good = {
        "model": "m", "created": "now", "bundle_id": "x", "key_id": "k", "wrapped_key": "AA==",
        "cipher": "AES-256-GCM", "chunk_size": 1024, "signer": "s",
        "files": [{"path": "config.yaml", "size": 1, "sha256": "0" * 64}],
    }
    assert inspect_bundle(bundle_with(good)).signed_by is None
    for change, message in [
        ({"files": [{"path": "config.yaml", "size": 1 << 60, "sha256": "0" * 64}]}, "size"),
        ({"files": [{"path": "../../etc/passwd", "size": 1, "sha256": "0" * 64}]}, "path"),
        ({"files": [{"path": "1/.hidden", "size": 1, "sha256": "0" * 64}]}, "path"),
        ({"files": [{"path": "config.yaml", "size": 1, "sha256": "0" * 64}] * 2}, "appears twice"),
        ({"files": []}, "files"),
        ({"chunk_size": 1}, "chunk_size"),
        ({"cipher": "ROT13"}, "cipher"),
        ({"model": "../x"}, "model"),
    ]:
        with pytest.raises(BundleFormatError, match=message):
            inspect_bundle(bundle_with({**good, **change}))
    raw = b'{"model": "a", "model": "b"}'
    (tmp_path / "dup.bundle").write_bytes(b"BSTNBNDL" + struct.pack(">HI", 1, len(raw)) + raw + b"\0" * 104)
    with pytest.raises(BundleFormatError, match="duplicate key"):
        inspect_bundle(tmp_path / "dup.bundle")


def test_seal_refuses_what_it_cannot_seal(tmp_path: Path, provider: FixedKey) -> None:
    kwargs = {"key_id": "k1", "signing_key": SIGNER, "key_provider": provider}
    with pytest.raises(SealError, match=r"no config\.yaml"):
        seal_bundle(tmp_path, tmp_path / "x.bundle", **kwargs)  # type: ignore[arg-type]
    model_dir = _model_dir(tmp_path)
    (model_dir / "1" / "model.pkl").write_bytes(b"pickle")
    with pytest.raises(SealError, match="refusing to seal a pickle"):
        seal_bundle(model_dir, tmp_path / "x.bundle", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(SealError, match="key id"):
        seal_bundle(model_dir, tmp_path / "x.bundle", **{**kwargs, "key_id": "../k"})  # type: ignore[arg-type]
    assert not list(tmp_path.glob("*.bundle")) and not list(tmp_path.glob(".*.tmp"))


def test_signing_key_files(tmp_path: Path) -> None:
    key = generate_signing_key()
    write_private_key(key, tmp_path / "k.pem")
    write_public_key(key.public_key(), tmp_path / "k.pub.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0
    assert fingerprint(load_private_key(tmp_path / "k.pem")) == fingerprint(load_public_key(tmp_path / "k.pub.pem"))
    with pytest.raises(bundles.BundleError, match="already exists"):
        write_private_key(key, tmp_path / "k.pem")
    (tmp_path / "junk.pem").write_text("not a key")
    with pytest.raises(bundles.BundleError, match="not a PEM public key"):
        load_public_key(tmp_path / "junk.pem")


# ------------------------------------------------------------------ key providers


def test_env_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    key = generate_master_key()
    monkeypatch.setenv("BUNDLE_KEY", encode_master_key(key))
    provider = load_key_provider("env:BUNDLE_KEY")
    assert isinstance(provider, EnvKeyProvider) and isinstance(provider, KeyProvider)
    wrapped = provider.wrap_key("k1", b"d" * 32)
    assert provider.unwrap_key("k1", wrapped) == b"d" * 32
    with pytest.raises(KeyUnwrapError):  # the key id is bound into the wrap
        provider.unwrap_key("k2", wrapped)
    monkeypatch.setenv("URLSAFE", base64.urlsafe_b64encode(key).decode() + "\n")
    assert load_key_provider("env:URLSAFE").unwrap_key("k1", wrapped) == b"d" * 32
    monkeypatch.delenv("MISSING", raising=False)
    with pytest.raises(KeyProviderError, match="env:MISSING: the environment variable is not set"):
        load_key_provider("env:MISSING")
    monkeypatch.setenv("SHORT", base64.b64encode(b"x" * 16).decode())
    with pytest.raises(KeyProviderError, match="16 bytes, expected 32"):
        load_key_provider("env:SHORT")
    monkeypatch.setenv("NOTB64", "not base64 !!")
    with pytest.raises(KeyProviderError, match="not base64"):
        load_key_provider("env:NOTB64")


def test_file_provider_single_key_and_directory(tmp_path: Path) -> None:
    write_master_key(tmp_path / "master.key", generate_master_key())
    assert (tmp_path / "master.key").stat().st_mode & 0o077 == 0
    with pytest.raises(KeyProviderError, match="already exists"):
        write_master_key(tmp_path / "master.key", generate_master_key())
    single = load_key_provider(f"file:{tmp_path / 'master.key'}")
    assert single.unwrap_key("any", single.wrap_key("any", b"k" * 32)) == b"k" * 32
    (tmp_path / "raw.key").write_bytes(b"r" * 32)  # 32 raw bytes are accepted too
    assert FileKeyProvider(tmp_path / "raw.key").master_key("x") == b"r" * 32

    keys = tmp_path / "keys"
    keys.mkdir()
    write_master_key(keys / "2024.key", generate_master_key())
    write_master_key(keys / "2025.key", generate_master_key())
    rotating = load_key_provider(f"file:{keys}")
    old = rotating.wrap_key("2024", b"a" * 32)
    assert rotating.unwrap_key("2024", old) == b"a" * 32
    with pytest.raises(KeyUnwrapError, match="not the master key"):
        rotating.unwrap_key("2025", old)
    with pytest.raises(KeyUnwrapError, match=r"no key file 2026\.key"):
        rotating.unwrap_key("2026", old)
    with pytest.raises(KeyProviderError, match="key id"):
        rotating.unwrap_key("../2024", old)
    with pytest.raises(KeyProviderError, match="no such key file"):
        load_key_provider(f"file:{tmp_path / 'nope'}")


def test_module_provider_and_bad_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fake_kms.py").write_text(
        "from cryptography.hazmat.primitives.ciphers.aead import AESGCM\n"
        "class Kms:\n"
        "    key = AESGCM.generate_key(256)\n"
        "    def wrap_key(self, key_id, data_key):\n"
        "        return b'n' * 12 + AESGCM(self.key).encrypt(b'n' * 12, data_key, key_id.encode())\n"
        "    def unwrap_key(self, key_id, wrapped):\n"
        "        return AESGCM(self.key).decrypt(wrapped[:12], wrapped[12:], key_id.encode())\n"
        "def make():\n"
        "    return Kms()\n"
        "def broken():\n"
        "    return object()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        kms = load_key_provider("module:fake_kms:make")
        assert kms.unwrap_key("k", kms.wrap_key("k", b"z" * 32)) == b"z" * 32
        with pytest.raises(KeyProviderError, match="lacks wrap_key"):
            load_key_provider("module:fake_kms:broken")
        with pytest.raises(KeyProviderError, match="no callable 'nope'"):
            load_key_provider("module:fake_kms:nope")
    finally:
        sys.modules.pop("fake_kms", None)
    with pytest.raises(KeyProviderError, match="cannot import"):
        load_key_provider("module:no_such_module_here:make")
    for spec in ("", "env", "env:", "vault:x", "module:onlyone"):
        with pytest.raises(KeyProviderError):
            load_key_provider(spec)


def test_bundle_sealed_with_a_kms_provider(tmp_path: Path) -> None:
    class Kms:
        key = AESGCM.generate_key(256)

        def wrap_key(self, key_id: str, data_key: bytes) -> bytes:
            return b"n" * 12 + AESGCM(self.key).encrypt(b"n" * 12, data_key, key_id.encode())

        def unwrap_key(self, key_id: str, wrapped: bytes) -> bytes:
            return AESGCM(self.key).decrypt(wrapped[:12], wrapped[12:], key_id.encode())

    out = tmp_path / "m.bundle"
    seal_bundle(_model_dir(tmp_path), out, key_id="kms-key", signing_key=SIGNER, key_provider=Kms())
    opened = open_bundle(out.read_bytes(), [SIGNER.public_key()], Kms())
    assert opened.read("1/model.onnx") == MODEL_V1
    with pytest.raises(BundleKeyError, match="not made by a local key provider"):
        verify_bundle(out.read_bytes(), [SIGNER.public_key()]).unseal(FixedKey(generate_master_key()))
