"""Regenerate kserve-v0.21.json from the KServe Python SDK's generated OpenAPI models.

The KServe CRDs are not part of Kubernetes' own schemas, and the `kserve` package is too
heavy a test dependency (FastAPI, pandas, the Kubernetes client, ...). Its wheel, however,
carries one generated model class per API type with every field's JSON name
(`attribute_map`) and type (`openapi_types`), taken from KServe's Go API. This script turns
the types Bastion's manifests use into a small JSON Schema; Kubernetes' own types
(V1Container, V1Volume, ...) are `$ref`s into the Kubernetes schema that the
`kubernetes-validate` package ships, resolved by tests/deploy/test_manifests.py.

    pip download --no-deps -d /tmp/kserve kserve==0.21.0
    python deploy/schemas/generate_kserve_schema.py /tmp/kserve/kserve-0.21.0-py3-none-any.whl

Requires fields the CRDs require (config/crd/full/serving.kserve.io_*.yaml in
github.com/kserve/kserve): a runtime's `containers`, a model format's `name`, an
InferenceService's `predictor`, a predictor model's `modelFormat`.
"""

from __future__ import annotations

import ast
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

VERSION = "0.21.0"
HERE = Path(__file__).resolve().parent
K8S = "https://kubernetes.io/api/_definitions.json#/$defs/"
# KServe types expanded field by field (additionalProperties: false); other KServe types
# (canary, explainer, batcher, logger, worker spec, ...) are only checked to be objects
EXPANDED = {
    "V1alpha1ServingRuntimeSpec": "v1alpha1_serving_runtime_spec",
    "V1alpha1SupportedModelFormat": "v1alpha1_supported_model_format",
    "V1beta1InferenceServiceSpec": "v1beta1_inference_service_spec",
    "V1beta1PredictorSpec": "v1beta1_predictor_spec",
    "V1beta1ModelSpec": "v1beta1_model_spec",
    "V1beta1ModelFormat": "v1beta1_model_format",
}
REQUIRED = {
    "V1alpha1ServingRuntimeSpec": ["containers"],
    "V1alpha1SupportedModelFormat": ["name"],
    "V1beta1InferenceServiceSpec": ["predictor"],
    "V1beta1ModelSpec": ["modelFormat"],
    "V1beta1ModelFormat": ["name"],
}
# the values KServe documents for these fields ("v1 or v2 or grpc-v1 or grpc-v2")
PROTOCOLS = {"type": "string", "enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}
# Kubernetes types whose name in the Kubernetes schema is not io.k8s.api.core.v1.<Name>
K8S_NAMES = {
    "V1ObjectMeta": "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta",
    "K8sIoApiAppsV1DeploymentStrategy": "io.k8s.api.apps.v1.DeploymentStrategy",
}


def _dict_literal(source: str, name: str) -> dict[str, str]:
    match = re.search(rf"^    {name} = (\{{.*?\}})$", source, re.S | re.M)
    if match is None:
        raise ValueError(f"no {name} in the model source")
    return ast.literal_eval(match.group(1))


def _type(t: str, known_k8s: set[str]) -> dict[str, Any]:
    if t in ("str", "date", "datetime"):
        return {"type": "string"}
    if t == "int":
        return {"type": "integer"}
    if t == "bool":
        return {"type": "boolean"}
    if t == "object":
        return {"type": "object"}
    if t.startswith("list["):
        return {"type": "array", "items": _type(t[5:-1], known_k8s)}
    if t.startswith("dict(str, "):
        return {"type": "object", "additionalProperties": _type(t[10:-1], known_k8s)}
    if t == "ResourceQuantity":
        return {"type": ["string", "integer", "number"]}
    if t in EXPANDED:
        return {"$ref": f"#/$defs/{t}"}
    k8s = K8S_NAMES.get(t) or (f"io.k8s.api.core.v1.{t[2:]}" if re.fullmatch(r"V1[A-Z]\w+", t) else None)
    if k8s is not None and k8s in known_k8s:
        return {"$ref": K8S + k8s}
    return {"type": "object"}  # another KServe type, or a Kubernetes type newer than the schema


def build(wheel: Path, known_k8s: set[str]) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    with zipfile.ZipFile(wheel) as z:
        for cls, module in EXPANDED.items():
            source = z.read(f"kserve/models/{module}.py").decode()
            types, names = _dict_literal(source, "openapi_types"), _dict_literal(source, "attribute_map")
            props = {names[attr]: _type(t, known_k8s) for attr, t in sorted(types.items())}
            for key in ("protocolVersion",):
                if key in props:
                    props[key] = PROTOCOLS
            if "protocolVersions" in props:
                props["protocolVersions"] = {"type": "array", "items": PROTOCOLS}
            defs[cls] = {"type": "object", "additionalProperties": False, "properties": props}
            if cls in REQUIRED:
                defs[cls]["required"] = REQUIRED[cls]
    meta = {"$ref": K8S + K8S_NAMES["V1ObjectMeta"]}

    def resource(api_version: str, kind: str, spec: str) -> dict[str, Any]:
        return {
            "type": "object",
            "additionalProperties": False,
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"const": api_version},
                "kind": {"const": kind},
                "metadata": meta,
                "spec": {"$ref": f"#/$defs/{spec}"},
                "status": {"type": "object"},
            },
        }

    defs["ClusterServingRuntime"] = resource("serving.kserve.io/v1alpha1", "ClusterServingRuntime",
                                             "V1alpha1ServingRuntimeSpec")
    defs["ServingRuntime"] = resource("serving.kserve.io/v1alpha1", "ServingRuntime", "V1alpha1ServingRuntimeSpec")
    defs["InferenceService"] = resource("serving.kserve.io/v1beta1", "InferenceService",
                                        "V1beta1InferenceServiceSpec")
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://bastion.invalid/deploy/schemas/kserve-v0.21.json",
        "$comment": (
            f"Generated by deploy/schemas/generate_kserve_schema.py from the kserve {VERSION} wheel "
            "(PyPI), kserve/models/*.py (attribute_map, openapi_types), which KServe generates from its Go "
            "API (github.com/kserve/kserve, pkg/apis/serving); required fields as in the CRDs "
            "config/crd/full/serving.kserve.io_*.yaml. Only the types Bastion's manifests use are expanded."
        ),
        "$defs": defs,
    }


def main() -> None:
    import kubernetes_validate

    base = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    # only Kubernetes types present in the oldest schema the tests validate against
    oldest = sorted(base.glob("v1.29.*-local-strict"))[0]
    known = set(json.loads((oldest / "_definitions.json").read_text())["$defs"])
    schema = build(Path(sys.argv[1]), known)
    out = HERE / "kserve-v0.21.json"
    out.write_text(json.dumps(schema, indent=1, sort_keys=False) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
