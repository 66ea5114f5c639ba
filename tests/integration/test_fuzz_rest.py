"""Schema-driven fuzzing of the REST API (schemathesis + hypothesis) against a real server.

``docs/openapi.yaml`` describes the API as the server implements it; schemathesis
generates requests from it, valid ones and ones that break it (negative mode), sends them
to a ``bastion serve`` subprocess, and checks every answer: never a 5xx, only the statuses,
content types, headers and bodies the document lists, malformed data refused with a 4xx,
and auth enforced. The same schema is run three times:

* as an admin: every route is reachable (``ignored_auth`` also replays each successful
  request without a key and with a made-up one, and expects 401);
* without a key: everything but health and server metadata is 401;
* with a key scoped to ``simple``: every other model is 403, whether it exists or not.

Then come what random generation seldom reaches: valid requests whose 200 answers must
match the document, odd requests that must still be a 4xx, the order of auth and header
checks, method dispatch; and at the end the server must still be live and serving.

Deliberate exclusions and choices:

* Model names and versions are not enums in the document (any name may be deployed);
  here they are drawn from dictionaries (schemathesis ``[parameters]`` bindings) part of
  the time, so requests reach real models instead of only 404s; so are tensor names.
* ``load``/``unload`` only ever name ``simple_string`` (or random names, which are 404),
  and the other operations never name it: unloading a model they use would turn their
  requests into 503s, and reloading one under them would race its batcher. The last test
  loads it back.
* ``positive_data_acceptance`` is off: the document cannot state a model's signature
  (input names, datatypes, shapes), so a schema-valid body is still, rightly, a 400.
* ``not_a_server_error`` lets readiness probes answer 503 (their documented "no").
* The stateless checks run through ``case.call_and_validate`` under a plain hypothesis
  ``@given`` per operation: schemathesis' own pytest integration
  (``schemathesis.pytest.from_fixture``) fails on pytest 9.2 (``'Function' object has no
  attribute '_nodeid'``), and it would not let one server fixture serve three key setups.
  Its coverage phase (which probes undocumented methods) is therefore replaced by the two
  method tests below.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckContext, CheckFunction
from schemathesis.core.transport import Response

from bastion.guard.keystore import KeyStore
from tests.polling import wait_until
from tests.serverproc import ServerProcess

SPEC = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
OPERATIONS = [
    op["operationId"]
    for item in yaml.safe_load(SPEC.read_text())["paths"].values()
    for method, op in item.items()
    if method != "parameters"
]

SERVING = ("simple", "digits", "digits_skops")  # loaded all along
SPARE = "simple_string"  # the one model load/unload may touch
SCOPE = "simple"  # the scoped key's one model
OPEN_OPERATIONS = {"serverMetadata", "serverLive", "serverReady"}
ADMIN_OPERATIONS = {"repositoryModelLoad", "repositoryModelUnload", "metrics"}
PROBES = {"serverLive", "serverReady", "modelReady", "modelVersionReady"}
# per operation and run; raise it for a deeper search: BASTION_FUZZ_EXAMPLES=500 pytest ...
MAX_EXAMPLES = int(os.environ.get("BASTION_FUZZ_EXAMPLES", "12"))

SIMPLE_BODY = {
    "inputs": [
        {"name": "INPUT0", "datatype": "INT32", "shape": [1, 16], "data": list(range(16))},
        {"name": "INPUT1", "datatype": "INT32", "shape": [1, 16], "data": [1] * 16},
    ]
}

_CONFIG: dict[str, Any] = {
    "suppress-health-check": ["too_slow", "filter_too_much", "data_too_large"],
    "dictionaries": {
        # the models that stay loaded, and one unknown name
        "models": {"values": [*SERVING, "no_such_model"]},
        "spare": {"values": [SPARE]},
        "versions": {"values": ["1", "2", "0", "01", "x", "-1", "99999999999999999999"]},
        # the demo models' tensors, so that bodies get past the name checks now and then
        "inputs": {"values": ["INPUT0", "INPUT1", "input"]},
        "outputs": {"values": ["OUTPUT0", "OUTPUT1", "label", "probabilities"]},
    },
    "parameters": {
        "path.model_name": {"dictionary": "models", "probability": 0.6},
        "path.model_version": {"dictionary": "versions", "probability": 0.5},
        "body.inputs[*].name": {"dictionary": "inputs", "probability": 0.7},
        "body.outputs[*].name": {"dictionary": "outputs", "probability": 0.7},
    },
    "operations": [
        {
            "include-operation-id": ["repositoryModelLoad", "repositoryModelUnload"],
            "parameters": {"path.model_name": {"dictionary": "spare", "probability": 0.7}},
        },
        {
            # a readiness probe answers "no" with 503 and {} by design (an unknown version of a
            # known model is not ready); every other 5xx is still a failure
            "include-operation-id": sorted(PROBES),
            "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}},
        },
    ],
    "checks": {
        # a schema-valid body need not match the model's signature (see the module docstring)
        "positive_data_acceptance": {"enabled": False},
    },
}


# ------------------------------------------------------------------------------ fixtures


class Keys:
    def __init__(self, db: Path) -> None:
        store = KeyStore(db)
        self.admin, _ = store.create_key("fuzz", role="admin")
        self.scoped, _ = store.create_key("scoped", models=[SCOPE])
        store.close()


@pytest.fixture(scope="module")
def fuzzed(demo_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Keys]]:
    db = tmp_path_factory.mktemp("fuzz") / "keys.db"
    keys = Keys(db)
    server = ServerProcess(demo_repo, "--keys", str(db), "--poll-interval", "0", "--grpc-port", "-1")
    yield server, keys
    code = server.stop()
    assert code == 0, server.logs()


@pytest.fixture(scope="module")
def api_schema(fuzzed: tuple[ServerProcess, Keys]) -> schemathesis.BaseSchema:
    server, _ = fuzzed
    config = schemathesis.Config.from_dict({**_CONFIG, "base-url": server.url})
    return schemathesis.openapi.from_path(SPEC, config=config)


# ------------------------------------------------------------------------------ checks


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _error(response: Response) -> str | None:
    try:
        doc = response.json()
    except ValueError:
        return None
    return doc.get("error") if isinstance(doc, dict) else None


def _unrouted(response: Response) -> bool:
    """A 404/405 decided by routing, before any credential is looked at: a generated path
    parameter holding '/' (or ':' on /v1) lands on another route, or on none."""
    message = _error(response) or ""
    return (response.status_code == 404 and message.startswith(("no route for", "TF-Serving method"))) or (
        response.status_code == 405 and message.startswith("method ")
    )


def _routed_model(case: Case, response: Response) -> str | None:
    """The model the server routed this request to, when the path took the documented shape."""
    name = case.path_parameters.get("model_name") if case.path_parameters else None
    if not isinstance(name, str):
        return None
    path = unquote(urlsplit(response.request.url).path)
    if f"/{name}" not in path or "/" in name or name in ("", ".", "..") or (":" in name and "/v1/" in path):
        return None
    return name


def error_bodies_name_the_problem(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """Every 4xx/5xx, except a failed probe's ``{}``, is ``{"error": "<a message>"}``."""
    if response.status_code >= 400 and not (response.status_code == 503 and response.content == b"{}"):
        message = _error(response)
        assert isinstance(message, str) and message.strip(), (
            f"{response.status_code} without an error message: {response.content[:200]!r}"
        )
    return None


