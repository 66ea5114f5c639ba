"""A small public client for Bastion's REST API (V2 + repository extension + admin API).

The CLI, the lab and the benchmarks use it: they talk to a server only through the
public protocol, like any outside client. :class:`AdminClient` adds the operator's calls
(``/v2/admin/...``, load/unload, ``/metrics``); :func:`zoo_counters` reads a zoo's
counters from the ``/metrics`` exposition, the one parser of it on the client side.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
import orjson

from bastion.core.datatypes import datatype_of
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor
from bastion.protocol import v2_rest

if TYPE_CHECKING:
    from bastion.confidential.client import ConfidentialSession


class ClientError(Exception):
    """The server answered with an error, or could not be reached."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Client:
    """``api_key`` is sent as ``Authorization: Bearer``; ``verify`` is a CA bundle path (or
    False/True) for https URLs; ``cert`` a client certificate (path, or (cert, key)) for
    mutual TLS."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 60.0,
        headers: dict[str, str] | None = None,
        api_key: str | None = None,
        verify: str | bool = True,
        cert: str | tuple[str, str] | None = None,
    ) -> None:
        headers = dict(headers or {})
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=url.rstrip("/"), timeout=timeout, headers=headers, verify=verify, cert=cert
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise ClientError(f"cannot reach {self._http.base_url}: {err}") from None
        if resp.status_code >= 400:
            try:
                message = orjson.loads(resp.content)["error"]
            except Exception:
                message = resp.text[:200]
            raise ClientError(f"HTTP {resp.status_code}: {message}", resp.status_code)
        return resp

    def repository_index(self) -> list[dict[str, Any]]:
        return orjson.loads(self._call("POST", "/v2/repository/index").content)

    def load(self, name: str) -> None:
        self._call("POST", f"/v2/repository/models/{name}/load")

    def unload(self, name: str) -> None:
        self._call("POST", f"/v2/repository/models/{name}/unload")

    def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        path = f"/v2/models/{name}" + (f"/versions/{version}" if version else "")
        return orjson.loads(self._call("GET", path).content)

    def wait_until_accepted(self, model: str, timeout_s: float = 10.0, interval_s: float = 0.2) -> None:
        """Poll ``model``'s metadata until this client's key is accepted. A key created on a
        running server reaches its workers within about a second (each reloads the key
        store's snapshot), so the first requests with it may still get 401."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.model_metadata(model)
                return
            except ClientError as err:
                if err.status != 401:
                    raise  # anything but an unknown key will not change by waiting
                if time.monotonic() > deadline:
                    raise ClientError(f"the key is still refused after {timeout_s:g} s ({err})", 401) from None
            time.sleep(interval_s)

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        version: str | None = None,
        binary: bool = True,
        parameters: dict[str, Any] | None = None,
    ) -> InferenceResponse:
        tensors = [InferTensor(n, datatype_of(a), tuple(a.shape), a) for n, a in inputs.items()]
        request = InferenceRequest(model, version, tensors, parameters=dict(parameters or {}))
        if binary:
            request.parameters["binary_data_output"] = True
        body, header_len = v2_rest.encode_infer_request(request, binary)
        headers = {"content-type": "application/json" if header_len is None else "application/octet-stream"}
        if header_len is not None:
            headers["inference-header-content-length"] = str(header_len)
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        resp = self._call("POST", path, content=body, headers=headers)
        hl = resp.headers.get("inference-header-content-length")
        return v2_rest.decode_infer_response(resp.content, int(hl) if hl else None)

    # ---- confidential models (docs/CONFIDENTIAL.md) ----------------------------------------
    def attestation(self, model: str, nonce_hex: str, *, version: str | None = None) -> tuple[str, bytes]:
        """The trusted worker's evidence for ``nonce_hex`` (unverified: see ``confidential``)."""
        import base64

        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + f"/attestation/{nonce_hex}"
        doc = orjson.loads(self._call("GET", path).content)
        return str(doc["kind"]), base64.b64decode(doc["evidence"])

    def confidential(self, model: str, *, expect: dict[str, str] | str, allow_dev: bool = False,
                     version: str | None = None) -> ConfidentialSession:
        """A session that verifies ``model``'s worker against ``expect`` before sealing anything."""
        from bastion.confidential.client import ConfidentialSession, policy_from

        return ConfidentialSession(model, lambda m, n: self.attestation(m, n, version=version),
                                   policy_from(expect, allow_dev=allow_dev))

    def infer_confidential(self, session: ConfidentialSession, inputs: dict[str, np.ndarray], *,
                           outputs: Sequence[str] | None = None, version: str | None = None) -> dict[str, np.ndarray]:
        """Seal ``inputs`` to the attested worker, send, open the answer. A sealed error raises
        ``SealedRemoteError`` (status and message only this client can read). A worker that
        restarted has a new key: the request is then refused unopened, and sent once more
        after a fresh attestation."""
        from bastion.confidential.client import sealed_tensor
        from bastion.confidential.wire_names import PARTITIONED_PARAMETER, SEALED_TENSOR

        for attempt in (1, 2):
            envelope, secret, params = session.seal(inputs, outputs)
            try:
                response = self.infer(session.model, {SEALED_TENSOR: sealed_tensor(envelope)}, version=version,
                                      parameters=params)
                break
            except ClientError as err:
                if attempt == 2 or err.status != 400 or "not sealed to this worker" not in str(err):
                    raise
                session.forget()
        sealed = next((t for t in response.outputs if t.name == SEALED_TENSOR), None)
        if sealed is None:
            if response.parameters.get(PARTITIONED_PARAMETER) is True:
                # a partitioned model: the input stayed sealed up to the worker's head; the
                # tail ran on the host, so its outputs come in the clear (docs/CONFIDENTIAL.md)
                return {t.name: t.data for t in response.outputs}
            raise ClientError(f"the server answered without the {SEALED_TENSOR!r} output")
        return session.open(secret, bytes(sealed.data.reshape(-1)[0]))

    def arrays_from_files(self, model: str, specs: list[str], *, version: str | None = None
                          ) -> dict[str, np.ndarray]:
        """Inputs from files, typed and shaped by the model's metadata (see ``infer_files``)."""
        arrays = self._arrays(model, specs, version)
        if isinstance(arrays, bytes):
            raise ClientError("a full V2 request body cannot be sealed: give the tensors as .npy or a list of values")
        return arrays

    def infer_files(
        self, model: str, specs: list[str], *, version: str | None = None, binary: bool = True
    ) -> InferenceResponse:
        """Inputs from files: ``FILE`` (the model's only input) or ``NAME=FILE``; .npy or .json."""
        arrays = self._arrays(model, specs, version)
        if isinstance(arrays, bytes):
            return self._infer_raw(model, version, arrays)
        return self.infer(model, arrays, version=version, binary=binary)

    def _arrays(self, model: str, specs: list[str], version: str | None) -> dict[str, np.ndarray] | bytes:
        meta = self.model_metadata(model, version)
        declared = meta.get("inputs", [])
        arrays: dict[str, np.ndarray] = {}
        for spec in specs:
            name, sep, file = spec.partition("=")
            if not sep:
                file, name = spec, ""
            path = Path(file)
            if path.suffix == ".json":
                doc = orjson.loads(path.read_bytes())
                if isinstance(doc, dict) and "inputs" in doc:
                    return path.read_bytes()
                data = np.asarray(doc)
            elif path.suffix == ".npy":
                data = np.load(path, allow_pickle=False)
            else:
                raise ClientError(f"{file}: expected a .npy or .json file")
            if not name:
                if len(declared) != 1:
                    names = ", ".join(i["name"] for i in declared)
                    raise ClientError(f"model '{model}' has inputs {names}: give them as NAME=FILE")
                name = declared[0]["name"]
            target = next((i for i in declared if i["name"] == name), None)
            if target is not None:
                from bastion.core.datatypes import numpy_dtype

                data = data.astype(numpy_dtype(target["datatype"]), copy=False)
                if len(target["shape"]) == data.ndim + 1:
                    data = data[np.newaxis]  # one sample given: make it a batch of one
            arrays[name] = data
        return arrays

    def _infer_raw(self, model: str, version: str | None, body: bytes) -> InferenceResponse:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        resp = self._call("POST", path, content=body, headers={"content-type": "application/json"})
        hl = resp.headers.get("inference-header-content-length")
        return v2_rest.decode_infer_response(resp.content, int(hl) if hl else None)

    @staticmethod
    def response_as_json(response: InferenceResponse) -> dict[str, Any]:
        return {
            "model_name": response.model_name,
            "model_version": response.model_version,
            "outputs": [
                {
                    "name": t.name,
                    "datatype": t.datatype,
                    "shape": list(t.shape),
                    "data": [
                        x.decode(errors="replace") if isinstance(x, bytes) else x for x in t.data.ravel().tolist()
                    ],
                }
                for t in response.outputs
            ],
        }


