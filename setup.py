"""Builds the native selective scan library (plugins/selective_scan) as part of `pip install`.

Everything else about the package is in pyproject.toml. The CPU library and the ONNX Runtime custom-op
library (libmq_scan_ort.so, no ORT headers needed) go to mq_deploy/_native/, where mq_deploy.ops.native
finds them: into the source tree for editable installs, into the wheel
otherwise. A failed native build only warns (the package works without it and its tests skip, saying
why) unless MQ_REQUIRE_NATIVE=1, which CI sets. MQ_SKIP_NATIVE=1 skips the build.
"""

import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = os.path.dirname(os.path.abspath(__file__))


def _build_native(out_dir):
    if os.environ.get("MQ_SKIP_NATIVE") == "1":
        print("mq-deploy: MQ_SKIP_NATIVE=1, not building the native selective scan", file=sys.stderr)
        return
    script = os.path.join(ROOT, "plugins", "selective_scan", "build_native.py")
    try:
        spec = importlib.util.spec_from_file_location("mq_scan_build_native", script)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for path in mod.build(out_dir):
            print(f"mq-deploy: built {path}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - any failure must leave a working pure-Python install
        if os.environ.get("MQ_REQUIRE_NATIVE") == "1":
            raise
        print(f"mq-deploy: WARNING: native selective scan not built ({e}); the package works without it. "
              "Build it later with: python -m mq_deploy.ops.native --build", file=sys.stderr)


class BuildPyWithNative(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            _build_native(os.path.join(ROOT, "mq_deploy", "_native"))
        else:
            _build_native(os.path.join(os.path.abspath(self.build_lib), "mq_deploy", "_native"))


class BinaryDistribution(Distribution):
    """The wheel carries a shared library: tag it for this platform, not py3-none-any."""

    def has_ext_modules(self):
        return True


setup(cmdclass={"build_py": BuildPyWithNative}, distclass=BinaryDistribution)