def _sent_key(response: Response) -> str | None:
    """The key the request carried; negative cases may drop the one given or make one up."""
    value = response.request.headers.get("Authorization") or ""
    return value[7:] if value.startswith("Bearer ") else None


def auth_is_enforced(keys: Keys) -> CheckFunction:
    """The admin key reaches everything; the scoped key only ``simple`` and no admin route;
    any other request (no key, or one schemathesis made up) is 401 outside health and
    server metadata. Requests that routing refuses (404/405) never get as far as auth."""

    def check(ctx: CheckContext, response: Response, case: Case) -> bool | None:
        op = case.operation.definition.raw.get("operationId")
        if op in OPEN_OPERATIONS or _unrouted(response):
            return None
        status = response.status_code
        shown = f"{case.method} {response.request.url}: {status} {response.content[:200]!r}"
        key = _sent_key(response)
        if key == keys.admin:
            assert status not in (401, 403), f"admin key refused: {shown}"
            return None
        if key != keys.scoped:
            assert status == 401, f"no valid key, yet not 401: {shown}"
            return None
        assert status != 401, f"a valid scoped key was refused as unauthenticated: {shown}"
        if op in ADMIN_OPERATIONS:
            assert status == 403, f"a non-admin key on an admin route: {shown}"
        elif op in ("repositoryIndex", "repositoryIndexGet"):
            if status == 200:
                names = {row["name"] for row in response.json()}
                assert names <= {SCOPE}, f"index shows models outside the key's scope: {sorted(names)}"
        else:
            model = _routed_model(case, response)
            if model == SCOPE:
                assert status != 403, f"the key's own model was refused: {shown}"
            elif model is not None:
                assert status == 403, f"model {model!r} is outside the key's scope: {shown}"
        return None

    return check


