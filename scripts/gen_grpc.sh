#!/usr/bin/env bash
# Regenerate the Python stubs of the Open Inference Protocol gRPC service from
# src/bastion/protocol/grpc_v2/grpc_service.proto. The generated files are
# committed, so running Bastion never needs grpcio-tools; run this after any
# change to the .proto and commit the result.
#
#   scripts/gen_grpc.sh            (uses .venv/bin/python, else python3)
#   PYTHON=/path/to/python scripts/gen_grpc.sh
#
# Two fixes are applied to protoc's output (plus a `# ruff: noqa` on the .pyi):
#
# 1. protoc writes `import grpc_service_pb2` in the *_pb2_grpc.py module, which
#    only works when the folder itself is on sys.path; it is rewritten into a
#    package-relative import.
#
# 2. protoc registers the messages in protobuf's process-wide default
#    descriptor pool. tritonclient registers the very same names
#    (inference.ModelInferRequest, ...) in that pool from its own copy of the
#    protocol, and a pool refuses a second, different definition of a name, so
#    a process importing both (tests, the lab, the benchmarks) would fail at
#    import. Bastion's messages therefore live in a private pool; the wire
#    format does not depend on the pool, only on package, names and numbers.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg="src/bastion/protocol/grpc_v2"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then PYTHON="$root/.venv/bin/python"; else PYTHON=python3; fi
fi

cd "$root/$pkg"
"$PYTHON" -m grpc_tools.protoc \
    --proto_path=. \
    --python_out=. \
    --pyi_out=. \
    --grpc_python_out=. \
    grpc_service.proto

# 1. package-relative import in the service stubs
sed -i -E 's/^import grpc_service_pb2 as (.*)$/from . import grpc_service_pb2 as \1/' grpc_service_pb2_grpc.py

# 2. private descriptor pool (see above)
"$PYTHON" - grpc_service_pb2.py <<'EOF'
import sys

path = sys.argv[1]
text = open(path, encoding="utf-8").read()
old = "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile("
if text.count(old) != 1:
    sys.exit(f"gen_grpc.sh: expected one {old!r} in {path}; protoc's output changed, update the script")
new = (
    "# Bastion: a private pool, so tritonclient's copy of the same protocol can be imported too.\n"
    "POOL = _descriptor_pool.DescriptorPool()\n"
    "DESCRIPTOR = POOL.AddSerializedFile("
)
open(path, "w", encoding="utf-8").write(text.replace(old, new))
EOF

# pyproject's ruff exclude names the generated *.py files only; keep the stub
# file out of the lint as well (it is protoc's output, not ours to restyle).
sed -i '1i # ruff: noqa' grpc_service_pb2.pyi

# Fail loudly if either fix did not take.
grep -q '^from \. import grpc_service_pb2 as' grpc_service_pb2_grpc.py
if grep -q '^import grpc_service_pb2' grpc_service_pb2_grpc.py; then
    echo "gen_grpc.sh: absolute import left in grpc_service_pb2_grpc.py" >&2
    exit 1
fi
# The stubs import, and coexist with tritonclient's copy of the protocol when it is installed.
cd "$root"
PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" - <<'EOF'
import importlib.util

import bastion.protocol.grpc_v2.grpc_service_pb2_grpc  # noqa: F401

if importlib.util.find_spec("tritonclient") is not None:
    import tritonclient.grpc  # noqa: F401
EOF
echo "generated $pkg/grpc_service_pb2.py, grpc_service_pb2.pyi, grpc_service_pb2_grpc.py"
