"""The repository against real files and real ONNX runtimes, driven by explicit poll_once calls."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from bastion.core.errors import ModelNotReady, NotFound
from bastion.core.metadata import ModelConfig
from bastion.repository.store import LoadedVersion, ModelRepository, ModelState
from bastion.runtimes import create_runtime
from bastion.runtimes.base import Runtime
from tests.polling import async_wait_until
from tests.runtimes.onnx_models import affine_model, write_model

X = np.zeros((1, 4), np.float32)


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, int]] = []
        self.live: dict[tuple[str, int], LoadedVersion] = {}

    def version_loaded(self, loaded: LoadedVersion) -> None:
        self.events.append(("loaded", loaded.model, loaded.version))
        self.live[(loaded.model, loaded.version)] = loaded

    def version_unloaded(self, loaded: LoadedVersion) -> None:
        self.events.append(("unloaded", loaded.model, loaded.version))
        if self.live.get((loaded.model, loaded.version)) is loaded:
            del self.live[(loaded.model, loaded.version)]

    def take(self) -> list[tuple[str, str, int]]:
        events, self.events = self.events, []
        return events


class CountingFactory:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, config: ModelConfig, version_dir: Path) -> Runtime:
        self.calls += 1
        return create_runtime(config, version_dir)


def _offset(loaded: LoadedVersion) -> float:
    """Which model file is serving: the affine model's output at 0 is its offset."""
    return float(loaded.runtime.predict({"x": X})["y"][0, 0])


def _run(
    tmp_path: Path,
    body: Callable[[ModelRepository, Recorder], Awaitable[None]],
    **kwargs: Any,
) -> None:
    async def main() -> None:
        repo = ModelRepository(tmp_path, poll_interval_s=None, **kwargs)
        recorder = Recorder()
        repo.add_listener(recorder)
        await repo.start()
        try:
            await body(repo, recorder)
        finally:
            await repo.stop()

    asyncio.run(main())


def _config(**extra: Any) -> dict[str, Any]:
    return {"runtime": "onnx", "max_batch_size": 8, **extra}


def _touch_config(model_dir: Path, **changes: Any) -> None:
    path = model_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))


def test_initial_load(tmp_path: Path) -> None:
    write_model(tmp_path, "a", {1: affine_model(1.0)}, _config())
    write_model(tmp_path, "b", {1: affine_model(1.0), 2: affine_model(2.0)}, _config(version_policy="all"))
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / ".hidden").mkdir()
    seen: list[tuple[str, int, int]] = []

    async def main() -> None:
        repo = ModelRepository(tmp_path, poll_interval_s=None)
        recorder = Recorder()
        repo.add_listener(recorder)
        await repo.start(progress=lambda name, done, total: seen.append((name, done, total)))
        assert [s.name for s in repo.index()] == ["a", "b"]
        a = repo.get("a")
        assert a.state is ModelState.READY and a.reason == ""
        assert list(a.versions) == [1]
        # the effective config carries the signature the runtime found in the model
        assert a.config is not None and a.config.platform == "onnxruntime_onnx"
        assert [t.name for t in a.config.inputs] == ["x"]
        assert list(repo.get("b").versions) == [1, 2]
        assert sorted(recorder.take()) == [("loaded", "a", 1), ("loaded", "b", 1), ("loaded", "b", 2)]
        # a listener added later is told what is already loaded
        late = Recorder()
        repo.add_listener(late)
        assert len(late.events) == 3
        await repo.stop()
        assert sorted(recorder.take()) == [("unloaded", "a", 1), ("unloaded", "b", 1), ("unloaded", "b", 2)]
        assert repo.get("a").state is ModelState.UNAVAILABLE

    asyncio.run(main())
    assert sorted(seen) == [("a", 1, 2), ("b", 2, 2)] or sorted(seen) == [("a", 2, 2), ("b", 1, 2)]


def test_new_version_replaces_the_old_one(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "m", {1: affine_model(1.0)}, _config())

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        rec.take()
        old = repo.get("m").versions[1]
        write_model(tmp_path, "m", {2: affine_model(2.0)}, _config())
        await repo.poll_once()
        assert rec.take() == [("loaded", "m", 2), ("unloaded", "m", 1)]
        status = repo.get("m")
        assert list(status.versions) == [2] and _offset(status.versions[2]) == 2.0
        with pytest.raises(ModelNotReady):  # the replaced runtime was closed
            old.runtime.predict({"x": X})
        # removing the newest version falls back to the one that is left
        shutil.rmtree(model_dir / "2")
        await repo.poll_once()
        assert rec.take() == [("loaded", "m", 1), ("unloaded", "m", 2)]

    _run(tmp_path, body)