# ------------------------------------------------------------------------------ the runs


def _fuzz(api_schema: schemathesis.BaseSchema, operation_id: str, send: Callable[[Case], None]) -> None:
    """Hypothesis over one operation: schema-valid cases and cases that break the schema."""
    operation = api_schema.find_operation_by_id(operation_id)
    strategy = st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE), operation.as_strategy(GenerationMode.NEGATIVE)
    )

    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=strategy)
    def run(case: Case) -> None:
        send(case)

    run()


@pytest.mark.parametrize("who", ["admin", "no key", "scoped key"])
@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_fuzz(
    api_schema: schemathesis.BaseSchema, fuzzed: tuple[ServerProcess, Keys], operation_id: str, who: str
) -> None:
    """Every operation, as an admin, without a key, and with a key scoped to `simple`."""
    server, keys = fuzzed
    extra: dict[str, Any] = {}
    if who == "admin":
        extra["headers"] = _bearer(keys.admin)
    elif who == "scoped key":
        extra["headers"] = _bearer(keys.scoped)

    def send(case: Case) -> None:
        case.call_and_validate(
            base_url=server.url,
            additional_checks=[error_bodies_name_the_problem, auth_is_enforced(keys)],
            timeout=30,
            **extra,
        )

    _fuzz(api_schema, operation_id, send)


# Random bodies seldom match a model's signature, so the 200 answers get checked against the
# document here, on requests that must succeed.
DIGITS_ROW = [0.5] * 64
GOOD_REQUESTS: list[tuple[str, str, dict[str, str], Any]] = [
    # (id, operation, path parameters, body)
    ("server-metadata", "serverMetadata", {}, None),
    ("live", "serverLive", {}, None),
    ("ready", "serverReady", {}, None),
    ("metadata", "modelMetadata", {"model_name": "digits"}, None),
    ("version-metadata", "modelVersionMetadata", {"model_name": "simple", "model_version": "1"}, None),
    ("model-ready", "modelReady", {"model_name": "digits_skops"}, None),
    ("version-ready", "modelVersionReady", {"model_name": "simple", "model_version": "1"}, None),
    ("infer-json", "modelInfer", {"model_name": "simple"}, {**SIMPLE_BODY, "id": "fuzz-1"}),
    (
        "infer-binary-output",
        "modelVersionInfer",
        {"model_name": "digits", "model_version": "1"},
        {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 64], "data": DIGITS_ROW * 2}],
            "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}, {"name": "label"}],
        },
    ),
    ("index-get", "repositoryIndexGet", {}, None),
    ("index-post", "repositoryIndex", {}, {"ready": True}),
    ("load", "repositoryModelLoad", {"model_name": SPARE}, None),
    ("tfs-status", "tfsModelStatus", {"model_name": "digits"}, None),
    ("tfs-version-status", "tfsModelVersionStatus", {"model_name": "digits", "model_version": "7"}, None),
    (
        "tfs-rows",
        "tfsPredict",
        {"model_name": "simple"},
        {"instances": [{"INPUT0": list(range(16)), "INPUT1": [1] * 16}] * 2},
    ),
    (
        "tfs-columns",
        "tfsVersionPredict",
        {"model_name": "digits_skops", "model_version": "1"},
        {"inputs": {"input": [DIGITS_ROW]}},
    ),
    ("metrics", "metrics", {}, None),
]


