"""Translate plugins/selective_scan/src/scan_cuda.cu into C++ on cuda_emu.h and build it as a shared
library with the CUDA library's C ABI (mq_scan_cuda, mq_scan_step_cuda, mq_scan_cuda_f16in)."""

import os
import re
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.join(HERE, "..", "..", "plugins", "selective_scan")
LAUNCH = re.compile(r"(\w+(?:<[^;<>]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


def build(out_dir):
    cxx = shutil.which("g++")
    if cxx is None:
        raise RuntimeError("g++ not found")
    with open(os.path.join(PLUGIN, "src", "scan_cuda.cu")) as f:
        src = f.read()
    translated, n = LAUNCH.subn(r"emu_launch(\2, [&] { \1(\3); });", src)
    if n < 3:
        raise RuntimeError(f"expected the kernel launches of scan_cuda.cu, found {n}")
    cpp = os.path.join(out_dir, "scan_cuda_emu.cpp")
    with open(cpp, "w") as f:
        f.write(translated)
    lib = os.path.join(out_dir, "libmq_scan_cuda_emu.so")
    subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-I", HERE,
                    "-I", os.path.join(PLUGIN, "include"), "-I", os.path.join(PLUGIN, "src"), cpp,
                    os.path.join(PLUGIN, "src", "scan_common.cpp"), "-o", lib], check=True)
    return lib