def test_removed_version_and_unchanged_polls(tmp_path: Path) -> None:
    model_dir = write_model(
        tmp_path, "m", {1: affine_model(1.0), 2: affine_model(2.0)}, _config(version_policy={"latest": 2})
    )
    factory = CountingFactory()

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        rec.take()
        assert factory.calls == 2
        for _ in range(3):  # nothing changed: nothing is re-read or reloaded
            await repo.poll_once()
        assert factory.calls == 2 and rec.take() == []
        shutil.rmtree(model_dir / "2")
        await repo.poll_once()
        assert rec.take() == [("unloaded", "m", 2)]
        assert list(repo.get("m").versions) == [1]
        # a file rewritten in place reloads that version, new before old is closed
        (model_dir / "1" / "model.onnx").write_bytes(affine_model(5.0))
        await repo.poll_once()
        assert rec.take() == [("unloaded", "m", 1), ("loaded", "m", 1)]
        assert _offset(rec.live[("m", 1)]) == 5.0

    _run(tmp_path, body, runtime_factory=factory)


def test_broken_model_fails_alone_and_recovers(tmp_path: Path) -> None:
    write_model(tmp_path, "good", {1: affine_model()}, _config())
    broken = write_model(tmp_path, "broken", {1: b"not an onnx file"}, _config())

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        status = repo.get("broken")
        assert status.state is ModelState.FAILED and not status.versions
        assert "version 1 failed to load" in status.reason and "ONNX Runtime cannot load" in status.reason
        assert repo.get("good").state is ModelState.READY
        rec.take()
        await repo.poll_once()  # an unchanged failure is not retried every poll
        assert rec.take() == []
        (broken / "1" / "model.onnx").write_bytes(affine_model())
        await repo.poll_once()
        assert repo.get("broken").state is ModelState.READY and repo.get("broken").reason == ""
        assert rec.take() == [("loaded", "broken", 1)]

    _run(tmp_path, body)


def test_a_failing_new_version_leaves_the_old_one_serving(tmp_path: Path) -> None:
    write_model(tmp_path, "m", {1: affine_model(1.0)}, _config())

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        rec.take()
        write_model(tmp_path, "m", {2: b"garbage"}, _config())
        await repo.poll_once()
        status = repo.get("m")
        assert status.state is ModelState.READY and list(status.versions) == [1]
        assert "version 2 failed to load" in status.reason and "serving older version(s) 1" in status.reason
        assert rec.take() == []

    _run(tmp_path, body)


def test_a_version_that_fails_among_others(tmp_path: Path) -> None:
    write_model(tmp_path, "m", {1: affine_model(), 2: b"garbage", 3: affine_model()}, _config(version_policy="all"))

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        status = repo.get("m")
        assert status.state is ModelState.READY and list(status.versions) == [1, 3]
        assert status.reason.startswith("version 2 failed to load")

    _run(tmp_path, body)


def test_config_change_reloads_and_bad_config_keeps_serving(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "m", {1: affine_model()}, _config())

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        rec.take()
        before = repo.get("m").versions[1]
        _touch_config(model_dir, max_batch_size=16)
        await repo.poll_once()
        assert rec.take() == [("unloaded", "m", 1), ("loaded", "m", 1)]
        after = repo.get("m").versions[1]
        assert after is not before and after.config.max_batch_size == 16
        # an invalid config keeps the loaded versions serving, with the reason
        _touch_config(model_dir, max_batch=3)
        await repo.poll_once()
        status = repo.get("m")
        assert status.state is ModelState.READY and status.versions[1] is after
        assert "m/config.yaml: max_batch: unknown key" in status.reason
        assert rec.take() == []

    _run(tmp_path, body)


def test_unload_sticks_until_load(tmp_path: Path) -> None:
    write_model(tmp_path, "m", {1: affine_model()}, _config())

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        rec.take()
        await repo.unload("m")
        assert rec.take() == [("unloaded", "m", 1)]
        await repo.poll_once()
        await repo.poll_once()
        status = repo.get("m")
        assert status.state is ModelState.UNAVAILABLE and not status.versions and rec.take() == []
        status = await repo.load("m")
        assert status.state is ModelState.READY and rec.take() == [("loaded", "m", 1)]
        with pytest.raises(NotFound):
            await repo.load("nope")
        with pytest.raises(NotFound):
            await repo.load("../m")
        with pytest.raises(NotFound):
            await repo.unload("nope")
        with pytest.raises(NotFound):
            repo.get("nope")

    _run(tmp_path, body)


