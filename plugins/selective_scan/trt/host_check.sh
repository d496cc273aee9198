#!/usr/bin/env bash
# Build and run tests/plugin_host_test.cpp and tests/ssd_plugin_host_test.cpp: each plugin driven as TensorRT
# drives it, with the CUDA
# entry points replaced by the CPU scan, against TensorRT's headers only (no libnvinfer, no GPU).
#
#   plugins/selective_scan/trt/host_check.sh TENSORRT_INCLUDE_DIR [CUDA_INCLUDE_DIR]
set -euo pipefail
if [[ $# -lt 1 || ! -f "$1/NvInferRuntime.h" ]]; then
  echo "usage: $0 TENSORRT_INCLUDE_DIR [CUDA_INCLUDE_DIR]" >&2
  exit 2
fi
TRT_INC=$1
CUDA_INC=${2:-${CUDA_HOME:-/usr/local/cuda}/include}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SRC=$HERE/../src
CXX=${CXX:-g++}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
# one program per plugin; each links the whole plugin library (both plugins) and the CPU kernels
for test in plugin_host_test ssd_plugin_host_test; do
  set -x
  "$CXX" -std=c++17 -O1 -g -Wall -Wextra -Werror -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -I "$HERE" -I "$HERE/../include" -I "$SRC" -isystem "$TRT_INC" -isystem "$CUDA_INC" \
    "$HERE/tests/$test.cpp" "$HERE/selective_scan_plugin.cpp" "$HERE/ssd_scan_plugin.cpp" \
    "$SRC/scan_cpu.cpp" "$SRC/scan_common.cpp" "$SRC/ssd_cpu.cpp" "$SRC/ssd_common.cpp" \
    -pthread -o "$OUT/$test"
  set +x
  "$OUT/$test"
done
