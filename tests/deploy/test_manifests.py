"""The deployment files in deploy/, checked offline (no cluster, no KServe here).

- every YAML document parses and is a Kubernetes object;
- core kinds validate against Kubernetes' own JSON schemas (the `kubernetes-validate`
  package, strict: unknown fields fail), for the oldest and the newest version we target;
- KServe kinds validate against deploy/schemas/kserve-v0.21.json (generated from the
  KServe SDK's models, see deploy/schemas/README.md), whose Kubernetes types (containers,
  volumes, probes) are again Kubernetes' strict schemas;
- the command line of every Bastion container is accepted by the real `bastion serve`,
  `bastion audit ship` and `bastion audit verify` parsers, with the environment the
  manifest gives it (the replica id: the longest pod name Kubernetes would give), and
  `bastion serve`'s own checks; the ports, probes and paths agree with it;
- every container runs non-root, without privilege escalation, with a read-only root
  filesystem, no capabilities, and resource requests and limits.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import click
import jsonschema
import pytest
import yaml

from bastion.cli.main import cli
from bastion.cli.serve_options import options_from_context

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KSERVE_SCHEMA = DEPLOY / "schemas" / "kserve-v0.21.json"
KSERVE_KINDS = {"ClusterServingRuntime", "ServingRuntime", "InferenceService"}
# the Kubernetes versions the manifests must be valid for: native sidecars
# (initContainers[].restartPolicy: Always) are on by default from 1.29
K8S_OLDEST = "1.29"
# flags and commands being added in parallel: missing ones skip (with their name), not fail
PENDING_FLAGS = {"--redis", "--shared-state-fail", "--replica-id"}
PENDING_ENV = {"BASTION_REDIS_URL": "--redis", "BASTION_REPLICA_ID": "--replica-id"}
PENDING_COMMANDS = {("audit", "ship")}


def _load() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]):
        with path.open(encoding="utf-8") as fh:
            for i, doc in enumerate(yaml.safe_load_all(fh)):
                if doc is not None:
                    docs.append((f"{path.relative_to(DEPLOY)}#{i}", doc))
    return docs


DOCS = _load()
CORE = [(name, doc) for name, doc in DOCS if doc.get("kind") not in KSERVE_KINDS]
KSERVE = [(name, doc) for name, doc in DOCS if doc.get("kind") in KSERVE_KINDS]


def _ids(items: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [f"{name}-{doc.get('kind')}" for name, doc in items]


def _k8s_versions() -> list[str]:
    try:
        from kubernetes_validate.utils import latest_version
    except ImportError:
        return [K8S_OLDEST]
    return sorted({K8S_OLDEST, latest_version()}, key=lambda v: tuple(map(int, v.split("."))))


def _kv() -> Any:
    return pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (the dev extra) ships the Kubernetes schemas"
    )


# ---- parsing and schemas ----

def test_the_deploy_directory_has_the_manifests() -> None:
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"ClusterServingRuntime", "InferenceService", "Deployment", "Service", "HorizontalPodAutoscaler",
            "ConfigMap", "Secret", "StatefulSet", "NetworkPolicy"} <= kinds


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=_ids(DOCS))
def test_every_document_is_a_kubernetes_object(name: str, doc: Any) -> None:
    assert isinstance(doc, dict), name
    assert {"apiVersion", "kind", "metadata"} <= set(doc), name
    assert doc["metadata"].get("name"), name


@pytest.mark.parametrize("version", _k8s_versions())
@pytest.mark.parametrize(("name", "doc"), CORE, ids=_ids(CORE))
def test_core_objects_validate_against_the_kubernetes_schema(name: str, doc: dict[str, Any], version: str) -> None:
    kv = _kv()
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as err:
        pytest.fail(f"{name}: {'.'.join(map(str, err.path))}: {err.message}")


def _definitions(version: str) -> Any:
    kv = _kv()
    from importlib.resources import files

    from kubernetes_validate.utils import all_versions, major_minor

    full = [v for v in all_versions() if major_minor(v) <= version][-1]
    path = files(kv.__name__) / "kubernetes-json-schema" / f"v{full}-local-strict" / "_definitions.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _kserve_validator(kind: str, version: str) -> jsonschema.Draft202012Validator:
    from referencing import Registry, Resource

    schema = json.loads(KSERVE_SCHEMA.read_text(encoding="utf-8"))
    registry = Registry().with_resources(
        [(schema["$id"], Resource.from_contents(schema)),
         ("https://kubernetes.io/api/_definitions.json", Resource.from_contents(_definitions(version)))])
    return jsonschema.Draft202012Validator({"$ref": f"{schema['$id']}#/$defs/{kind}"}, registry=registry)


def _kserve_errors(doc: dict[str, Any], version: str) -> list[str]:
    errors = _kserve_validator(doc["kind"], version).iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_the_kserve_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(json.loads(KSERVE_SCHEMA.read_text(encoding="utf-8")))


@pytest.mark.parametrize("version", _k8s_versions())
@pytest.mark.parametrize(("name", "doc"), KSERVE, ids=_ids(KSERVE))
def test_kserve_objects_validate_against_the_vendored_schema(name: str, doc: dict[str, Any], version: str) -> None:
    assert _kserve_errors(doc, version) == [], name


def _first(kind: str) -> dict[str, Any]:
    return copy.deepcopy(next(doc for _, doc in DOCS if doc["kind"] == kind))


def test_the_validators_reject_a_misspelt_field() -> None:
    """The schemas are strict: a typo anywhere is an error, not silently ignored."""
    kv = _kv()
    deployment = _first("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["argz"] = ["serve"]
    with pytest.raises(kv.ValidationError):
        kv.validate(deployment, K8S_OLDEST, strict=True)
    runtime = _first("ClusterServingRuntime")
    runtime["spec"]["protocolVersion"] = ["v2"]  # the field is protocolVersions
    assert _kserve_errors(runtime, K8S_OLDEST)
    runtime = _first("ClusterServingRuntime")
    runtime["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    assert _kserve_errors(runtime, K8S_OLDEST)  # containers are Kubernetes' strict Container
    runtime = _first("ClusterServingRuntime")
    runtime["spec"]["protocolVersions"] = ["v3"]
    assert _kserve_errors(runtime, K8S_OLDEST)
    isvc = _first("InferenceService")
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://x"
    assert _kserve_errors(isvc, K8S_OLDEST)


# ---- pods and containers ----

# the longest names Kubernetes gives these pods (the downward API's metadata.name, used as
# --replica-id): a Deployment's pod is NAME-<pod-template-hash, up to 10>-<5 random>
_HASH = "-5f7d9c8b6f-x2x7q"


def _pod_name(doc: dict[str, Any]) -> str:
    name, kind = doc["metadata"]["name"], doc["kind"]
    if kind == "Deployment":
        return name + _HASH
    if kind == "StatefulSet":
        return f"{name}-{doc['spec'].get('replicas', 1) - 1}"
    if kind in ("ClusterServingRuntime", "ServingRuntime"):  # KServe (raw mode): <isvc>-predictor's pods
        users = [d["metadata"]["name"] for _, d in DOCS if d["kind"] == "InferenceService"
                 and d["spec"]["predictor"].get("model", {}).get("runtime") == name]
        return f"{max(users, key=len, default='model')}-predictor{_HASH}"
    return f"{name}-29000000{_HASH[-6:]}"  # a CronJob's Job's pod


def _pods() -> Iterator[tuple[str, dict[str, Any], dict[str, Any] | None, str]]:
    """(name, pod-like spec with containers and volumes, pod securityContext, pod name) of every pod template."""
    for name, doc in DOCS:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            pod = spec["template"]["spec"]
            yield name, pod, pod.get("securityContext"), _pod_name(doc)
        elif kind == "CronJob":
            pod = spec["jobTemplate"]["spec"]["template"]["spec"]
            yield name, pod, pod.get("securityContext"), _pod_name(doc)
        elif kind in ("ClusterServingRuntime", "ServingRuntime"):
            # a runtime has no pod securityContext: each container has its own
            yield name, spec, None, _pod_name(doc)


PODS = list(_pods())


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


@pytest.mark.parametrize(("name", "pod", "pod_security", "_pod_name"), PODS, ids=[p[0] for p in PODS])
def test_every_container_is_locked_down(name: str, pod: dict[str, Any], pod_security: dict[str, Any] | None,
                                        _pod_name: str) -> None:
    pod_security = pod_security or {}
    for c in _containers(pod):
        where = f"{name} {c['name']}"
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert sc.get("privileged") in (None, False), where
        assert sc.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
        assert sc.get("runAsUser", pod_security.get("runAsUser", 1)) != 0, where
        seccomp = sc.get("seccompProfile") or pod_security.get("seccompProfile") or {}
        assert seccomp.get("type") == "RuntimeDefault", where
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})), f"{where}: resources.{part}"


# ---- Bastion's command lines ----

def _config_value(kind: str, name: str, key: str) -> str | None:
    for _, doc in DOCS:
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            if key in doc.get("stringData", {}):
                return str(doc["stringData"][key])
            if key in doc.get("data", {}):
                value = str(doc["data"][key])
                return base64.b64decode(value).decode() if kind == "Secret" else value
    return None


def _env(container: dict[str, Any], where: str, pod_name: str = "") -> dict[str, str]:
    """The container's environment as the pod would see it (ConfigMaps and Secrets of deploy/)."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        name, source = var["name"], var.get("valueFrom")
        if source is None:
            env[name] = var.get("value", "")
        elif "configMapKeyRef" in source or "secretKeyRef" in source:
            kind, ref = ("ConfigMap", source["configMapKeyRef"]) if "configMapKeyRef" in source \
                else ("Secret", source["secretKeyRef"])
            value = _config_value(kind, ref["name"], ref["key"])
            assert value is not None, f"{where}: env {name}: no {kind} {ref['name']} with key {ref['key']} in deploy/"
            env[name] = value
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[name] = pod_name
        else:
            env[name] = f"<{name}>"
    return env


