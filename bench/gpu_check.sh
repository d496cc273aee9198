#!/usr/bin/env bash
# The GPU checks in one go, for the first time a task draws a GPU machine (budget: < 8 minutes on an H200):
#   1. build libmq_scan_cuda.so for this machine's GPU only (its compute capability; ~1 min),
#   2. run tests/gpu (the real CUDA kernels against selective_scan_int8_ref and ssd_scan_int8_ref),
#   3. run bench/scan_gpu.py (Mamba1: bandwidth against a device copy, int8 vs the fp16-input twin),
#   4. run bench/ssd_bench.py --gpu (Mamba2 at the mamba2-130m layer: chunked prefill with and without the
#      L-split, the decode step kernel, L steps in a row against one prefill),
#   5. write everything to one JSON file (default: $OUT/gpu_check.json when $OUT is set, else
#      build/gpu-check/gpu_check.json), also when a step fails: each step has its own status.
#
#   bench/gpu_check.sh [JSON_OUT]
#
# Each step runs under its own time limit (GPU_CHECK_BUILD_S, GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S,
# GPU_CHECK_SSD_S; defaults 240, 180, 120, 90 s); a run that passes takes well under 8 minutes (one architecture
# to build). Needs nvcc, cmake, and a torch with CUDA.
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo" || exit 1
work="$repo/build/gpu-check"
mkdir -p "$work"
json="${1:-${OUT:+$OUT/gpu_check.json}}"
json="${json:-$work/gpu_check.json}"
mkdir -p "$(dirname "$json")"
py="${PYTHON:-python}"
build_s="${GPU_CHECK_BUILD_S:-240}"
tests_s="${GPU_CHECK_TESTS_S:-180}"
bench_s="${GPU_CHECK_BENCH_S:-120}"
ssd_s="${GPU_CHECK_SSD_S:-90}"

now() { date +%s; }
start_all=$(now)

# ---- the GPU and its architecture -----------------------------------------------------------------
gpu="unknown"
arch=""
if command -v nvidia-smi >/dev/null 2>&1; then
    gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 | tr -d ' .')"
    [[ "$cap" =~ ^[0-9]+$ ]] && arch="$cap"
fi
echo "GPU: $gpu, architecture: ${arch:-unknown}"

