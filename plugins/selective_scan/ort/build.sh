#!/usr/bin/env bash
# Build libmq_scan_ort.so (and the libmq_scan_cpu.so it links) into OUT_DIR (default: build/ort).
#   plugins/selective_scan/ort/build.sh [OUT_DIR]
# Needs no ONNX Runtime files. With ONNXRUNTIME_INCLUDE_DIR set to a folder holding the real
# onnxruntime_c_api.h, the build also checks mq_ort_api.h against it (target mq_ort_abi_check).
# `pip install` builds the same library into mq_deploy/_native/ (build_native.py); this script is for
# a build elsewhere.
set -euo pipefail
if [[ $# -gt 1 ]]; then
  echo "usage: $0 [OUT_DIR]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
out="${1:-$repo/build/ort}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cmake -S "$here" -B "$out/cmake" -DCMAKE_BUILD_TYPE=Release -DMQ_SCAN_OUTPUT_DIR="$out"
cmake --build "$out/cmake" --parallel "$(nproc 2>/dev/null || echo 2)" --target mq_scan_ort
echo "built $out/libmq_scan_ort.so"
