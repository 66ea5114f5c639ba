"""A small public client for Bastion's REST API (V2 + repository extension).

The CLI uses it, and so will the lab and benchmarks: they talk to a server only
through the public protocol, like any outside client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson

from bastion.core.datatypes import datatype_of
from bastion.core.tensors import InferenceRequest, InferenceResponse, InferTensor
from bastion.protocol import v2_rest


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

    def infer_files(
        self, model: str, specs: list[str], *, version: str | None = None, binary: bool = True
    ) -> InferenceResponse:
        """Inputs from files: ``FILE`` (the model's only input) or ``NAME=FILE``; .npy or .json."""
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
                    return self._infer_raw(model, version, path.read_bytes())
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
        return self.infer(model, arrays, version=version, binary=binary)

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
