"""Finding and loading libmq_scan_trt.so (the mq::SelectiveScan IPluginV3 creator)."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Sequence

from mq_deploy.errors import MQUserError
from mq_deploy.export.surgery import PLUGIN_NAMESPACE, PLUGIN_OPS, PLUGIN_VERSION

PLUGIN_LIBRARY = "libmq_scan_trt.so"
PLUGIN_ENV = "MQ_SCAN_TRT_PLUGIN"        # path of the plugin library, used when plugins= is empty

_REPO_ROOT = Path(__file__).resolve().parents[3]
# Where `cmake -S plugins/selective_scan -B <dir>` leaves the library in the documented builds.
_PLUGIN_CANDIDATES = ("build/scan/" + PLUGIN_LIBRARY, "plugins/selective_scan/build/" + PLUGIN_LIBRARY,
                      "build/" + PLUGIN_LIBRARY)

BUILD_PLUGIN_HINT = (
    "build it with `cmake -S plugins/selective_scan -B build/scan -DTensorRT_ROOT=<TensorRT dir> "
    "&& cmake --build build/scan -j` (on Jetson -DTensorRT_ROOT=/usr), then pass its path "
    f"(plugins=[...], or `--plugins`), or set {PLUGIN_ENV}"
)


def find_plugin_library(plugins: Sequence[str | os.PathLike] | None = ()) -> list[str]:
    """Plugin libraries to load: the given paths (each must exist), else $MQ_SCAN_TRT_PLUGIN, else the
    first of the documented CMake build locations that exists; [] when none is found."""
    paths = [Path(p) for p in (plugins or ())]
    if paths:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MQUserError(f"plugin library not found: {', '.join(missing)}; {BUILD_PLUGIN_HINT}")
        return [str(p.resolve()) for p in paths]
    env = os.environ.get(PLUGIN_ENV)
    if env:
        if not Path(env).is_file():
            raise MQUserError(f"{PLUGIN_ENV}={env} does not name a file; {BUILD_PLUGIN_HINT}")
        return [str(Path(env).resolve())]
    for rel in _PLUGIN_CANDIDATES:
        cand = _REPO_ROOT / rel
        if cand.is_file():
            return [str(cand)]
    return []


_REGISTERED: set = set()


def register_creators(paths: Sequence[str]) -> None:
    """After Polygraphy's LoadPlugins has dlopened the libraries: register our creator in TensorRT's
    registry. Polygraphy only dlopens (it expects self-registering libraries); ours exports
    getCreators for IPluginRegistry::loadLibrary and the idempotent mq_scan_trt_register_creators for
    this path. Other libraries are left as they are."""
    for path in paths:
        if path in _REGISTERED:
            continue
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise MQUserError(f"cannot load plugin library {path}: {e}. Its dependencies (libnvinfer, "
                              "libmq_scan_cuda.so, libcudart) must be on the loader path") from None
        register = getattr(lib, "mq_scan_trt_register_creators", None)
        if register is not None:
            register.restype = ctypes.c_int32
            if register() != 0:
                raise MQUserError(f"{path}: mq_scan_trt_register_creators() failed; see the log above")
        _REGISTERED.add(path)


def scan_creator(trt):
    registry = trt.get_plugin_registry()
    if hasattr(registry, "get_creator"):
        return registry.get_creator(PLUGIN_OPS[0], PLUGIN_VERSION, PLUGIN_NAMESPACE)
    return registry.get_plugin_creator(PLUGIN_OPS[0], PLUGIN_VERSION, PLUGIN_NAMESPACE)
