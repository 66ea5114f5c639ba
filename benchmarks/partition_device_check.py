"""Device check for partitioned inference (issue 16): the head on the CPU in a separate
worker process, the tail on the GPU, same answers as the whole model, latency per part.

Written for the GPU machine a session is sometimes lent (see docs/CONFIDENTIAL-RESULTS.md).
That machine has onnx, onnxruntime (a CPU build) and a CUDA PyTorch, and nothing can be
installed there from the network, so the script needs only those and Bastion's ONNX graph
surgery (``PYTHONPATH=src``); it does not start the whole server, whose dependencies are not
there. The tail runs on, in order of preference:

1. ONNX Runtime's CUDAExecutionProvider (what ``bastion serve`` uses for a tail when the
   installed ONNX Runtime has it: ``runtimes/worker_runtime.tail_providers``);
2. PyTorch on CUDA, the tail converted with onnx2torch (carry its wheel) — the same
   arithmetic on the same device when only a CPU ONNX Runtime is installed;
3. the CPU, only with ``--allow-cpu`` (a dry run on a machine without a GPU; the test suite
   runs it that way so the script cannot rot).

The head's process stands in for the trusted worker: arrays cross a pipe as they cross the
worker's channel (without its encryption, measured separately in BENCHMARKS.md).

    PYTHONPATH=src python3 benchmarks/partition_device_check.py --model M.onnx --cut 2 \\
        [--data eval.npz] --out result.json

Exit status 0 when the partitioned answers match the whole model's (every label equal, max
|diff| within --tolerance), 1 when they do not, 2 when no GPU path is available (and no
--allow-cpu).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from bastion.confidential.partition.graph import resolve_cut, split_model


def _ort_session(model: onnx.ModelProto, providers: list[Any]) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=providers)


def _worker(conn: Connection, head_bytes: bytes) -> None:
    """The stand-in trusted worker: the head on the CPU, one request at a time."""
    head = _ort_session(onnx.load_from_string(head_bytes), ["CPUExecutionProvider"])
    names = [o.name for o in head.get_outputs()]
    feed_name = head.get_inputs()[0].name
    while True:
        x = conn.recv()
        if x is None:
            return
        conn.send(dict(zip(names, head.run(names, {feed_name: x}), strict=True)))


class Tail:
    """The tail on the best device available; ``run`` takes and returns host arrays (the
    copies to and from the device are part of the tail's latency, as when serving)."""

    def __init__(self, tail: onnx.ModelProto, allow_cpu: bool) -> None:
        import onnxruntime as ort

        self.input_names = [i.name for i in tail.graph.input]
        self.output_names = [o.name for o in tail.graph.output]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            # TF32 off: the check compares against the CPU's float32 arithmetic
            self._sess = _ort_session(tail, [("CUDAExecutionProvider", {"use_tf32": 0}), "CPUExecutionProvider"])
            self.device = "onnxruntime CUDAExecutionProvider"
            self.run = self._run_ort
            return
        torch = _cuda_torch()
        if torch is not None:
            try:
                from onnx2torch import convert
            except ImportError:
                convert = None
            if convert is not None:
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                self._torch = torch
                self._module = convert(tail).eval().to("cuda")
                self.device = f"torch CUDA ({torch.cuda.get_device_name(0)}), tail via onnx2torch"
                self.run = self._run_torch
                return
        if not allow_cpu:
            raise SystemExit(2)
        self._sess = _ort_session(tail, ["CPUExecutionProvider"])
        self.device = "CPU (--allow-cpu dry run: no GPU path here)"
        self.run = self._run_ort

    def _run_ort(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        got = self._sess.run(self.output_names, {n: features[n] for n in self.input_names})
        return dict(zip(self.output_names, got, strict=True))

    def _run_torch(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            args = [torch.from_numpy(features[n]).to("cuda") for n in self.input_names]
            out = self._module(*args)
            outs = out if isinstance(out, (tuple, list)) else [out]
            host = [o.detach().to("cpu").numpy() for o in outs]  # the copy back synchronises
        return dict(zip(self.output_names, host, strict=True))


def _cuda_torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _median_ms(fn: Any, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _inputs(model: onnx.ModelProto, data: str | None, input_name: str | None, rows: int, seed: int) -> np.ndarray:
    if data:
        with np.load(data) as arrays:
            name = input_name or model.graph.input[0].name
            if name not in arrays:
                raise SystemExit(f"{data} holds {', '.join(arrays.files)}; no array {name!r} (--input)")
            return np.ascontiguousarray(arrays[name][:rows], dtype=np.float32)
    dims = [d.dim_value or 1 for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return np.random.default_rng(seed).random((rows, *dims), dtype=np.float32)


def check(model_path: str, cut: str, *, data: str | None = None, input_name: str | None = None, rows: int = 256,
          repeats: int = 30, tolerance: float = 1e-3, allow_cpu: bool = False, seed: int = 0) -> dict[str, Any]:
    model = onnx.load(model_path)
    chosen = resolve_cut(model, int(cut) if cut.isdigit() else cut)
    head, tail_model = split_model(model, chosen)
    x = _inputs(model, data, input_name, rows, seed)
    whole = _ort_session(model, ["CPUExecutionProvider"])
    out_names = [o.name for o in whole.get_outputs()]
    feed = whole.get_inputs()[0].name
    want = dict(zip(out_names, whole.run(out_names, {feed: x}), strict=True))
    try:
        tail = Tail(tail_model, allow_cpu)
    except SystemExit:
        return {"ok": False, "status": 2, "reason": "no GPU path: ONNX Runtime has no CUDAExecutionProvider and "
                                                     "PyTorch has no CUDA device (or onnx2torch is missing)"}
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, head.SerializeToString()), daemon=True)
    proc.start()
    try:
        def head_call(batch: np.ndarray) -> dict[str, np.ndarray]:
            parent.send(batch)
            return parent.recv()

        features = head_call(x)
        got = tail.run(features)
        diffs = {n: float(np.max(np.abs(got[n].astype(np.float64) - want[n].astype(np.float64)))) for n in got}
        label_out = out_names[-1]
        agree = (float(np.mean(np.argmax(got[label_out].reshape(rows, -1), 1)
                               == np.argmax(want[label_out].reshape(rows, -1), 1)))
                 if want[label_out].ndim >= 2 and want[label_out].shape[-1] > 1 else
                 float(np.mean(np.round(got[label_out]) == np.round(want[label_out]))))
        latency = {}
        for b in (1, 64):
            xb = x[: min(b, rows)]
            fb = head_call(xb)
            latency[f"batch{b}"] = {
                "head_in_worker_ms": _median_ms(lambda xb=xb: head_call(xb), repeats),
                "tail_ms": _median_ms(lambda fb=fb: tail.run(fb), repeats),
                "whole_on_cpu_ms": _median_ms(lambda xb=xb: whole.run(out_names, {feed: xb}), repeats),
            }
    finally:
        parent.send(None)
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
    ok = agree == 1.0 and max(diffs.values()) <= tolerance
    return {"ok": ok, "status": 0 if ok else 1, "model": Path(model_path).name, "cut": chosen.to_dict(),
            "tail_device": tail.device, "rows": rows, "max_abs_diff": diffs, "label_agreement": agree,
            "tolerance": tolerance, "latency_ms": latency, "host": platform.node(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--cut", required=True, help="cut index K (bastion partition list) or tensor name")
    ap.add_argument("--data", default=None, help="npz with the inputs (default: uniform random rows)")
    ap.add_argument("--input", default=None, help="array name in --data (default: the model's input name)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tolerance", type=float, default=1e-3)
    ap.add_argument("--allow-cpu", action="store_true", help="run the tail on the CPU when no GPU path exists")
    ap.add_argument("--out", default=None, help="write the result as JSON here too")
    args = ap.parse_args()
    result = check(args.model, args.cut, data=args.data, input_name=args.input, rows=args.rows,
                   repeats=args.repeats, tolerance=args.tolerance, allow_cpu=args.allow_cpu)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    raise SystemExit(result["status"])


if __name__ == "__main__":
    main()