def test_models_appear_and_disappear(tmp_path: Path) -> None:
    write_model(tmp_path, "a", {1: affine_model()}, _config())

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        rec.take()
        write_model(tmp_path, "b", {1: affine_model()}, _config())
        await repo.poll_once()
        assert rec.take() == [("loaded", "b", 1)]
        shutil.rmtree(tmp_path / "a")
        await repo.poll_once()
        assert rec.take() == [("unloaded", "a", 1)]
        assert [s.name for s in repo.index()] == ["b"]
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "config.yaml").write_text("runtime: onnx\n")
        await repo.poll_once()
        assert repo.get("empty").state is ModelState.FAILED
        assert "no version directories" in repo.get("empty").reason

    _run(tmp_path, body)


def test_explicit_mode(tmp_path: Path) -> None:
    write_model(tmp_path, "a", {1: affine_model()}, _config())
    write_model(tmp_path, "b", {1: affine_model()}, _config())

    async def body(repo: ModelRepository, rec: Recorder) -> None:
        assert rec.take() == [("loaded", "a", 1)]
        assert repo.get("b").state is ModelState.UNAVAILABLE and "explicit" in repo.get("b").reason
        write_model(tmp_path, "c", {1: affine_model()}, _config())
        await repo.poll_once()
        assert repo.get("c").state is ModelState.UNAVAILABLE and rec.take() == []
        await repo.load("c")
        assert rec.take() == [("loaded", "c", 1)]

    _run(tmp_path, body, explicit=True, initial_models=["a"])

    async def unknown_initial() -> None:
        with pytest.raises(NotFound, match="zzz"):
            await ModelRepository(tmp_path, poll_interval_s=None, initial_models=["zzz"]).start()

    asyncio.run(unknown_initial())


def test_the_poller_runs_and_survives_errors(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_model(tmp_path, "m", {1: affine_model()}, _config())
    calls = {"n": 0}

    def flaky(config: ModelConfig, version_dir: Path) -> Runtime:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return create_runtime(config, version_dir)

    async def main() -> None:
        repo = ModelRepository(tmp_path, poll_interval_s=0.01, runtime_factory=flaky)
        rec = Recorder()
        repo.add_listener(rec)
        await repo.start()
        write_model(tmp_path, "n", {1: affine_model()}, _config())
        await async_wait_until(
            lambda: "n" in [s.name for s in repo.index()] and repo.get("n").state is ModelState.FAILED,
            30, 0.01, what="the poller to find n and fail to load it",
        )
        assert "boom" in repo.get("n").reason
        (tmp_path / "n" / "1" / "model.onnx").write_bytes(affine_model(3.0))
        await async_wait_until(lambda: repo.get("n").state is ModelState.READY, 30, 0.01,
                               what="the poller to load the fixed n")
        assert repo.get("n").state is ModelState.READY
        await repo.stop()

    asyncio.run(main())


def test_runtime_is_closed_only_after_listeners_drain(tmp_path: Path) -> None:
    model_dir = write_model(tmp_path, "m", {1: affine_model(1.0)}, _config())

    class Draining(Recorder):
        def __init__(self) -> None:
            super().__init__()
            self.drained: asyncio.Future[None] | None = None

        def version_unloaded(self, loaded: LoadedVersion) -> asyncio.Future[None]:
            super().version_unloaded(loaded)
            self.drained = asyncio.get_running_loop().create_future()
            return self.drained

    async def main() -> None:
        repo = ModelRepository(tmp_path, poll_interval_s=None)
        listener = Draining()
        repo.add_listener(listener)
        await repo.start()
        old = repo.get("m").versions[1]
        (model_dir / "1" / "model.onnx").write_bytes(affine_model(2.0))
        await repo.poll_once()
        assert _offset(repo.get("m").versions[1]) == 2.0
        assert _offset(old) == 1.0  # queued work on the old version still runs
        assert listener.drained is not None
        listener.drained.set_result(None)

        def closed() -> bool:
            try:
                old.runtime.predict({"x": X})
            except ModelNotReady:
                return True
            return False

        await async_wait_until(closed, 10, 0.001, what="the drained version's runtime to be closed")
        with pytest.raises(ModelNotReady):
            old.runtime.predict({"x": X})
        stopping = asyncio.ensure_future(repo.stop())
        await asyncio.sleep(0.01)
        assert not stopping.done()  # stop() waits for the drain of the last version too
        listener.drained.set_result(None)
        await stopping

    asyncio.run(main())
