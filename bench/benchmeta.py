"""What every bench JSON records beside its figures: when, where, at which commit, and under which load.

    meta = RunMeta()                  # starts sampling the 1-minute load average
    ... the timed work ...
    write_json(out, {...figures..., "run": meta.finish()})

The machines these benches run on are shared, so a timing means little without the load it was taken
under: `run.load` holds the 1-minute load average before and after the run and the min / mean / max of
samples taken every few seconds during it. `bench/report.py` states that range beside every timing it
quotes.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args):
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_flags(want=SIMD_FLAGS) -> list:
    """Which of the CPU flags `want` this machine has (default: the SIMD flags that change our numbers: ORT's
    int8 GEMM is exact with VNNI, not always without it)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [w for w in want if w in have]
    except OSError:
        pass
    return []


def _versions(names):
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


class RunMeta:
    """Start it before the timed work, `finish()` after; the load is sampled in a daemon thread."""

    def __init__(self, period: float = 5.0, packages=("torch", "onnxruntime", "onnx", "transformers")):
        self._period = period
        self._samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._t0 = time.time()
        self.info = {
            "bench": os.path.relpath(os.path.abspath(sys.argv[0]), ROOT) if sys.argv and sys.argv[0] else "",
            "argv": sys.argv[1:],
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": _git("rev-parse", "HEAD"),
            # other work shares the checkout: say whether the measured code had uncommitted changes
            "dirty": bool(_git("status", "--porcelain", "--untracked-files=no", "--", "mq_deploy", "bench",
                               "plugins", "pyproject.toml")),
            "nproc": os.cpu_count(),
            "nice": os.nice(0),      # a bench may run at a raised priority on a shared machine: say so
            "cpu": _cpu_model(),
            "cpu_flags": cpu_flags(),
            "python": platform.python_version(),
            "versions": _versions(packages),
            "load_before": [round(v, 2) for v in os.getloadavg()],
        }
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.wait(self._period):
            self._samples.append(os.getloadavg()[0])

    def finish(self) -> dict:
        self._stop.set()
        self._thread.join(timeout=1)
        s = self._samples + [os.getloadavg()[0]]
        return {**self.info, "seconds": round(time.time() - self._t0, 1),
                "load_after": [round(v, 2) for v in os.getloadavg()],
                "load": {"min": round(min(s), 2), "mean": round(sum(s) / len(s), 2), "max": round(max(s), 2),
                         "samples": len(s), "period_s": self._period}}


def write(path: str, obj: dict, meta: RunMeta) -> None:
    """The bench's figures plus `run` (see RunMeta), through the project's one JSON writer."""
    sys.path.insert(0, ROOT)
    from mq_deploy.fileio import write_json

    write_json(path, {**obj, "run": meta.finish()}, overwrite=True)
    print(f"wrote {path}")
