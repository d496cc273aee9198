"""Translate plugins/selective_scan/src/scan_cuda.cu and ssd_cuda.cu into C++ on cuda_emu.h and build them as
one shared library with the CUDA library's C ABI (mq_scan_cuda, mq_scan_step_cuda, mq_scan_cuda_f16in, ...,
mq_ssd_cuda, mq_ssd_cuda_ws, mq_ssd_step_cuda)."""

import os
import re
import shutil
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
PLUGIN = os.path.join(HERE, "..", "..", "plugins", "selective_scan")
LAUNCH = re.compile(r"(\w+(?:<[^;<>]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)


# each .cu of the CUDA library and the least number of kernel launches it has
SOURCES = {"scan_cuda.cu": 3, "ssd_cuda.cu": 4}


def build(out_dir):
    cxx = shutil.which("g++")
    if cxx is None:
        raise RuntimeError("g++ not found")
    cpps = []
    for name, launches in SOURCES.items():
        with open(os.path.join(PLUGIN, "src", name)) as f:
            src = f.read()
        translated, n = LAUNCH.subn(r"emu_launch(\2, [&] { \1(\3); });", src)
        if n < launches:
            raise RuntimeError(f"expected the kernel launches of {name}, found {n}")
        cpps.append(os.path.join(out_dir, name.replace(".cu", "_emu.cpp")))
        with open(cpps[-1], "w") as f:
            f.write(translated)
    lib = os.path.join(out_dir, "libmq_scan_cuda_emu.so")
    subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-w", "-I", HERE,
                    "-I", os.path.join(PLUGIN, "include"), "-I", os.path.join(PLUGIN, "src"), *cpps,
                    os.path.join(PLUGIN, "src", "scan_common.cpp"), os.path.join(PLUGIN, "src", "ssd_common.cpp"),
                    "-o", lib], check=True)
    return lib
