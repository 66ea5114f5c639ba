"""`bastion bundle` through click's runner: keygen, seal, verify, inspect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from bastion.cli.bundle import bundle
from bastion.guard.bundles import fingerprint, load_private_key, load_public_key, open_bundle
from bastion.guard.keyproviders import load_key_provider
from tests.runtimes.onnx_models import affine_model, write_model


def run(*args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(bundle, list(args))
    if ok:
        assert result.exit_code == 0, (result.output, result.exception)
    else:
        assert result.exit_code != 0, result.output
    return result


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    run("keygen", "--signing-key", str(tmp_path / "signer.pem"), "--master-key", str(tmp_path / "master.key"))
    return tmp_path


def _seal(tmp_path: Path, keys: Path, out: Path, *extra: str) -> Result:
    model_dir = write_model(tmp_path / "src", "affine", {1: affine_model(), 3: affine_model(2.0)})
    return run(
        "seal", str(model_dir), "--out", str(out), "--key-id", "prod-1",
        "--signing-key", str(keys / "signer.pem"), "--key-provider", f"file:{keys / 'master.key'}", *extra,
    )


def test_keygen_writes_keys_and_never_overwrites(keys: Path) -> None:
    assert (keys / "signer.pem").stat().st_mode & 0o077 == 0
    assert (keys / "master.key").stat().st_mode & 0o077 == 0
    public = load_public_key(keys / "signer.pub.pem")
    assert fingerprint(public) == fingerprint(load_private_key(keys / "signer.pem"))
    again = run("keygen", "--signing-key", str(keys / "signer.pem"), ok=False)
    assert "already exists" in again.output
    again = run("keygen", "--master-key", str(keys / "master.key"), ok=False)
    assert "already exists" in again.output
    assert "nothing to do" in run("keygen", ok=False).output


def test_seal_verify_inspect(tmp_path: Path, keys: Path) -> None:
    out = tmp_path / "repo" / "affine.bundle"
    sealed = _seal(tmp_path, keys, out)
    assert "sealed affine (versions 1, 3; 3 files" in sealed.output and out.is_file()
    signer = fingerprint(load_public_key(keys / "signer.pub.pem"))

    ok = run("verify", str(out), "--trusted-signer", str(keys / "signer.pub.pem"))
    assert f"signature OK: affine.bundle holds model affine (versions 1, 3), signed by {signer}" in ok.output
    full = run("verify", str(out), "--trusted-signer", str(keys / "signer.pub.pem"),
               "--key-provider", f"file:{keys / 'master.key'}")
    assert "decryption OK: 3 files" in full.output

    shown = run("inspect", str(out))
    assert "NOT verified" in shown.output and "prod-1" in shown.output and signer in shown.output
    assert "1/model.onnx" in shown.output and "3/model.onnx" in shown.output
    data = json.loads(run("inspect", str(out), "--json").output)
    assert data["model"] == "affine" and data["versions"] == [1, 3] and data["verified"] is False
    assert data["key_id"] == "prod-1" and data["signed_by"] == signer == data["signer"]
    assert {f["path"]: f["size"] for f in data["files"]}["1/model.onnx"] == len(affine_model())

    # what the CLI sealed, the library opens
    opened = open_bundle(out.read_bytes(), [load_public_key(keys / "signer.pub.pem")],
                         load_key_provider(f"file:{keys / 'master.key'}"))
    assert opened.read_version(3) == {"model.onnx": affine_model(2.0)}


def test_verify_refuses_with_a_clear_reason(tmp_path: Path, keys: Path) -> None:
    out = tmp_path / "affine.bundle"
    _seal(tmp_path, keys, out)
    run("keygen", "--signing-key", str(tmp_path / "other.pem"), "--master-key", str(tmp_path / "other.key"))

    wrong_signer = run("verify", str(out), "--trusted-signer", str(tmp_path / "other.pub.pem"), ok=False)
    assert "refused:" in wrong_signer.output and "not a trusted signer" in wrong_signer.output

    wrong_key = run("verify", str(out), "--trusted-signer", str(keys / "signer.pub.pem"),
                    "--key-provider", f"file:{tmp_path / 'other.key'}", ok=False)
    assert "signature OK" in wrong_key.output and "wrong master key" in wrong_key.output

    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0xFF
    out.write_bytes(bytes(data))
    tampered = run("verify", str(out), "--trusted-signer", str(keys / "signer.pub.pem"), ok=False)
    assert "modified after it was signed" in tampered.output

    out.write_bytes(b"hello")
    assert "too short" in run("inspect", str(out), ok=False).output


def test_seal_errors(tmp_path: Path, keys: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = write_model(tmp_path / "src", "m", {1: affine_model()})
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    result = run("seal", str(model_dir), "--out", str(tmp_path / "m.bundle"), "--key-id", "k",
                 "--signing-key", str(keys / "signer.pem"), "--key-provider", "env:NO_SUCH_KEY_VAR", ok=False)
    assert "environment variable is not set" in result.output
    result = run("seal", str(model_dir), "--out", str(tmp_path / "m.bundle"), "--key-id", "k",
                 "--signing-key", str(keys / "signer.pub.pem"), "--key-provider", f"file:{keys / 'master.key'}",
                 ok=False)
    assert "private key" in result.output
    (model_dir / "1" / "model.joblib").write_bytes(b"x")
    result = run("seal", str(model_dir), "--out", str(tmp_path / "m.bundle"), "--key-id", "k",
                 "--signing-key", str(keys / "signer.pem"), "--key-provider", f"file:{keys / 'master.key'}", ok=False)
    assert "pickle" in result.output and not (tmp_path / "m.bundle").exists()


def test_seal_warns_when_the_file_name_will_not_serve(tmp_path: Path, keys: Path) -> None:
    result = _seal(tmp_path, keys, tmp_path / "other-name.bundle")
    assert "only under the file name affine.bundle" in result.output


def test_the_bastion_command_has_the_bundle_group() -> None:
    from bastion.cli.main import cli

    result = CliRunner().invoke(cli, ["bundle", "--help"])
    assert result.exit_code == 0 and all(c in result.output for c in ("keygen", "seal", "verify", "inspect"))
