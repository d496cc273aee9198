"""`mq-deploy serve --setup`: install what `mq-deploy serve` and the serving tests need, idempotently (each
step runs only when its check fails, so a second run changes nothing). README's test command and `.ci/run`
both run it.

1. tritonclient (HTTP and gRPC clients) into this Python, where `pip install -e ".[test]"` did not already;
2. pytriton's tritonserver (`nvidia-pytriton`, Python backend, CPU) with --no-deps: we use only its server
   binary, and its numpy<2 and protobuf pins would downgrade this project's;
3. the system Python that the server's Python-backend stub embeds (pytriton ships stubs for 3.8-3.13; the
   stub loads the system's libpython3.X): Debian's libpython3.X, numpy, Pillow and pip (apt-get, as root);
4. into that Python, onnxruntime and tokenizers at this environment's versions (pip --break-system-packages),
   so a served model computes exactly what `mq-deploy run`/`generate` compute here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

from mq_deploy.errors import MQUserError
from mq_deploy.serve import server

STUB_MODULES = ("numpy", "PIL", "onnxruntime", "tokenizers")     # what our Python-backend models import


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _run(cmd: list, what: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        tail = [line for line in (r.stderr or r.stdout).splitlines() if line.strip()][-1:] or ["(no output)"]
        raise MQUserError(f"setup: {what} failed (`{' '.join(cmd)}`, exit {r.returncode}): {tail[0]}")


def _imports(python: str, modules) -> list:
    """The modules `python` cannot import."""
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception:\n"
            "        print(m)\n")
    r = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True)
    return r.stdout.split() if r.returncode == 0 else list(modules)


def _versions(python: str, modules) -> dict:
    code = ("import importlib, sys, json\n"
            "print(json.dumps({m: getattr(importlib.import_module(m), '__version__', '?') for m in sys.argv[1:]}))")
    r = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True)
    try:
        return json.loads(r.stdout) if r.returncode == 0 else {}
    except ValueError:
        return {}


class _Apt:
    def __init__(self):
        self.updated = False

    def install(self, packages: list, why: str) -> None:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise MQUserError(f"setup: {why} needs Debian packages; as root run: apt-get update && apt-get install -y "
                              f"{' '.join(packages)}, then `mq-deploy serve --setup` again")
        if not self.updated:
            _run(["apt-get", "update", "-qq"], "apt-get update")
            self.updated = True
        _run(["apt-get", "install", "-y", "-qq", *packages], f"apt-get install {' '.join(packages)}")


def _stub_versions() -> list:
    base = server._pytriton_dir()
    stubs = os.path.join(base, "python_backend_stubs") if base else ""
    if not os.path.isdir(stubs):
        raise MQUserError("setup: nvidia-pytriton is installed but has no python_backend_stubs folder")
    return sorted(os.listdir(stubs), key=lambda v: tuple(int(x) for x in v.split(".") if x.isdigit()), reverse=True)


def setup(log=print) -> dict:
    """Install what is missing; returns {"done": [steps], "server", "stub_python", "versions"}."""
    t0 = time.monotonic()
    done = []
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    if not (_importable("tritonclient.http") and _importable("tritonclient.grpc")):
        _run(pip + ["tritonclient[grpc,http]"], "pip install tritonclient[grpc,http]")
        done.append("pip tritonclient[grpc,http]")
    if server._pytriton_dir() is None:
        _run(pip + ["--no-deps", "nvidia-pytriton"], "pip install --no-deps nvidia-pytriton")
        done.append("pip --no-deps nvidia-pytriton")
        if server._pytriton_dir() is None:
            raise MQUserError("setup: nvidia-pytriton installed, but its tritonserver binary is not there (is this "
                              "machine x86-64 or aarch64 Linux with glibc >= 2.35?)")
    apt = _Apt()
    versions = _stub_versions()
    have = [v for v in versions if server.stub_interpreter(v)]
    if not have:
        apt.install(["python3"], f"a system Python for pytriton's stub (one of {', '.join(versions)})")
        done.append("apt python3")
        have = [v for v in versions if server.stub_interpreter(v)]
        if not have:
            raise MQUserError(f"setup: the system Python is none of {', '.join(versions)}, the versions pytriton's "
                              "stub is built for")
    version = have[0]
    python = server.stub_interpreter(version)
    packages = []
    if not server._libpython_present(version):
        packages.append(f"libpython{version}")
    missing = _imports(python, ("numpy", "PIL"))
    packages += [server.APT_PACKAGES[m] for m in missing]
    if subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode:
        packages.append("python3-pip")
    if packages:
        apt.install(packages, f"the stub's Python ({python})")
        done.append("apt " + " ".join(packages))
    from importlib import metadata

    want = {m: metadata.version(m) for m in server.PIP_PINNED}
    got = _versions(python, want)
    if got != want:
        _run([python, "-m", "pip", "install", "--quiet", "--break-system-packages",
              *(f"{m}=={v}" for m, v in want.items())], f"pip install into {python}")
        done.append(f"pip {' '.join(f'{m}=={v}' for m, v in want.items())} for {python}")
    missing = _imports(python, STUB_MODULES)
    if missing:
        raise MQUserError(f"setup: {python} still cannot import {', '.join(missing)}")
    inst = server.find_server()
    try:
        binary, stub = inst.binary, inst.stub_python
    finally:
        inst.close()
    if stub != version:
        raise MQUserError(f"setup: prepared Python {version} for the stub, but the server would use {stub}; set "
                          f"{server.STUB_PYTHON_ENV}={version}")
    final = _versions(python, STUB_MODULES)
    log(f"triton setup: {'; '.join(done) or 'everything already installed'} ({time.monotonic() - t0:.0f} s); "
        f"server {binary}, stub Python {python}: " + ", ".join(f"{m} {v}" for m, v in final.items()))
    return {"done": done, "server": binary, "stub_python": python, "versions": final}