# ---- the operator's side ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NewKey:
    """A key the server just created. ``token`` is in this one answer and nowhere else (the
    server stores only its HMAC); ``info`` is the key's record as the admin API lists it."""

    token: str
    key_id: str
    tenant: str
    info: dict[str, Any]


class AdminClient(Client):
    """A client with an admin key: the REST admin API (keys, tenants' limits and defense
    classes), and ``/metrics``. Load and unload are :class:`Client`'s own."""

    def __init__(self, url: str, api_key: str, *, timeout: float = 30.0, verify: str | bool = True) -> None:
        super().__init__(url, timeout=timeout, api_key=api_key, verify=verify)
        self._url = url.rstrip("/")
        self._verify = verify

    def create_key(self, tenant: str, *, role: str = "infer", models: Sequence[str] | None = None,
                   description: str = "") -> NewKey:
        """``POST /v2/admin/keys``: a new key for ``tenant`` (created with it when new);
        ``models``: the only models the key may call (None: every model)."""
        doc: dict[str, Any] = {"tenant": tenant, "role": role, "description": description}
        if models is not None:
            doc["models"] = list(models)
        got = orjson.loads(self._call("POST", "/v2/admin/keys", json=doc).content)
        token = got.pop("key")
        return NewKey(str(token), str(got.get("key_id", "")), str(got.get("tenant", tenant)), got)

    def set_limits(self, tenant: str, *, rate_per_s: float | None = None, burst: int | None = None,
                   quota: int | None = None, quota_period: str | None = None) -> dict[str, Any]:
        """``PUT /v2/admin/tenants/{tenant}/limits``: what the server enforces from then on
        (a field left None is unlimited; ``quota_period`` is ``day`` or ``total``). Returns
        the tenant's record."""
        given = {"rate_per_s": rate_per_s, "burst": burst, "quota": quota, "quota_period": quota_period}
        doc = {k: v for k, v in given.items() if v is not None}
        return orjson.loads(self._call("PUT", f"/v2/admin/tenants/{tenant}/limits", json=doc).content)

    def set_defense_class(self, tenant: str, defense_class: str) -> dict[str, Any]:
        """``PUT /v2/admin/tenants/{tenant}/class``: the zoo defense class the tenant's
        requests are served under. Returns the tenant's record; raises if the server reports
        another class (an experiment must not measure the wrong defense)."""
        got = orjson.loads(self._call("PUT", f"/v2/admin/tenants/{tenant}/class",
                                      json={"defense_class": defense_class}).content)
        if got.get("defense_class") != defense_class:
            raise ClientError(f"tenant {tenant}: class {got.get('defense_class')!r} after setting {defense_class!r}")
        return got

    def metrics_text(self) -> str:
        """The ``/metrics`` page (Prometheus text exposition; admin role only)."""
        return self._call("GET", "/metrics").text

    def zoo_counters(self, zoo: str) -> ZooCounters:
        return zoo_counters(self.metrics_text(), zoo)

    def wait_for_key(self, token: str, model: str, timeout_s: float = 10.0) -> None:
        """Wait until the server accepts a key just created (see :meth:`Client.wait_until_accepted`)."""
        with Client(self._url, api_key=token, timeout=5.0, verify=self._verify) as client:
            client.wait_until_accepted(model, timeout_s)


