#!/usr/bin/env bash
# Compile the TensorRT plugins (SelectiveScan, SSDScan) to object files against a TensorRT include directory, without
# TensorRT libraries or a GPU: proves the plugin implements the IPluginV3 interfaces of those
# headers (every pure virtual overridden, signatures matching) and exports getCreators.
#
#   plugins/selective_scan/trt/compile_check.sh TENSORRT_INCLUDE_DIR [CUDA_INCLUDE_DIR]
#
# CUDA_INCLUDE_DIR (default $CUDA_HOME/include or /usr/local/cuda/include) only needs
# cuda_runtime_api.h, which NvInferRuntimeBase.h includes. CXX picks the compiler (default g++).
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1/NvInferRuntime.h" ]]; then
  echo "usage: $0 TENSORRT_INCLUDE_DIR [CUDA_INCLUDE_DIR]  (the directory holding NvInferRuntime.h)" >&2
  exit 2
fi
TRT_INC=$1
CUDA_INC=${2:-${CUDA_HOME:-/usr/local/cuda}/include}
if [[ ! -f "$CUDA_INC/cuda_runtime_api.h" ]]; then
  echo "error: $CUDA_INC/cuda_runtime_api.h not found; pass CUDA_INCLUDE_DIR as the second argument" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CXX=${CXX:-g++}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# -isystem: warnings inside TensorRT's headers (deprecations, unused parameters) are theirs, not ours.
for src in selective_scan_plugin ssd_scan_plugin; do
  set -x
  "$CXX" -std=c++17 -O2 -Wall -Wextra -Werror -fPIC -fvisibility=hidden \
    -I "$HERE" -I "$HERE/../include" -isystem "$TRT_INC" -isystem "$CUDA_INC" \
    -c "$HERE/$src.cpp" -o "$OUT/$src.o"
  set +x
done

missing=0
for sym in getCreators setLoggerFinder mq_scan_trt_register_creators; do
  if ! nm -g --defined-only "$OUT/selective_scan_plugin.o" | grep -qw "$sym"; then
    echo "error: $sym is not defined with external linkage in the object" >&2
    missing=1
  fi
done
# the SSDScan plugin's creator, which getCreators returns: defined in its object, used by the other
# (nm's output read whole first: grep -q closing the pipe early would fail it under pipefail)
ssd_syms=$(nm -C --defined-only "$OUT/ssd_scan_plugin.o")
if ! grep -q "T mq::trt::ssdScanCreator()" <<<"$ssd_syms"; then
  echo "error: mq::trt::ssdScanCreator() is not defined in ssd_scan_plugin.o" >&2
  missing=1
fi
[[ $missing -eq 0 ]] || exit 1
version=$(grep -hE '^#define (NV_TENSORRT|TRT)_(MAJOR|MINOR|PATCH)[A-Z_]* [0-9]+' "$TRT_INC/NvInferVersion.h" \
          | awk '{print $3}' | head -3 | paste -sd.)
echo "OK: selective_scan_plugin.cpp and ssd_scan_plugin.cpp compiled against TensorRT $version headers in $TRT_INC"
