#!/usr/bin/env bash
# Regenerate lmlink/v1/*_pb2*.py from proto/. Output lands inside the package
# (lmlink/v1/), so generated imports (`from lmlink.v1 import ...`) resolve.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
"${PYTHON:-python3}" -m grpc_tools.protoc -I proto --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" proto/lmlink/v1/*.proto
