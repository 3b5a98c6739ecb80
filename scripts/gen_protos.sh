#!/usr/bin/env bash
# Regenerate the committed gRPC/protobuf Python code from the .proto files.
# Needs the dev extras (grpcio-tools, mypy-protobuf): pip install -e '.[dev]'.
# Run from anywhere; output lands next to each .proto.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
bin_dir="$(dirname "$python")"
cd "$repo/src"

for proto in blockyard/server/proto/volume_server.proto blockyard/master/proto/master.proto blockyard/csi/proto/csi.proto; do
  # -I src makes the generated imports package-qualified (from blockyard.server.proto import ...);
  # grpc_tools adds its bundled include directory for the google/protobuf/*.proto imports.
  "$python" -m grpc_tools.protoc -I . \
    --python_out=. --pyi_out=. --grpc_python_out=. \
    --plugin=protoc-gen-mypy_grpc="$bin_dir/protoc-gen-mypy_grpc" --mypy_grpc_out=. \
    "$proto"
done
