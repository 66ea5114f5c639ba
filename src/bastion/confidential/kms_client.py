"""The trusted worker's side of key release: a ``KeyProvider`` that asks the KMS (``kms.py``).

``unwrap_key`` is four steps: a fresh nonce from the service, evidence binding that
nonce and the worker's attested public key (``identity.WorkerIdentity.evidence``), the
release request with the bundle's wrapped key, and opening the answer, which the
service HPKE-sealed to that public key (``identity.WorkerIdentity.open``). The data key
exists in clear only inside the service and inside this process.

A worker is configured with ``key_provider: module:bastion.confidential.kms_client:from_env``
(``worker.yaml``) and the environment ``BASTION_KMS_URL`` (and, for an https service with
a private CA, ``BASTION_KMS_CA``). ``from_env`` is called after the worker has set its
identity (``identity.set_current_identity``).

``generate_data_key`` is the same exchange against ``generate``: the service draws a
fresh data key and answers it both wrapped (to keep on the host's disk) and sealed to
this worker. The worker's fast-recovery mirror (``mirror.py``) keys itself this way.
"""

from __future__ import annotations

import base64
import binascii
import os
import ssl
from typing import Any
from urllib.parse import quote

import httpx

from bastion.confidential.identity import WorkerIdentity, current_identity
from bastion.confidential.kms_policy import NONCE_BYTES, release_info
from bastion.confidential.kms_requests import MAX_WRAPPED_BYTES
from bastion.core.errors import BastionError
from bastion.guard.keyproviders import KEY_BYTES, KeyProviderError, KeyUnwrapError, check_key_id

__all__ = ["ENV_CA", "ENV_URL", "KmsKeyProvider", "from_env"]

ENV_URL = "BASTION_KMS_URL"
ENV_CA = "BASTION_KMS_CA"
_MAX_ANSWER_BYTES = 64 * 1024  # a sealed key is 80 bytes in ~110 of JSON; an error a few hundred
_MAX_REASON = 500


