"""End-to-end encrypted inference with Triton's own clients (``tritonclient.http`` / ``.grpc``).

Bastion's sealed requests are ordinary V2 requests (one BYTES input, two parameters), so
the stock clients carry them; these helpers do the sealing around the call::

    import tritonclient.http as httpclient
    sealer = TritonSealer("http://127.0.0.1:8000", "secret_cnn", expect="pcr0=...")
    client = httpclient.InferenceServerClient("127.0.0.1:8000")
    outputs = sealer.infer(client, httpclient, {"x": batch})

The attestation is fetched over REST (the V2 protocol has no attestation call) and
verified before anything is sealed.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import httpx
import numpy as np

from bastion.confidential.client import ConfidentialSession, policy_from, sealed_tensor
from bastion.confidential.sealing import SEALED_TENSOR, RequestSecret

__all__ = ["TritonSealer"]


class TritonSealer:
    """``url``: the server's REST base URL (for the attestation); ``headers``: e.g. the API key."""

    def __init__(self, url: str, model: str, *, expect: Mapping[str, str] | str, allow_dev: bool = False,
                 headers: Mapping[str, str] | None = None, timeout_s: float = 10.0) -> None:
        self.model = model
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=dict(headers or {}), timeout=timeout_s)
        self.session = ConfidentialSession(model, self._fetch, policy_from(expect, allow_dev=allow_dev))

    def _fetch(self, model: str, nonce_hex: str) -> tuple[str, bytes]:
        resp = self._http.get(f"/v2/models/{model}/attestation/{nonce_hex}")
        resp.raise_for_status()
        doc = resp.json()
        return str(doc["kind"]), base64.b64decode(doc["evidence"])

    def seal(self, module: ModuleType, inputs: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
             ) -> tuple[list[Any], dict[str, Any], RequestSecret]:
        """(InferInput list, request parameters, secret) for ``module`` (tritonclient.http or .grpc)."""
        envelope, secret, params = self.session.seal(inputs, outputs)
        tensor = module.InferInput(SEALED_TENSOR, [1], "BYTES")
        if module.__name__.endswith("http"):
            tensor.set_data_from_numpy(sealed_tensor(envelope), binary_data=True)
        else:
            tensor.set_data_from_numpy(sealed_tensor(envelope))
        return [tensor], params, secret

    def open(self, result: Any, secret: RequestSecret) -> dict[str, np.ndarray]:
        """Open a tritonclient InferResult holding the sealed answer."""
        data = result.as_numpy(SEALED_TENSOR)
        if data is None:
            raise ValueError(f"the answer has no {SEALED_TENSOR!r} output")
        return self.session.open(secret, bytes(data.reshape(-1)[0]))

    def infer(self, client: Any, module: ModuleType, inputs: Mapping[str, np.ndarray],
              outputs: Sequence[str] | None = None, **kwargs: Any) -> dict[str, np.ndarray]:
        tensors, params, secret = self.seal(module, inputs, outputs)
        result = client.infer(self.model, tensors, parameters=params, **kwargs)
        return self.open(result, secret)

    def close(self) -> None:
        self._http.close()
