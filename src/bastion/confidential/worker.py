"""The trusted worker: holds confidential models and their keys, answers over the channel.

In production this process runs inside a TEE (a Nitro enclave, an SEV-SNP or TDX
confidential VM, Gramine-SGX) and listens on vsock; here it is an ordinary process on a
Unix socket, which protects nothing from this host's root. What it enforces is the
same either way:

* it opens a sealed bundle only if a trusted signer signed it, its digest is pinned (when
  ``models`` pins are configured), and the key provider releases its data key (through
  the key-release service, to this worker's attested key);
* plaintext of weights and of end-to-end sealed inputs and outputs exists only here (the
  fast-recovery mirror, ``mirror.py``, writes the weights to the host's disk only encrypted
  under a key that the KMS releases to this worker alone);
* everything it receives is bounded and checked before use, and a bad request is an
  error answer, never a crash: the front process is not trusted either.

Messages (CBOR maps over ``channel.SecureChannel``), each with an ``id`` echoed in the
answer, handled concurrently:

* ``{"op":"attest","nonce"}`` -> ``{"kind","evidence"}`` (for a client's attestation GET)
* ``{"op":"load","model","version","bundle"}`` -> ``{"inputs","outputs","max_batch_size","platform",
  "bundle_sha256","source"}`` (``source``: ``"bundle"``, or ``"mirror"`` when the weights came from
  the fast-recovery mirror instead of a key release and the bundle's decryption)
* ``{"op":"unload","model","version"}`` -> ``{}``
* ``{"op":"infer","model","version","inputs"}`` -> ``{"outputs"}`` (plaintext mode: the
  weights stay here, the tensors crossed the host)
* ``{"op":"sealed","model","version","envelope","rows"}`` -> ``{"status","envelope"}``: the
  answer, or the error, sealed to the client; ``status`` alone is visible to the host.
* ``{"op":"health"}`` -> ``{"models": [...]}``

Errors: ``{"error": {"status", "message"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bastion.confidential.channel import ChannelClosed, ChannelError, SecureChannel, accept_channel
from bastion.confidential.identity import WorkerIdentity, set_current_identity
from bastion.confidential.mirror import Mirror, MirrorContent, can_generate
from bastion.confidential.sealing import ReplayCache, SealingError, open_request, seal_error, seal_response
from bastion.confidential.tensor_codec import decode_tensors, encode_tensors
from bastion.confidential.worker_config import WorkerConfig
from bastion.core.datatypes import datatype_of
from bastion.core.errors import BastionError, InvalidInput, NotFound
from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.guard.bundles import CONFIG_PATH, load_public_key, verify_bundle
from bastion.guard.keyproviders import KeyProvider, load_key_provider

log = logging.getLogger("bastion.confidential.worker")

__all__ = ["TrustedWorker", "build_identity", "build_mirror", "dev_measurement", "serve_worker"]

_MAX_NAME = 256
# A predict measured to take at most this long runs on the loop's thread: handing it to a
# thread and back costs two wake-ups (~0.1 ms each on a busy 2-core machine), more than a
# small model computes. The loop is held at most about this long.
INLINE_MAX_S = 0.001
INLINE_AFTER = 8
_OPS = ("attest", "health", "load", "unload", "infer", "sealed")


@dataclass
class _Model:
    config: ModelConfig
    runtime: Any
    inputs: dict[str, TensorSpec]
    outputs: tuple[TensorSpec, ...]
    hardening: Any
    bundle_sha256: str
    e2e: str  # from the bundle's own config: the host's config.yaml cannot relax it
    # a partition head (its sealed config names a tail): its outputs are the features the
    # host's tail runs on, so a sealed request's features leave in the clear by design
    head: bool = False
    cost_s: float = 1e-3  # predict time, exponentially weighted: where the next one runs
    measured: int = 0


def dev_measurement(config: WorkerConfig) -> bytes:
    """The dev worker's measurement: its code and its configuration (docs/CONFIDENTIAL.md).
    Model digests enter through the configuration's pins."""
    from bastion.confidential.measurement import code_digest, worker_measurement

    return worker_measurement(code_digest(), config.canonical(), {})