# ---- /metrics --------------------------------------------------------------------------------------
# the outcome label of ``bastion_zoo_requests_total``: met counts toward goodput
ZOO_OUTCOMES = ("met", "missed_accuracy", "missed_latency", "missed_both", "rejected")


@dataclass(frozen=True)
class ZooCounters:
    """One zoo's counters on a ``/metrics`` page: requests by outcome (every outcome of
    :data:`ZOO_OUTCOMES` present) and selections by variant (feasible or not, summed)."""

    requests: dict[str, float]
    selections: dict[str, float]


def zoo_counters(metrics_text: str, zoo: str) -> ZooCounters:
    """``bastion_zoo_requests_total`` and ``bastion_zoo_selections_total`` of ``zoo`` from a
    ``/metrics`` page (with several workers the page already holds their sum)."""
    # imported here: only the tools that read /metrics need the parser
    from prometheus_client.parser import text_string_to_metric_families

    requests = dict.fromkeys(ZOO_OUTCOMES, 0.0)
    selections: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name not in ("bastion_zoo_requests", "bastion_zoo_selections"):
            continue
        for s in family.samples:
            if not s.name.endswith("_total") or s.labels.get("zoo") != zoo:
                continue
            if family.name == "bastion_zoo_requests":
                requests[s.labels["outcome"]] = requests.get(s.labels["outcome"], 0.0) + s.value
            else:
                variant = s.labels.get("variant", "")
                selections[variant] = selections.get(variant, 0.0) + s.value
    return ZooCounters(requests, selections)
