#!/usr/bin/env bash
# Build libmq_scan_ort.so (and the libmq_scan_cpu.so it links) into OUT_DIR (default: build/ort).
#   plugins/selective_scan/ort/build.sh ORT_INCLUDE_DIR [OUT_DIR]
# ORT_INCLUDE_DIR: a folder holding onnxruntime_c_api.h and the headers it includes (see README.md).
set -euo pipefail
if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 ORT_INCLUDE_DIR [OUT_DIR]" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../../.." && pwd)"
inc="$(cd "$1" && pwd)"
out="${2:-$repo/build/ort}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
if [[ ! -f "$inc/onnxruntime_c_api.h" ]]; then
  echo "$inc has no onnxruntime_c_api.h" >&2
  exit 2
fi
cmake -S "$here" -B "$out/cmake" -DCMAKE_BUILD_TYPE=Release -DONNXRUNTIME_INCLUDE_DIR="$inc" \
      -DMQ_SCAN_OUTPUT_DIR="$out"
cmake --build "$out/cmake" --parallel "$(nproc 2>/dev/null || echo 2)" --target mq_scan_ort
echo "built $out/libmq_scan_ort.so"
