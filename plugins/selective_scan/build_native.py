"""Build libmq_scan_cpu.so, libmq_scan_ort.so (and optionally libmq_scan_cuda.so) into a given directory.

libmq_scan_ort.so is the ONNX Runtime custom-op library (ort/); it needs no ONNX Runtime files (its C API
declarations are in ort/mq_ort_api.h) and finds libmq_scan_cpu.so beside it ($ORIGIN).

Torch-free and stdlib-only, so that setup.py can run it inside pip's isolated build environment and
`python -m mq_deploy.ops.native --build` can run it from a source checkout. Uses CMake when it is on
PATH, else compiles the CPU library with the C++ compiler directly (same flags as CMakeLists.txt).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_LIB = "libmq_scan_cpu.so"
CUDA_LIB = "libmq_scan_cuda.so"
ORT_LIB = "libmq_scan_ort.so"


def _run(cmd, log):
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True)


def _build_cmake(out_dir, build_dir, cuda, log):
    cmake = shutil.which("cmake")
    _run([cmake, "-S", HERE, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
          f"-DMQ_SCAN_OUTPUT_DIR={out_dir}", f"-DMQ_BUILD_CUDA={'ON' if cuda else 'OFF'}",
          "-DMQ_BUILD_TRT=OFF"], log)
    targets = ["mq_scan_cpu", "mq_scan_ort"] + (["mq_scan_cuda"] if cuda and _cuda_configured(build_dir) else [])
    _run([cmake, "--build", build_dir, "--parallel", str(os.cpu_count() or 1), "--target", *targets], log)


def _cuda_configured(build_dir):
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt")) as f:
            return any(line.startswith("CMAKE_CUDA_COMPILER:") and not line.rstrip().endswith("NOTFOUND")
                       for line in f)
    except OSError:
        return False


def _build_direct(out_dir, log):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("neither cmake nor a C++ compiler (g++, c++, clang++ or $CXX) was found")
    base = [cxx, "-O3", "-fno-trapping-math", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden",
            "-pthread", "-I", os.path.join(HERE, "include"),
            os.path.join(HERE, "src", "scan_cpu.cpp"), os.path.join(HERE, "src", "scan_common.cpp"),
            os.path.join(HERE, "src", "ssd_cpu.cpp"), os.path.join(HERE, "src", "ssd_common.cpp"),
            "-o", os.path.join(out_dir, CPU_LIB)]
    ort_dir = os.path.join(HERE, "ort")
    ort = [cxx, "-O3", "-fno-trapping-math", "-fopenmp-simd", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden",
           "-I", os.path.join(HERE, "include"), "-I", ort_dir,
           os.path.join(ort_dir, "mq_scan_ort.cpp"), os.path.join(ort_dir, "scan_float.cpp"),
           os.path.join(ort_dir, "state_update.cpp"), os.path.join(ort_dir, "state_codec.cpp"),
           os.path.join(ort_dir, "ssd_ops.cpp"),
           os.path.join(ort_dir, "ssd_update.cpp"), os.path.join(ort_dir, "qlinear.cpp"),
           os.path.join(ort_dir, "qlinear_ops.cpp"),
           "-L", out_dir, "-l:" + CPU_LIB, "-Wl,-rpath,$ORIGIN", "-Wl,-z,defs", "-o", os.path.join(out_dir, ORT_LIB)]
    for cmd in (base, ort):
        try:
            _run(cmd[:2] + ["-march=native"] + cmd[2:], log)
        except subprocess.CalledProcessError:
            log("-march=native failed; building for the compiler's default target")
            _run(cmd, log)


def build(out_dir, build_dir=None, cuda=False, log=None):
    """Build into out_dir; returns the paths of the libraries that exist there afterwards."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if shutil.which("cmake"):
        if build_dir is None:
            with tempfile.TemporaryDirectory(prefix="mq_scan_build_") as tmp:
                _build_cmake(out_dir, tmp, cuda, log)
        else:
            _build_cmake(out_dir, os.path.abspath(build_dir), cuda, log)
    else:
        if cuda:
            log("cmake not found: building the CPU library only")
        _build_direct(out_dir, log)
    return [p for p in (os.path.join(out_dir, n) for n in (CPU_LIB, ORT_LIB, CUDA_LIB)) if os.path.exists(p)]


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--build-dir")
    ap.add_argument("--cuda", action="store_true", help="also build libmq_scan_cuda.so when nvcc is found")
    a = ap.parse_args()
    for p in build(a.out_dir, a.build_dir, a.cuda):
        print(p)