def _expand(arg: str, env: dict[str, str], where: str) -> str:
    """Kubernetes' $(VAR) expansion of command and args; an undefined VAR would stay literal."""
    def sub(m: re.Match[str]) -> str:
        assert m.group(1) in env, f"{where}: $({m.group(1)}) is not in the container's env"
        return env[m.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, arg)


def _resolve(argv: list[str]) -> tuple[str, click.Command, list[str]]:
    """The `bastion` subcommand argv names ("audit ship"), the command, and its own arguments."""
    ctx = click.Context(cli)
    cmd: click.Command = cli
    path: list[str] = []
    rest = list(argv)
    while isinstance(cmd, click.Group) and rest and not rest[0].startswith("-"):
        found = cmd.get_command(ctx, rest[0])
        if found is None:
            if (*path, rest[0]) in PENDING_COMMANDS:
                pytest.skip(f"`bastion {' '.join([*path, rest[0]])}` does not exist yet (being added)")
            pytest.fail(f"`bastion {' '.join([*path, rest[0]])}` does not exist")
        path.append(rest.pop(0))
        cmd = found
    return " ".join(path), cmd, rest


def _parse(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
           where: str) -> tuple[str, click.Context]:
    """Parse `bastion ARGV` with the real commands, the environment set as in the pod.

    An unknown flag or subcommand, an extra argument, a value its type refuses, or a
    BASTION_* variable the command does not read fails. Paths that must exist are only
    checked to be paths: they exist in the pod, not here.
    """
    name, cmd, args = _resolve(argv)
    for p in cmd.params:
        if isinstance(p.type, click.Path) and p.type.exists:
            monkeypatch.setattr(p.type, "exists", False)
    envvars = {p.envvar for p in cmd.params if isinstance(p.envvar, str)}
    for var in [*envvars, *(v for v in os.environ if v.startswith("BASTION_"))]:
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    for var in sorted(v for v in env if v.startswith("BASTION_") and v not in envvars):
        if var in PENDING_ENV:
            pytest.skip(f"bastion {name} reads no {var} yet ({PENDING_ENV[var]} is being added)")
        pytest.fail(f"{where}: bastion {name} reads no {var}")
    try:
        ctx = cmd.make_context(name, args)
    except click.NoSuchOption as err:
        if err.option_name in PENDING_FLAGS:
            pytest.skip(f"bastion {name} has no {err.option_name} yet (being added)")
        pytest.fail(f"{where}: bastion {name}: {err.format_message()}")
    except click.ClickException as err:
        pytest.fail(f"{where}: bastion {name}: {err.format_message()}")
    return name, ctx