@pytest.mark.parametrize(
    ("operation_id", "path_parameters", "body"), [g[1:] for g in GOOD_REQUESTS], ids=[g[0] for g in GOOD_REQUESTS]
)
def test_valid_requests_succeed_as_documented(
    api_schema: schemathesis.BaseSchema,
    fuzzed: tuple[ServerProcess, Keys],
    operation_id: str,
    path_parameters: dict[str, str],
    body: Any,
) -> None:
    server, keys = fuzzed
    operation = api_schema.find_operation_by_id(operation_id)
    kwargs: dict[str, Any] = {"path_parameters": path_parameters}
    if body is not None:
        kwargs.update(body=body, media_type="application/json")
    case = operation.Case(**kwargs)
    response = case.call_and_validate(
        base_url=server.url,
        headers=_bearer(keys.admin),
        additional_checks=[error_bodies_name_the_problem, auth_is_enforced(keys)],
        timeout=60,
    )
    assert response.status_code == 200, response.text


# Requests the generators reach only by luck (names longer than a file name may be, values
# the ONNX graph or scikit-learn chokes on): each must still be a 4xx.
LONG = "m" * 300
ODD_REQUESTS: list[tuple[str, str, str, Any]] = [
    # (id, method, path, JSON body)
    ("load-name-too-long-for-the-filesystem", "POST", f"/v2/repository/models/{LONG}/load", None),
    ("load-name-too-long-with-bundle-suffix", "POST", f"/v2/repository/models/{'m' * 250}/load", None),
    ("unload-name-too-long", "POST", f"/v2/repository/models/{LONG}/unload", None),
    ("metadata-name-too-long", "GET", f"/v2/models/{LONG}", None),
    (
        "string-model-given-non-numbers",
        "POST",
        f"/v2/models/{SPARE}/infer",
        {
            "inputs": [
                {"name": "INPUT0", "datatype": "BYTES", "shape": [1, 16], "data": ["x"] * 16},
                {"name": "INPUT1", "datatype": "BYTES", "shape": [1, 16], "data": ["1"] * 16},
            ]
        },
    ),
    (
        "skops-model-given-fp32-max",
        "POST",
        "/v2/models/digits_skops/infer",
        {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64], "data": [3.4e38] * 64}]},
    ),
    ("skops-tfs-given-fp32-max", "POST", "/v1/models/digits_skops:predict", {"instances": [[-3.4e38] * 64]}),
]


@pytest.mark.parametrize(("method", "path", "body"), [o[1:] for o in ODD_REQUESTS], ids=[o[0] for o in ODD_REQUESTS])
def test_odd_requests_are_refused_with_a_4xx(
    fuzzed: tuple[ServerProcess, Keys], method: str, path: str, body: Any
) -> None:
    server, keys = fuzzed
    if SPARE in path:  # load/unload in the fuzzing may have left it unloaded
        httpx.post(f"{server.url}/v2/repository/models/{SPARE}/load", headers=_bearer(keys.admin), timeout=60)
    r = httpx.request(method, server.url + path, json=body, headers=_bearer(keys.admin), timeout=60)
    assert 400 <= r.status_code < 500, f"{r.status_code} {r.text[:300]}"
    assert r.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200


