"""Model replicas placed by Ray (runtimes/ray_runtime.py) on a real local cluster of two
nodes (bench/ray_cluster.py): the same answers as local ONNX Runtime, no acknowledged
request lost when a replica dies, replacement, autoscaling, and ``bastion serve`` with a
placed model over REST. Skipped, with the reason printed, only where Ray cannot start."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import yaml

from bastion.bench.ray_cluster import RayCluster, ray_cluster, ray_unavailable
from bastion.core.errors import InvalidInput, Overloaded
from bastion.core.metadata import BatchingConfig, ModelConfig
from bastion.engine.batcher import Batcher
from bastion.engine.predict_pool import PredictPool
from bastion.observability.metrics import Metrics
from bastion.repository.config import ConfigError, load_model_config, parse_model_config
from bastion.runtimes import create_runtime
from bastion.runtimes.onnx_runtime import OnnxRuntime
from bastion.runtimes.ray_runtime import RayRuntime
from tests.runtimes.onnx_models import affine_model
from tests.serverproc import ServerProcess

CLUSTER_CPUS = 2.0  # two nodes, one CPU each


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    reason = ray_unavailable()
    if reason:
        print(f"SKIP: {reason}")
        pytest.skip(reason)
    with contextlib.ExitStack() as stack:
        try:
            c = stack.enter_context(ray_cluster(nodes=2, num_cpus=1))
        except Exception as exc:  # Ray could not start here: say why, never pass silently
            print(f"SKIP: a local Ray cluster did not start: {exc}")
            pytest.skip(f"a local Ray cluster did not start: {str(exc)[:500]}")
        print(f"ray cluster of 2 nodes alive in {c.start_s:.1f} s at {c.address}")
        yield c
        import ray

        if ray.is_initialized():  # this process's connection (made by the first placed model)
            ray.shutdown()


def _repo(tmp_path: Path, placement: dict[str, Any], **extra: Any) -> Path:
    model_dir = tmp_path / "affine"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(affine_model())
    config = {"runtime": "onnx", "max_batch_size": 64, "placement": {"engine": "ray", **placement}, **extra}
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return model_dir


def _local(model_dir: Path) -> OnnxRuntime:
    return OnnxRuntime(ModelConfig(name="affine", runtime="onnx", max_batch_size=64), model_dir / "1")


def _wait(what: str, cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:g} s"
        time.sleep(0.1)


async def _await(what: str, cond: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what} not within {timeout_s:g} s"
        await asyncio.sleep(0.1)


def _kill_and_wait(actor: Any) -> None:
    """``ray.kill`` lands asynchronously: until it has, a call may still be answered."""
    import ray
    import ray.exceptions

    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=5)
        except ray.exceptions.RayActorError:
            return
        time.sleep(0.05)
    raise AssertionError("the killed replica still answers")


def _cluster_idle() -> bool:
    import ray

    return ray.available_resources().get("CPU", 0.0) >= CLUSTER_CPUS


@contextlib.contextmanager
def _closing(runtime: RayRuntime) -> Iterator[RayRuntime]:
    try:
        yield runtime
    finally:
        runtime.close()
        _wait("the replicas' CPUs released", _cluster_idle, 30)  # the next test gets the whole cluster


async def _load(model_dir: Path) -> RayRuntime:
    runtime = await asyncio.to_thread(create_runtime, load_model_config(model_dir), model_dir / "1")
    assert isinstance(runtime, RayRuntime)
    return runtime


def _batcher(runtime: RayRuntime, pool: PredictPool, instance_count: int) -> Batcher:
    return Batcher(runtime, pool, max_batch_size=64, batching=BatchingConfig(), instance_count=instance_count)


async def _client(batcher: Batcher, local: OnnxRuntime, seed: int, stop: asyncio.Event,
                  tally: dict[str, int], jitter_s: float = 0.0) -> None:
    """Sends rows of its own until ``stop``; every answer must be this request's own, and a 503
    is repeated as a client would (after a short pause). ``jitter_s``: a random pause before
    each request, so that clients' requests arrive apart (as independent users' do) instead of
    in step, when the batcher would merge them all into one batch."""
    rng = np.random.default_rng(seed)
    while not stop.is_set():
        if jitter_s:
            await asyncio.sleep(float(rng.uniform(0, jitter_s)))
        x = rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32)
        while True:
            try:
                out = await batcher.submit({"x": x}, len(x))
            except Overloaded:
                tally["503"] += 1
                await asyncio.sleep(0.05)
                continue
            break
        want = local.predict({"x": x})
        assert np.array_equal(out["y"], want["y"]) and np.array_equal(out["z"], want["z"])
        tally["ok"] += 1


def test_two_replicas_on_two_nodes_answer_like_local_onnx_runtime(cluster: RayCluster, tmp_path: Path) -> None:
    model_dir = _repo(tmp_path, {"replicas": 2, "num_cpus": 1, "address": cluster.address})
    local = _local(model_dir)
    metrics = Metrics()

    async def main() -> None:
        with _closing(await _load(model_dir)) as runtime:
            assert runtime.replicas_alive == 2
            assert len(runtime.nodes) == 2, f"both replicas on one node: {runtime.nodes}"
            assert runtime.platform == "ray/onnxruntime_onnx"
            assert [(s.name, s.datatype, s.shape) for s in runtime.outputs] == [
                (s.name, s.datatype, s.shape) for s in local.outputs]
            rng = np.random.default_rng(1)
            for rows in (1, 3, 64):
                x = rng.standard_normal((rows, 4)).astype(np.float32)
                got, want = await runtime.apredict({"x": x}), local.predict({"x": x})
                assert got.keys() == want.keys()
                for name in want:
                    assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name])
            # a bad input is the client's 400, raised by the model in the replica, never retried
            with pytest.raises(InvalidInput, match=r"dimensions|shape"):
                await runtime.apredict({"x": np.ones((2, 3), np.float32)})
            assert runtime.retries == 0 and runtime.replicas_alive == 2
            # both replicas take batches: concurrent batches go to the least loaded one
            x = np.ones((1, 4), np.float32)
            await asyncio.gather(*(runtime.apredict({"x": x}) for _ in range(8)))
            t0 = time.perf_counter()
            for _ in range(100):
                await runtime.apredict({"x": x})
            hop = (time.perf_counter() - t0) / 100
            t0 = time.perf_counter()
            for _ in range(100):
                local.predict({"x": x})
            alone = (time.perf_counter() - t0) / 100
            print(f"one batch, awaited one at a time: {hop * 1e6:.0f} µs via Ray, {alone * 1e6:.0f} µs local ORT")
            text = metrics.render().decode()
            assert 'bastion_ray_replicas{model="affine"} 2.0' in text
            assert 'bastion_ray_retries_total{model="affine"} 0.0' in text

    asyncio.run(main())


def test_killing_a_replica_mid_load_loses_no_acknowledged_request(cluster: RayCluster, tmp_path: Path) -> None:
    model_dir = _repo(tmp_path, {"replicas": 2, "num_cpus": 1, "address": cluster.address, "timeout_s": 10})
    local = _local(model_dir)
    pool = PredictPool(1)

    async def main() -> None:
        with _closing(await _load(model_dir)) as runtime:
            batcher = _batcher(runtime, pool, 8)
            stop = asyncio.Event()
            tally = {"ok": 0, "503": 0}
            clients = [asyncio.ensure_future(_client(batcher, local, seed, stop, tally)) for seed in range(8)]
            await _await("answers before the kill", lambda: tally["ok"] >= 50, 30)
            victim = runtime._live[0]
            await asyncio.to_thread(_kill_and_wait, victim.actor)  # the load goes on meanwhile
            answered = tally["ok"]
            await _await("answers after the kill", lambda: tally["ok"] >= answered + 200, 30)
            # the killed replica is dropped and a new one takes its place (on the CPU it freed)
            await _await("the replica replaced", lambda: runtime.replaced >= 1 and runtime.replicas_alive == 2, 60)
            assert victim not in runtime._live
            stop.set()
            # no request hangs: every client finishes its last request promptly
            await asyncio.wait_for(asyncio.gather(*clients), 20)
            assert runtime.retries >= 1, "no batch was retried on the other replica"
            # a live replica was left all along: each batch the dead one held was answered by it
            assert tally["503"] == 0
            print(f"answered {tally['ok']}, 503 then repeated {tally['503']}, retried on the other replica "
                  f"{runtime.retries}, replaced {runtime.replaced}")
            await batcher.close()

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()


def test_no_live_replica_is_a_503_not_a_hang(cluster: RayCluster, tmp_path: Path) -> None:
    model_dir = _repo(tmp_path, {"replicas": 1, "num_cpus": 1, "address": cluster.address, "timeout_s": 10})

    async def main() -> None:
        with _closing(await _load(model_dir)) as runtime:
            _kill_and_wait(runtime._live[0].actor)
            t0 = time.perf_counter()
            with pytest.raises(Overloaded) as err:
                await asyncio.wait_for(runtime.apredict({"x": np.ones((1, 4), np.float32)}), 15)
            assert err.value.http_status == 503 and err.value.retry_after_s == 1
            assert time.perf_counter() - t0 < 10
            # then the replacement serves again
            await _await("the replica replaced", lambda: runtime.replicas_alive == 1, 60)
            out = await runtime.apredict({"x": np.ones((1, 4), np.float32)})
            assert out["y"].tolist() == [[3.0, 3.0, 3.0, 3.0]]

    asyncio.run(main())


def test_autoscaling_adds_a_replica_under_load_and_retires_it_after(cluster: RayCluster, tmp_path: Path) -> None:
    model_dir = _repo(tmp_path, {
        "num_cpus": 1, "address": cluster.address,
        "autoscale": {"min_replicas": 1, "max_replicas": 2, "target_queue_per_replica": 1,
                      "upscale_delay_s": 0.5, "downscale_delay_s": 2, "request_resources": True},
    })
    assert load_model_config(model_dir).instance_count == 8  # 4 batches in flight per replica at most
    local = _local(model_dir)
    pool = PredictPool(1)
    # the runtime's own log lines (a handler on its logger: other tests may stop propagation)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("bastion.runtimes.ray")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)

    async def main() -> None:
        with _closing(await _load(model_dir)) as runtime:
            assert runtime.replicas_alive == 1
            batcher = _batcher(runtime, pool, 8)
            stop = asyncio.Event()
            tally = {"ok": 0, "503": 0}
            clients = [asyncio.ensure_future(_client(batcher, local, seed, stop, tally, jitter_s=0.004))
                       for seed in range(8)]
            await _await("a second replica under load", lambda: runtime.replicas_alive == 2, 45)
            assert len(runtime.nodes) == 2
            answered = tally["ok"]
            await _await("answers by both", lambda: tally["ok"] >= answered + 100, 30)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*clients), 20)
            assert tally["503"] == 0
            # idle: back to min_replicas once downscale_delay_s has passed
            await _await("back to one replica", lambda: runtime.replicas_alive == 1, 20)
            await _await("the retired replica killed", lambda: not runtime._retiring, 10)
            out = await batcher.submit({"x": np.zeros((1, 4), np.float32)}, 1)
            assert out["y"].tolist() == [[1.0, 1.0, 1.0, 1.0]]
            await batcher.close()

    try:
        asyncio.run(main())
    finally:
        pool.shutdown()
        logger.removeHandler(handler)
        logger.setLevel(level)
    scaled = [r.getMessage() for r in records]
    assert scaled.count("model replicas rescaled") == 2, scaled  # up, then down
    assert "request_resources failed" not in scaled  # asked Ray's autoscaler for the target's CPUs


def test_bastion_serve_answers_over_rest_from_replicas_on_ray(
    cluster: RayCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    repo = tmp_path / "repo"
    model_dir = _repo(repo, {"replicas": 2, "num_cpus": 1})  # no address: RAY_ADDRESS
    local = _local(model_dir)
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    with ServerProcess(repo, "--open-metrics", "--poll-interval", "0", "--grpc-port", "-1") as server:
        x = np.random.default_rng(2).standard_normal((5, 4)).astype(np.float32)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [5, 4], "data": x.ravel().tolist()}]}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            meta = client.get("/v2/models/affine").json()
            assert meta["platform"] == "ray/onnxruntime_onnx", meta
            reply = client.post("/v2/models/affine/infer", json=body)
            assert reply.status_code == 200, reply.text
            outputs = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"])
                       for o in reply.json()["outputs"]}
            want = local.predict({"x": x})
            assert np.array_equal(outputs["y"], want["y"]) and np.array_equal(outputs["z"], want["z"])
            _wait("the metrics flushed", lambda: 'bastion_ray_replicas{model="affine"} 2.0'
                  in client.get("/metrics").text, 10)
        assert ray.available_resources().get("CPU", 0.0) < CLUSTER_CPUS  # the server's replicas hold them
    # the server's exit kills its replicas (unload, and Ray's fate sharing with their owner)
    _wait("the server's replicas gone", _cluster_idle, 30)


@pytest.mark.parametrize(("placement", "extra", "field"), [
    ({"engine": "kubernetes"}, {}, "placement.engine: expected one of ray"),
    ({"replicas": 2}, {}, "placement.engine: required"),
    ({"engine": "ray", "replicas": 0}, {}, "placement.replicas: expected an integer from 1 to 64"),
    ({"engine": "ray", "replicas": 65}, {}, "placement.replicas: expected an integer from 1 to 64"),
    ({"engine": "ray", "replicas": "2"}, {}, "placement.replicas: expected an integer"),
    ({"engine": "ray", "num_cpus": -1}, {}, "placement.num_cpus: expected a number >= 0"),
    ({"engine": "ray", "num_gpus": True}, {}, "placement.num_gpus: expected a number"),
    ({"engine": "ray", "address": ""}, {}, "placement.address: expected a Ray address"),
    ({"engine": "ray", "timeout_s": 0}, {}, "placement.timeout_s: expected a number > 0"),
    ({"engine": "ray", "replica": 2}, {}, "placement.replica: unknown key; did you mean 'replicas'?"),
    ({"engine": "ray", "autoscale": {"max_replicas": 2}}, {}, "placement.autoscale.min_replicas: required"),
    ({"engine": "ray", "autoscale": {"min_replicas": 3, "max_replicas": 2}}, {},
     "placement.autoscale.max_replicas: expected an integer from 3 to 64"),
    ({"engine": "ray", "replicas": 4, "autoscale": {"min_replicas": 1, "max_replicas": 2}}, {},
     "placement.replicas: expected an integer from 1 to 2"),
    ({"engine": "ray", "autoscale": {"min_replicas": 1, "max_replicas": 2, "target_queue_per_replica": 0}}, {},
     "placement.autoscale.target_queue_per_replica: expected a number > 0"),
    ({"engine": "ray", "replicas": 4}, {"instance_count": 2}, "instance_count: 2 batches in flight cannot keep 4"),
    ({"engine": "ray"}, {"runtime": "skops"}, "placement: only ONNX models"),
    ({"engine": "ray"}, {"confidential": True}, "placement: a confidential model is served by the trusted worker"),
])
def test_bad_placement_config_is_rejected_with_the_field_named(
    placement: dict[str, Any], extra: dict[str, Any], field: str
) -> None:
    data = {"runtime": "onnx", "placement": placement, **extra}
    with pytest.raises(ConfigError) as err:
        parse_model_config("affine", data)
    assert err.value.message.startswith("affine/config.yaml: ")
    assert field in err.value.message


def test_placement_defaults() -> None:
    config = parse_model_config("affine", {"runtime": "onnx", "max_batch_size": 8,
                                           "placement": {"engine": "ray", "replicas": 3}})
    spec = config.placement
    assert (spec.replicas, spec.num_cpus, spec.num_gpus, spec.address, spec.autoscale) == (3, 1.0, 0.0, None, None)
    assert config.instance_count == 12  # 4 batches in flight per replica
    auto = parse_model_config("affine", {"runtime": "onnx", "placement": {
        "engine": "ray", "autoscale": {"min_replicas": 2, "max_replicas": 5}}}).placement
    assert auto.replicas == 2 and auto.max_replicas == 5
    plain = parse_model_config("affine", {"runtime": "onnx"})
    assert "placement" not in plain.parameters and plain.instance_count == 1