class KmsKeyProvider:
    """``KeyProvider`` backed by the key-release service at ``url``, for the worker holding ``identity``.

    Thread-safe (one pooled ``httpx.Client``). ``verify``: True (system CAs), False, a CA
    file path, or an ``ssl.SSLContext``. Proxy variables of the environment are ignored:
    the key request goes to ``url`` and nowhere else.
    """

    def __init__(
        self, url: str, identity: WorkerIdentity, *, timeout_s: float = 10.0, verify: bool | str | ssl.SSLContext = True
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise KeyProviderError(f"KMS url {url!r}: expected http://HOST:PORT or https://HOST:PORT")
        self.url = url.rstrip("/")
        self.identity = identity
        if isinstance(verify, str):
            try:
                verify = ssl.create_default_context(cafile=verify)
            except (OSError, ssl.SSLError) as exc:
                raise KeyProviderError(f"KMS CA file {verify}: cannot load: {exc}") from None
        self._client = httpx.Client(
            base_url=self.url, timeout=timeout_s, verify=verify, trust_env=False, follow_redirects=False
        )

    def __str__(self) -> str:
        return f"kms:{self.url}"

    def close(self) -> None:
        self._client.close()

    def wrap_key(self, key_id: str, data_key: bytes) -> bytes:
        """Not offered: the service never wraps (see ``kms``)."""
        raise KeyProviderError(
            "the KMS does not wrap keys: seal the bundle with a local key file "
            "(bastion bundle keygen --master-key KEYFILE; bastion bundle seal --key-provider file:KEYFILE), "
            f"then import it into the service (bastion kms import-key {key_id} --key-file KEYFILE)"
        )

    def unwrap_key(self, key_id: str, wrapped: bytes) -> bytes:
        """The data key of ``wrapped``, released by the service to this attested worker.

        ``KeyUnwrapError``: the service holds no master key ``key_id``, or ``wrapped`` does
        not open under it; ``KeyProviderError``: anything else (refused by policy,
        unreachable, a malformed answer), with the service's reason.
        """
        _, data_key = self._attested("release", key_id, {"wrapped": base64.b64encode(wrapped).decode()})
        return data_key

    def generate_data_key(self, key_id: str) -> tuple[bytes, bytes]:
        """``(wrapped, data_key)``: a fresh data key drawn by the service, wrapped under its
        master key ``key_id`` and released to this attested worker. ``unwrap_key(key_id,
        wrapped)`` gives the same key again later, to a worker the policy still accepts.
        Errors as ``unwrap_key``'s."""
        answer, data_key = self._attested("generate", key_id, {})
        wrapped = _b64(answer.get("wrapped"), f"{self}: the generate answer's wrapped")
        if not wrapped or len(wrapped) > MAX_WRAPPED_BYTES:
            raise KeyProviderError(f"{self}: the generate answer's wrapped key is {len(wrapped)} bytes")
        return wrapped, data_key

    def _attested(self, route: str, key_id: str, fields: dict[str, str]) -> tuple[dict[str, Any], bytes]:
        """A fresh nonce, evidence binding it, the request to ``route``, the sealed key opened."""
        check_key_id(key_id)
        nonce = self._nonce()
        try:
            kind, evidence = self.identity.evidence(nonce)
        except Exception as exc:  # a producer's own errors (an NSM device, a bug): still this call's failure
            raise KeyProviderError(f"{self}: the worker cannot produce attestation evidence: {exc}") from None
        answer = self._post(
            f"/v1/keys/{quote(key_id, safe='')}/{route}",
            {
                "kind": kind,
                "evidence": base64.b64encode(evidence).decode(),
                "nonce": base64.b64encode(nonce).decode(),
                **fields,
            },
            key_id=key_id,
        )
        sealed = _b64(answer.get("sealed_key"), f"{self}: the {route} answer's sealed_key")
        try:
            data_key = self.identity.open(sealed, release_info(key_id, nonce))
        except BastionError as exc:
            raise KeyProviderError(f"{self}: the released key does not open with this worker's key: {exc}") from None
        if len(data_key) != KEY_BYTES:
            raise KeyProviderError(f"{self}: the released data key is {len(data_key)} bytes, expected {KEY_BYTES}")
        return answer, data_key

    def _nonce(self) -> bytes:
        answer = self._post("/v1/nonce", None, key_id=None)
        nonce = _b64(answer.get("nonce"), f"{self}: the nonce answer's nonce")
        if len(nonce) != NONCE_BYTES:
            raise KeyProviderError(f"{self}: the service sent a {len(nonce)}-byte nonce, expected {NONCE_BYTES}")
        return nonce

    def _post(self, path: str, body: dict[str, Any] | None, *, key_id: str | None) -> dict[str, Any]:
        try:
            r = self._client.post(path, json=body) if body is not None else self._client.post(path)
        except httpx.HTTPError as exc:
            raise KeyProviderError(
                f"{self}: cannot reach the key-release service: {exc or type(exc).__name__}"
            ) from None
        if len(r.content) > _MAX_ANSWER_BYTES:
            raise KeyProviderError(f"{self}: {path} answered {len(r.content)} bytes, more than a KMS answer")
        try:
            data = r.json()
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise KeyProviderError(f"{self}: {path} answered HTTP {r.status_code} without a JSON object")
        if r.status_code == 200:
            return data
        reason = str(data.get("error") or f"HTTP {r.status_code}")[:_MAX_REASON]
        if key_id is not None and (r.status_code == 404 or (r.status_code == 400 and data.get("field") == "wrapped")):
            # the service has no master key by that name, or not the one this data key was wrapped with
            raise KeyUnwrapError(f"{self}: key id {key_id!r}: {reason}")
        if r.status_code == 403 and key_id is not None:
            raise KeyProviderError(f"{self} refused to release key id {key_id!r} to this worker: {reason}")
        retry = r.headers.get("retry-after")
        raise KeyProviderError(
            f"{self}: {path} answered HTTP {r.status_code}: {reason}" + (f" (retry after {retry} s)" if retry else "")
        )


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise KeyProviderError(f"{what}: missing or not text")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyProviderError(f"{what}: not base64") from None


def from_env() -> KmsKeyProvider:
    """The provider for ``--key-provider module:bastion.confidential.kms_client:from_env``:
    ``BASTION_KMS_URL``, optional ``BASTION_KMS_CA`` (a CA bundle for an https service),
    and this process's worker identity."""
    url = os.environ.get(ENV_URL, "").strip()
    if not url:
        raise KeyProviderError(
            f"{ENV_URL} is not set: the trusted worker needs the key-release service's URL (e.g. http://127.0.0.1:8700)"
        )
    ca = os.environ.get(ENV_CA, "").strip()
    try:
        identity = current_identity()
    except BastionError as exc:
        raise KeyProviderError(f"the KMS key provider runs only inside the trusted worker: {exc}") from None
    return KmsKeyProvider(url, identity, verify=ca or True)