def test_credentials_are_checked_before_any_header_is_validated(fuzzed: tuple[ServerProcess, Keys]) -> None:
    """401/403 come first: a request that may not reach the model learns nothing from how
    its headers would have been judged."""
    server, keys = fuzzed
    bad = {"Inference-Header-Content-Length": "not-a-number"}
    r = httpx.post(f"{server.url}/v2/models/simple/infer", json=SIMPLE_BODY, headers=bad, timeout=10)
    assert r.status_code == 401, r.text
    r = httpx.post(
        f"{server.url}/v2/models/digits/infer", json=SIMPLE_BODY, headers={**bad, **_bearer(keys.scoped)}, timeout=10
    )
    assert r.status_code == 403, r.text


SPEC_PATHS = {
    path: {method.upper() for method in item if method != "parameters"}
    for path, item in yaml.safe_load(SPEC.read_text())["paths"].items()
}


def _wrong_methods() -> Iterator[tuple[str, str, set[str]]]:
    """(method, concrete path, allowed methods) for every method the document does not list."""
    for path, allowed in sorted(SPEC_PATHS.items()):
        concrete = path.replace("{model_name}", "simple").replace("{model_version}", "1")
        for method in sorted({"GET", "POST", "PUT", "DELETE", "PATCH"} - allowed):
            yield method, concrete, allowed


def test_undocumented_methods_are_405(fuzzed: tuple[ServerProcess, Keys]) -> None:
    """Method dispatch matches the document: any other method is 405, naming the allowed ones."""
    server, keys = fuzzed
    with httpx.Client(headers=_bearer(keys.admin), timeout=10) as http:
        answers = [(m, path, allowed, http.request(m, server.url + path)) for m, path, allowed in _wrong_methods()]
    for method, path, allowed, r in answers:
        assert r.status_code == 405, f"{method} {path}: {r.status_code} {r.text}"
        assert all(m in r.json()["error"] for m in allowed), r.text


def test_405_lists_the_allowed_methods_in_allow(fuzzed: tuple[ServerProcess, Keys]) -> None:
    """RFC 9110, 15.5.6: a 405 MUST carry ``Allow`` (schemathesis' unsupported_method check)."""
    server, keys = fuzzed
    missing = []
    with httpx.Client(headers=_bearer(keys.admin), timeout=10) as http:
        answers = [(m, path, allowed, http.request(m, server.url + path)) for m, path, allowed in _wrong_methods()]
    for method, path, allowed, r in answers:
        if "GET" in allowed:
            allowed = {*allowed, "HEAD"}  # HEAD is served wherever GET is
        if {m.strip() for m in r.headers.get("allow", "").split(",")} != allowed:
            missing.append(f"{method} {path}: Allow={r.headers.get('allow')!r}, expected {sorted(allowed)}")
    assert not missing, "\n".join(missing)


def test_server_still_serves_after_the_fuzzing(fuzzed: tuple[ServerProcess, Keys]) -> None:
    server, keys = fuzzed
    assert httpx.get(f"{server.url}/v2/health/live", timeout=10).status_code == 200
    # put back what unload may have taken away, then the server must be fully ready
    r = httpx.post(f"{server.url}/v2/repository/models/{SPARE}/load", headers=_bearer(keys.admin), timeout=60)
    assert r.status_code == 200, r.text
    wait_until(lambda: httpx.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200, 30, 0.05,
               what="the server ready after the fuzzing", details=server.logs)
    r = httpx.post(f"{server.url}/v2/models/simple/infer", json=SIMPLE_BODY, headers=_bearer(keys.admin), timeout=10)
    assert r.status_code == 200, r.text
    assert r.json()["outputs"][0]["data"] == [i + 1 for i in range(16)]
    assert "unhandled error" not in server.logs(), server.logs()[-5000:]