# ---- 1. build ------------------------------------------------------------------------------------
t=$(now)
build_status="skipped"
nvcc_bin="$(command -v nvcc || true)"
if [[ -z "$nvcc_bin" && -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc_bin=/usr/local/cuda/bin/nvcc
fi
lib="$work/lib/libmq_scan_cuda.so"
if [[ -z "$nvcc_bin" ]]; then
    build_status="no nvcc"
elif ! command -v cmake >/dev/null 2>&1; then
    build_status="no cmake"
else
    archs="${arch:-native}"
    if timeout "$build_s" cmake -S plugins/selective_scan -B "$work/cmake" -DCMAKE_BUILD_TYPE=Release \
            -DMQ_BUILD_CUDA=ON -DMQ_BUILD_TRT=OFF -DCMAKE_CUDA_COMPILER="$nvcc_bin" \
            -DCMAKE_CUDA_ARCHITECTURES="$archs" -DMQ_SCAN_OUTPUT_DIR="$work/lib" >"$work/build.log" 2>&1 \
       && timeout "$build_s" cmake --build "$work/cmake" --parallel "$(nproc)" --target mq_scan_cpu mq_scan_cuda \
            >>"$work/build.log" 2>&1 \
       && [[ -f "$lib" ]]; then
        build_status="ok"
    else
        build_status="failed (see build/gpu-check/build.log)"
        tail -n 30 "$work/build.log"
    fi
fi
build_time=$(( $(now) - t ))
echo "build: $build_status in ${build_time} s"
export MQ_SCAN_CUDA_LIB="$lib"
[[ -f "$work/lib/libmq_scan_cpu.so" ]] && export MQ_SCAN_LIB="$work/lib/libmq_scan_cpu.so"

# ---- 2. tests/gpu ----------------------------------------------------------------------------------
t=$(now)
tests_status="skipped"
if [[ "$build_status" == "ok" ]]; then
    if timeout "$tests_s" "$py" -m pytest -q -rs tests/gpu --junitxml="$work/tests.xml" >"$work/tests.log" 2>&1; then
        tests_status="ok"
    else
        tests_status="failed (rc $?)"
    fi
    tail -n 15 "$work/tests.log"
fi
tests_time=$(( $(now) - t ))
echo "tests/gpu: $tests_status in ${tests_time} s"

# ---- 3. bench/scan_gpu.py -------------------------------------------------------------------------
t=$(now)
bench_status="skipped"
if [[ "$build_status" == "ok" ]]; then
    if timeout "$bench_s" "$py" bench/scan_gpu.py --iters 50 >"$work/bench.log" 2>&1; then
        bench_status="ok"
    else
        bench_status="failed (rc $?)"
    fi
    cat "$work/bench.log"
fi
bench_time=$(( $(now) - t ))
echo "bench/scan_gpu.py: $bench_status in ${bench_time} s"

# ---- 4. bench/ssd_bench.py --gpu (Mamba2) ----------------------------------------------------------
t=$(now)
ssd_status="skipped"
rm -f "$work/ssd_bench.json"
if [[ "$build_status" == "ok" ]]; then
    if timeout "$ssd_s" "$py" bench/ssd_bench.py --gpu --iters 50 --json "$work/ssd_bench.json" >"$work/ssd_bench.log" 2>&1; then
        ssd_status="ok"
    else
        ssd_status="failed (rc $?)"
    fi
    cat "$work/ssd_bench.log"
fi
ssd_time=$(( $(now) - t ))
echo "bench/ssd_bench.py --gpu: $ssd_status in ${ssd_time} s"

# ---- 5. JSON ---------------------------------------------------------------------------------------
total=$(( $(now) - start_all ))
GPU="$gpu" ARCH="$arch" BUILD="$build_status" BUILD_T="$build_time" TESTS="$tests_status" TESTS_T="$tests_time" \
BENCH="$bench_status" BENCH_T="$bench_time" SSD="$ssd_status" SSD_T="$ssd_time" TOTAL="$total" WORK="$work" \
JSON="$json" "$py" - <<'EOF'
import json, os, re
import xml.etree.ElementTree as ET

e = os.environ
work = e["WORK"]


def read(name):
    try:
        with open(os.path.join(work, name), errors="replace") as f:
            return f.read()
    except OSError:
        return ""


tests = {}
try:
    root = ET.parse(os.path.join(work, "tests.xml")).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["cases"] = [{"name": c.get("classname", "") + "::" + c.get("name", ""), "time_s": float(c.get("time", 0)),
                       "outcome": ("failed" if c.find("failure") is not None or c.find("error") is not None
                                   else "skipped" if c.find("skipped") is not None else "passed")}
                      for c in suite.iter("testcase")]
except (OSError, ET.ParseError, AttributeError):
    pass
rows = []
row = re.compile(r"^\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s*\|\s*([\d.]+)\s+(\d+)\s+(\d+)\s+(\d+)%\s*\|\s*([\d.]+)\s+([\d.]+)x")
for line in read("bench.log").splitlines():
    m = row.match(line)
    if m:
        b, L, d, n = map(int, m.groups()[:4])
        rows.append({"batch": b, "seqlen": L, "dim": d, "dstate": n, "int8_ms": float(m[5]), "int8_GBps": float(m[6]),
                     "copy_GBps": float(m[7]), "of_copy": float(m[8]) / 100, "fp16in_ms": float(m[9]),
                     "fp16in_over_int8": float(m[10])})
parity = re.search(r"rel err ([0-9.e+-]+)", read("bench.log"))
out = {"gpu": e["GPU"], "arch": e["ARCH"], "total_s": int(e["TOTAL"]),
       "build": {"status": e["BUILD"], "seconds": int(e["BUILD_T"])},
       "tests_gpu": {"status": e["TESTS"], "seconds": int(e["TESTS_T"]), **tests},
       "bench_scan_gpu": {"status": e["BENCH"], "seconds": int(e["BENCH_T"]), "rows": rows,
                          "parity_rel_err": float(parity[1]) if parity else None,
                          "log": read("bench.log")[-4000:]}}
try:
    with open(os.path.join(work, "ssd_bench.json")) as f:
        ssd = json.load(f)
except (OSError, ValueError):
    ssd = None
out["bench_ssd_gpu"] = {"status": e["SSD"], "seconds": int(e["SSD_T"]), "figures": ssd,
                        "log": read("ssd_bench.log")[-4000:]}
tmp = e["JSON"] + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f, indent=1)
os.replace(tmp, e["JSON"])
print("wrote", e["JSON"])
EOF
echo "total: ${total} s"
[[ "$build_status" == "ok" && "$tests_status" == "ok" && "$bench_status" == "ok" && "$ssd_status" == "ok" ]]
