from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bastion.core.metadata import ModelConfig, TensorSpec
from bastion.runtimes import ModelLoadError, create_runtime

torch = pytest.importorskip("torch")  # the optional 'torch' extra

# torch >= 2.9 deprecates TorchScript; Bastion still serves existing TorchScript files.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

INPUTS = (TensorSpec("x", "FP32", (-1, 3)),)
OUTPUTS = (TensorSpec("y", "FP32", (-1, 2)), TensorSpec("top", "INT64", (-1,)))


class TwoHeads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x)
        return y, y.argmax(dim=1)


def _config(runtime: str = "torch", **kwargs: object) -> ModelConfig:
    return ModelConfig("t", runtime, INPUTS, OUTPUTS, max_batch_size=8, **kwargs)  # type: ignore[arg-type]


def _expected(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        y, top = TwoHeads()(torch.from_numpy(x.copy()))
    return y.numpy(), top.numpy()


def test_torchscript(tmp_path: Path) -> None:
    torch.jit.save(torch.jit.script(TwoHeads()), str(tmp_path / "model.pt"))
    runtime = create_runtime(_config("torchscript"), tmp_path)
    assert runtime.platform == "pytorch_libtorch"
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    x.flags.writeable = False  # as decoded straight from a request buffer
    out = runtime.predict({"x": x})
    y, top = _expected(x)
    np.testing.assert_allclose(out["y"], y, rtol=1e-6)
    np.testing.assert_array_equal(out["top"], top)


def test_torch_export(tmp_path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(TwoHeads(), (torch.zeros(2, 3),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    runtime = create_runtime(_config(), tmp_path)
    assert runtime.platform == "pytorch_export"
    x = np.ones((5, 3), np.float32)
    out = runtime.predict({"x": x})
    np.testing.assert_allclose(out["y"], _expected(x)[0], rtol=1e-6)


def test_needs_declared_signature_and_a_scripted_file(tmp_path: Path) -> None:
    torch.save(TwoHeads(), str(tmp_path / "model.pt"))  # a pickled module: never loaded
    with pytest.raises(ModelLoadError, match="declare inputs and outputs"):
        create_runtime(ModelConfig("t", "torch"), tmp_path)
    with pytest.raises(ModelLoadError, match=r"cannot load model\.pt as a TorchScript archive"):
        create_runtime(_config(), tmp_path)