def _value(ctx: click.Context, flag: str) -> Any:
    (param,) = [p for p in ctx.command.params if flag in p.opts]
    return ctx.params[param.name or ""]


def _bastion_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for name, pod, _, pod_name in PODS:
        for c in _containers(pod):
            yield f"{name} {c['name']}", {**pod, "_name": pod_name}, c


def _argv(c: dict[str, Any]) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def _serve_argv(c: dict[str, Any]) -> list[str] | None:
    argv = _argv(c)
    return argv[1:] if argv[:2] == ["bastion", "serve"] else None


RUNNERS = [(where, pod, c) for where, pod, c in _bastion_containers() if _argv(c)[:1] == ["bastion"]]
SERVERS = [(where, pod, c) for where, pod, c in RUNNERS if _serve_argv(c) is not None]


def test_every_bastion_deployment_runs_bastion_serve() -> None:
    assert {where.split("#")[0] for where, _, _ in SERVERS} == {
        "kserve/cluster-serving-runtime.yaml", "kubernetes/30-bastion.yaml"}


@pytest.mark.parametrize(("where", "pod", "container"), RUNNERS, ids=[s[0] for s in RUNNERS])
def test_every_bastion_command_line_parses(where: str, pod: dict[str, Any], container: dict[str, Any],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(container, where, pod["_name"])
    _parse([_expand(a, env, where) for a in _argv(container)[1:]], env, monkeypatch, where)


def _mounted(pod: dict[str, Any], c: dict[str, Any], path: str) -> bool:
    """`path` lies on a volume of the container (whose volume the pod declares)."""
    names = {v["name"] for v in pod.get("volumes", [])}
    return any(PurePosixPath(path).is_relative_to(m["mountPath"]) and m["name"] in names
               for m in c.get("volumeMounts", []))


def _volume(pod: dict[str, Any], c: dict[str, Any], mount_path: str) -> dict[str, Any]:
    """The pod's volume the container mounts at exactly `mount_path`."""
    (name,) = [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == mount_path]
    return next(v for v in pod["volumes"] if v["name"] == name)


@pytest.mark.parametrize(("where", "pod", "container"), SERVERS, ids=[s[0] for s in SERVERS])
def test_bastion_serve_accepts_the_command_line(where: str, pod: dict[str, Any], container: dict[str, Any],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    env = _env(container, where, pod["_name"])
    argv = [_expand(a, env, where) for a in _serve_argv(container) or []]
    _, ctx = _parse(argv, env, monkeypatch, where)
    repository = ctx.params["repository"]
    opts = options_from_context(ctx, repository)
    # what `bastion serve` refuses before it binds anything; the replica id is the longest
    # pod name Kubernetes gives this object's pods
    opts.check_security()

    # what every replica must share, and what must differ
    assert opts.keys_db is not None and opts.keys_db.startswith("postgresql://"), where
    assert "@" in opts.keys_db and ":" not in opts.keys_db.split("@")[0].removeprefix("postgresql://"), \
        f"{where}: the PostgreSQL password belongs in PGPASSWORD, not in --keys"
    assert "PGPASSWORD" in env, where
    assert opts.secret_file == "/var/run/bastion/master.secret", where
    assert getattr(opts, "redis_url", None), f"{where}: no Redis URL (--redis / BASTION_REDIS_URL)"
    assert opts.shared_state_fail == "closed", where
    assert opts.replica_id == pod["_name"], f"{where}: --replica-id must be the pod's name (downward API)"
    assert opts.host == "0.0.0.0", where
    assert not opts.insecure_no_auth and opts.audit, where

    # ports and probes agree with the flags
    ports = {p["containerPort"] for p in container["ports"]}
    assert opts.http_port == 8080 and opts.grpc_port == 8081, where
    assert {opts.http_port, opts.grpc_port} <= ports, where
    named = {p.get("name"): p["containerPort"] for p in container["ports"]}
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, f"{where} {probe}"
        assert named.get(get["port"], get["port"]) == opts.http_port, f"{where} {probe}"
        assert get.get("scheme", "HTTP") == ("HTTPS" if opts.tls_cert else "HTTP"), f"{where} {probe}"

    # with a read-only root filesystem, everything Bastion reads or writes is a volume
    assert _mounted(pod, container, opts.audit_dir or ""), f"{where}: --audit-dir is not a volume"
    assert _mounted(pod, container, opts.secret_file), f"{where}: --secret-file is not a volume"
    assert _mounted(pod, container, "/tmp"), f"{where}: /tmp (the --workers run directory) is not a volume"
    if repository != "/mnt/models":  # KServe mounts /mnt/models itself
        assert _mounted(pod, container, repository), f"{where}: the model repository is not a volume"


def _shell_invocations(script: str, program: str) -> list[list[str]]:
    """The `bastion ...` command lines of a shell script (up to ; && || | } or a line end)."""
    found = []
    for line in script.splitlines():
        for m in re.finditer(rf"(?:^|[\s;{{(]){program}\s([^;&|}}\n]*)", line):
            found.append(shlex.split(m.group(1)))
    return found


def _shell_expand(arg: str, env: dict[str, str], where: str) -> str:
    def sub(m: re.Match[str]) -> str:
        var = m.group(1) or m.group(2)
        assert var in env, f"{where}: ${var} is not in the container's env"
        return env[var]

    return re.sub(r"\$\{([A-Za-z_]\w*)\}|\$([A-Za-z_]\w*)", sub, arg)


SHIPPERS = [(where, pod, c) for where, pod, c in _bastion_containers()
            if c.get("command", [])[:2] == ["sh", "-c"] and "bastion audit ship" in "".join(c.get("args", []))]


def test_every_bastion_deployment_ships_its_audit_log() -> None:
    assert {where.split("#")[0] for where, _, _ in SHIPPERS} == {
        where.split("#")[0] for where, _, _ in SERVERS}


@pytest.mark.parametrize(("where", "pod", "container"), SHIPPERS, ids=[s[0] for s in SHIPPERS])
def test_the_audit_sidecar_ships_what_bastion_writes(where: str, pod: dict[str, Any], container: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    server = next(c for c in pod["containers"] if _serve_argv(c) is not None)
    serve_argv = _serve_argv(server) or []
    audit_dir = next(a.split("=", 1)[1] for a in serve_argv if a.startswith("--audit-dir="))
    # both containers mount the same volume at the audit directory
    volume = _volume(pod, server, audit_dir)
    assert _volume(pod, container, audit_dir) == volume, where
    assert {"emptyDir", "persistentVolumeClaim"} & set(volume), where

    env = _env(container, where, pod["_name"])
    invocations = _shell_invocations(container["args"][0], "bastion")
    assert invocations, where
    for argv in invocations:
        argv = [_shell_expand(a, env, where) for a in argv]
        name, ctx = _parse(argv, env, monkeypatch, where)
        assert name == "audit ship", f"{where}: {argv}"
        assert _value(ctx, "--from") == audit_dir, where
        # the archive is a volume shared by every replica, and a cluster-wide verify reads it
        archive = _value(ctx, "--to")
        assert _mounted(pod, container, archive), f"{where}: --to is not a volume"
        claim = _volume(pod, container, archive).get("persistentVolumeClaim", {}).get("claimName")
        assert claim == "bastion-audit-archive", where
        verifiers = [c for _, _, c in RUNNERS if _argv(c)[1:3] == ["audit", "verify"] and archive in _argv(c)]
        assert verifiers, f"{where}: no `bastion audit verify {archive}` CronJob"


def test_the_parser_check_catches_a_renamed_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    where, pod, container = SERVERS[0]
    env = _env(container, where, pod["_name"])
    argv = [_expand(a, env, where) for a in _serve_argv(container) or []]
    with pytest.raises(pytest.fail.Exception, match="--audit-directory"):
        _parse([*argv, "--audit-directory=/x"], env, monkeypatch, where)
    with pytest.raises(pytest.fail.Exception, match="http-port"):
        _parse([*argv, "--http-port=http"], env, monkeypatch, where)
    with pytest.raises(pytest.fail.Exception, match="shared-state-fail"):
        _parse([*argv, "--shared-state-fail=maybe"], env, monkeypatch, where)
    with pytest.raises(pytest.fail.Exception, match="BASTION_NOT_A_SETTING"):
        _parse(argv, {**env, "BASTION_NOT_A_SETTING": "1"}, monkeypatch, where)
    with pytest.raises(pytest.fail.Exception, match="audit shipp"):
        _parse(["audit", "shipp", "--from", "/x"], {}, monkeypatch, where)