def build_identity(config: WorkerConfig) -> WorkerIdentity:
    """The worker's key pair and its evidence producer, by ``config.attestation``."""
    if config.attestation == "nitro":
        from bastion.confidential.nsm import NitroNsmProducer

        producer: Any = NitroNsmProducer()
    else:
        from bastion.confidential.dev_evidence import DevEvidenceProducer

        producer = DevEvidenceProducer(dev_measurement(config))
    return WorkerIdentity.generate(producer)


class TrustedWorker:
    def __init__(
        self,
        config: WorkerConfig,
        identity: WorkerIdentity,
        key_provider: KeyProvider | None,
        *,
        mirror: Mirror | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.key_provider = key_provider
        self.mirror = mirror
        self.trusted = [load_public_key(p) for p in config.trusted_signers]
        self.models: dict[tuple[str, int], _Model] = {}
        self.replay = ReplayCache()
        # predict threads: the loop only decrypts, decodes and dispatches
        self.pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2), thread_name_prefix="worker-predict")
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the channel ------------------------------------------------------------------
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted = time.perf_counter()
        try:
            channel = await accept_channel(
                reader, writer, identity=self.identity, max_frame_bytes=self.config.max_frame_bytes
            )
        except (BastionError, OSError, asyncio.TimeoutError, EOFError) as exc:
            log.warning("channel handshake failed: %s", exc)
            writer.close()
            return
        # with "listening", says how long the front took to come back (benchmarks/worker_recovery.py)
        log.info("channel up (handshake %.1f ms)", (time.perf_counter() - accepted) * 1e3)
        try:
            while True:
                message = await channel.recv()
                task = asyncio.get_running_loop().create_task(self._answer(channel, message))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (ChannelClosed, asyncio.CancelledError):
            # cancelled at shutdown: end quietly (asyncio's stream server logs a cancelled handler as an error)
            pass
        except (ChannelError, OSError) as exc:
            log.warning("channel closed on error: %s", exc)
        finally:
            channel.close()

    async def _answer(self, channel: SecureChannel, message: Any) -> None:
        ident = message.get("id") if isinstance(message, dict) else None
        try:
            if not isinstance(message, dict):
                raise InvalidInput("message: expected a map")
            reply = await self.dispatch(message)
        except BastionError as err:
            reply = {"error": {"status": err.http_status, "message": err.message}}
        except Exception:  # a bug here must not take the worker down, nor leak details
            log.exception("worker operation failed")
            reply = {"error": {"status": 500, "message": "internal error in the trusted worker"}}
        reply["id"] = ident
        with contextlib.suppress(ChannelError, ChannelClosed, OSError):
            await channel.send(reply)

    async def dispatch(self, message: Mapping[str, Any]) -> dict[str, Any]:
        op = message.get("op")
        if op not in _OPS:
            raise InvalidInput(f"op: unknown operation {str(op)[:40]!r}; expected one of {', '.join(_OPS)}")
        if op == "attest":
            nonce = _bytes(message, "nonce", 64)
            kind, evidence = self.identity.evidence(nonce)
            return {"kind": kind, "evidence": evidence}
        if op == "health":
            return {"models": [f"{m}/{v}" for m, v in sorted(self.models)]}
        model, version = _text(message, "model"), _int(message, "version")
        if op == "load":
            bundle = _bytes(message, "bundle", self.config.max_frame_bytes)
            return await asyncio.get_running_loop().run_in_executor(self.pool, self._load, model, version, bundle)
        if op == "unload":
            loaded = self.models.pop((model, version), None)
            if loaded is not None:
                loaded.runtime.close()
            return {}
        loaded = self._get(model, version)
        if op == "infer":
            if loaded.e2e == "required":
                raise _Refused(f"model {model!r} takes only end-to-end sealed inputs (its sealed config says so)")
            arrays = decode_tensors(message.get("inputs"), max_bytes=self.config.max_frame_bytes)
            _check(loaded, arrays)
            return {"outputs": encode_tensors(await self._predict(loaded, arrays))}
        if loaded.e2e == "off":
            raise InvalidInput(f"model {model!r} does not take sealed inputs (confidential.e2e: off)")
        return await self._sealed(loaded, model, message)

    # ---- operations -------------------------------------------------------------------
    async def _predict(self, loaded: _Model, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if loaded.measured >= INLINE_AFTER and loaded.cost_s <= INLINE_MAX_S:
            t0 = time.perf_counter()
            outputs = loaded.runtime.predict(dict(arrays))
            spent = time.perf_counter() - t0
        else:

            def timed() -> tuple[dict[str, np.ndarray], float]:
                t0 = time.perf_counter()
                return loaded.runtime.predict(dict(arrays)), time.perf_counter() - t0

            outputs, spent = await asyncio.get_running_loop().run_in_executor(self.pool, timed)
        loaded.cost_s = 0.9 * loaded.cost_s + 0.1 * spent
        loaded.measured += 1
        return outputs

    def _get(self, model: str, version: int) -> _Model:
        loaded = self.models.get((model, version))
        if loaded is None:
            raise NotFound(f"model {model!r} version {version} is not loaded in the trusted worker")
        return loaded

    def _load(self, model: str, version: int, bundle: bytes) -> dict[str, Any]:
        """Verify, unwrap and load one version of a sealed bundle. Predict thread.

        With a mirror of this very bundle (same SHA-256), the pins and the signature are
        still checked, then the weights come from the mirror instead of a key release and
        the bundle's decryption; a mirror that does not open is removed and the load goes on
        from the bundle."""
        from bastion.repository.config import parse_model_config_yaml
        from bastion.runtimes import create_runtime

        t0 = time.perf_counter()
        digest = hashlib.sha256(bundle).hexdigest()
        pins = self.config.models
        if pins and digest not in pins.get(model, ()):
            raise _Refused(
                f"{model}: bundle sha256 {digest} is not pinned in this worker's configuration "
                f"(it accepts {', '.join(pins.get(model, ())) or 'no bundle for this model'})"
            )
        if not self.trusted:
            raise _Refused("the trusted worker has no trusted_signers: it opens no bundle")
        if self.key_provider is None:
            raise _Refused("the trusted worker has no key_provider: it cannot unwrap any bundle key")
        verified = verify_bundle(bundle, self.trusted, source=f"{model}/{version}")
        header = verified.header  # signed: its model and versions are the signer's
        if header.model != model:
            raise _Refused(f"bundle is sealed for model {header.model!r}, not {model!r}")
        if version not in header.versions:
            raise _Refused(f"bundle for {model!r} holds versions {list(header.versions)}, not {version}")
        t_verified = time.perf_counter()
        content = self.mirror.read(model, version, digest) if self.mirror is not None else None
        source = "bundle" if content is None else "mirror"
        t_mirror = t_key = time.perf_counter()
        if content is None:
            opened = verified.unseal(self.key_provider)  # the key release: one KMS round trip
            t_key = time.perf_counter()
            content = MirrorContent(opened.read(CONFIG_PATH), opened.read_version(version))
        t_plain = time.perf_counter()
        config = parse_model_config_yaml(model, content.config, source=f"{model}/{version}:config.yaml")
        e2e = config.confidential.e2e if config.confidential is not None else "required"
        head = config.confidential is not None and config.confidential.tail is not None
        # The bundle's own config is run here as a plain model: it must not send itself on.
        config = dataclasses.replace(config, confidential=None)
        runtime = create_runtime(config, Path(model) / str(version), files=content.files)
        inputs = config.inputs or runtime.inputs
        outputs = config.outputs or runtime.outputs
        old = self.models.get((model, version))
        self.models[(model, version)] = _Model(
            config, runtime, {s.name: s for s in inputs}, tuple(outputs), config.hardening, digest, e2e, head=head
        )
        if old is not None:
            old.runtime.close()
        t_session = time.perf_counter()
        if source == "bundle" and self.mirror is not None:
            self.mirror.write(model, version, digest, content)  # once it loaded: a mirror of what works
        del content
        t_end = time.perf_counter()

        def ms(a: float, b: float) -> str:
            return f"{(b - a) * 1e3:.1f}"

        # one line per load, parsed by benchmarks/worker_recovery.py: keep its shape
        log.info(
            "loaded %s/%s (bundle sha256 %s) from %s in %s ms: verify %s, mirror read %s, key release %s, "
            "decrypt %s, session %s, mirror write %s",
            model,
            version,
            digest,
            source,
            ms(t0, t_end),
            ms(t0, t_verified),
            ms(t_verified, t_mirror),
            ms(t_mirror, t_key),
            ms(t_key, t_plain),
            ms(t_plain, t_session),
            ms(t_session, t_end),
        )
        return {
            "head": head,
            "inputs": [_spec(s) for s in inputs],
            "outputs": [_spec(s) for s in outputs],
            "max_batch_size": config.max_batch_size,
            "platform": config.platform or runtime.platform,
            "bundle_sha256": digest,
            "source": source,
        }

    async def _sealed(self, loaded: _Model, model: str, message: Mapping[str, Any]) -> dict[str, Any]:
        envelope = _bytes(message, "envelope", self.config.max_sealed_bytes + 1024)
        rows = message.get("rows")
        # Opening failures are the client's (or an attacker's) bytes: answered in the clear,
        # since without the response key there is nothing to seal them to.
        sealed_for = _text(message, "sealed_for") if message.get("sealed_for") is not None else model
        if sealed_for != model and model not in self.config.zoos.get(sealed_for, ()):
            # the host routes; it must not run a request sealed for one model on another
            # (a zoo's variants are the ones this worker's measured config names)
            raise _Refused(f"a request sealed for {sealed_for!r} is not run on {model!r}")
        try:
            opened = open_request(
                self.identity, envelope, model=sealed_for, replay=self.replay, max_bytes=self.config.max_sealed_bytes
            )
        except SealingError as err:
            if err.opened is None:
                raise  # nothing to seal to yet: size, magic, key, freshness, replay (no plaintext in it)
            # the request opened but its content is wrong: the message describes the client's
            # plaintext, so only the client may read it
            return {"status": err.http_status, "envelope": seal_error(err.opened, err.http_status, err.message)}
        try:
            arrays = opened.inputs
            got = _check(loaded, arrays)
            if rows is not None and loaded.config.max_batch_size > 0 and rows != got:
                # the declared rows are all the host can count (metrics, row quotas): they must be true
                raise InvalidInput(f"parameter bastion_rows: declared {rows}, the sealed inputs hold {got} rows")
            outputs = await self._predict(loaded, arrays)
            if loaded.head:
                # the features are what the host's tail runs on: they leave in the clear, by the
                # design the model's sealed config chose (docs/CONFIDENTIAL.md, partitioned models)
                return {"status": 200, "features": encode_tensors(outputs), "rows": got}
            if loaded.hardening is not None:
                from bastion.guard.hardening import harden

                outputs = harden(outputs, loaded.hardening)
            wanted = opened.outputs
            if wanted:
                missing = [n for n in wanted if n not in outputs]
                if missing:
                    raise InvalidInput(f"unknown output(s) {', '.join(missing)}; the model has {', '.join(outputs)}")
                outputs = {n: outputs[n] for n in wanted}
            return {"status": 200, "envelope": seal_response(opened, outputs)}
        except BastionError as err:
            return {"status": err.http_status, "envelope": seal_error(opened, err.http_status, err.message)}


class _Refused(BastionError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"


def _spec(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _check(loaded: _Model, arrays: Mapping[str, np.ndarray]) -> int:
    """Inputs against the model's signature; returns the rows. Names what is wrong."""
    rows = 1
    batching = loaded.config.max_batch_size > 0
    for name, spec in loaded.inputs.items():
        array = arrays.get(name)
        if array is None:
            raise InvalidInput(f"missing input {name!r}; the model needs {', '.join(loaded.inputs)}")
        have = datatype_of(array)
        if have != spec.datatype:
            raise InvalidInput(f"input {name!r}: datatype {have} does not match the model's {spec.datatype}")
        shape = array.shape
        if len(shape) != len(spec.shape) or any(e not in (-1, d) for e, d in zip(spec.shape, shape, strict=True)):
            raise InvalidInput(f"input {name!r}: shape {list(shape)} does not match the model's {list(spec.shape)}")
        if batching:
            rows = int(array.shape[0])
            if rows < 1 or rows > loaded.config.max_batch_size:
                raise InvalidInput(f"input {name!r}: {rows} rows; the model takes 1 to {loaded.config.max_batch_size}")
    extra = sorted(set(arrays) - set(loaded.inputs))
    if extra:
        raise InvalidInput(f"unknown input(s) {', '.join(extra)}; the model needs {', '.join(loaded.inputs)}")
    return rows


def _text(message: Mapping[str, Any], key: str) -> str:
    value = message.get(key)
    if not isinstance(value, str) or not value or len(value) > _MAX_NAME:
        raise InvalidInput(f"{key}: expected a name of 1 to {_MAX_NAME} characters")
    return value


def _int(message: Mapping[str, Any], key: str) -> int:
    value = message.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 63:
        raise InvalidInput(f"{key}: expected a positive integer")
    return value


def _bytes(message: Mapping[str, Any], key: str, limit: int) -> bytes:
    value = message.get(key)
    if not isinstance(value, bytes | bytearray):
        raise InvalidInput(f"{key}: expected bytes")
    if len(value) > limit:
        raise InvalidInput(f"{key}: {len(value)} bytes, more than the {limit} accepted")
    return bytes(value)


def build_mirror(config: WorkerConfig, provider: KeyProvider | None) -> Mirror | None:
    """The fast-recovery mirror ``config.mirror`` asks for, if the key provider can key one."""
    if config.mirror is None:
        return None
    if provider is None or not can_generate(provider):
        log.warning(
            "worker.yaml asks for a fast-recovery mirror, but the key provider %s cannot generate data keys "
            "(the KMS provider can: module:bastion.confidential.kms_client:from_env); the mirror is off",
            provider,
        )
        return None
    return Mirror(config.mirror.dir, config.mirror.key_id, provider, max_bytes=config.max_frame_bytes)  # type: ignore[arg-type]


def _import_runtimes() -> None:
    try:
        import bastion.repository.config
        import bastion.runtimes
        import bastion.runtimes.onnx_runtime  # noqa: F401
    except Exception:  # the load that needs them will say what is wrong
        log.debug("preloading the runtimes failed", exc_info=True)


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux; 10 ms resolution): interpreter start and
    imports, which no log line can time from inside."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime, in clock ticks since boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return None


async def serve_worker(config: WorkerConfig, socket_path: Path | None, *, ready_file: Path | None = None,
                       vsock_port: int | None = None) -> None:
    """Run the worker on a Unix socket (here) or a vsock port (inside a Nitro enclave, where
    the parent instance dials CID:port; untested here: this kernel has no vsock transport)
    until SIGTERM/SIGINT. The channel's framing is the same on both."""
    if (socket_path is None) == (vsock_port is None):
        raise ValueError("give exactly one of socket_path and vsock_port")
    identity = build_identity(config)
    set_current_identity(identity)  # the key provider (module:...kms_client:from_env) finds it here
    provider = load_key_provider(config.key_provider) if config.key_provider else None
    worker = TrustedWorker(config, identity, provider, mirror=build_mirror(config, provider))
    if worker.mirror is not None:
        worker.mirror.start()  # the mirror key's release runs while the front connects
    if vsock_port is not None:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)  # type: ignore[attr-defined]
        sock.bind((socket.VMADDR_CID_ANY, vsock_port))  # type: ignore[attr-defined]
        sock.listen(64)
        server = await asyncio.start_server(worker.handle, sock=sock, limit=1 << 20)
        where = f"vsock port {vsock_port}"
    else:
        assert socket_path is not None
        socket_path = Path(socket_path)
        with contextlib.suppress(FileNotFoundError):
            socket_path.unlink()
        old_umask = os.umask(0o077)  # only this user may connect to the socket
        try:
            server = await asyncio.start_unix_server(worker.handle, path=str(socket_path), limit=1 << 20)
        finally:
            os.umask(old_umask)
        where = str(socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    age = _process_age_s()
    log.warning(
        "trusted worker listening on %s (attestation %s)%s%s",
        where,
        config.attestation,
        " - DEV attestation: self-signed, NOT a TEE" if config.attestation == "dev" else "",
        f"; {age * 1e3:.0f} ms after its process started" if age is not None else "",
    )
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()}\n")
        tmp.replace(ready_file)
    # The first load would import the runtimes (ONNX Runtime: ~30 ms here); after a restart the
    # front takes longer than that to reconnect, so import them now, beside it.
    threading.Thread(target=_import_runtimes, name="worker-imports", daemon=True).start()
    async with server:
        await stop.wait()
    worker.pool.shutdown(wait=False, cancel_futures=True)
