"""Start and stop a real `tritonserver` on a model repository.

The server is the one the PyPI package `nvidia-pytriton` ships (`pytriton/tritonserver/bin/
tritonserver`, Python backend only, runs on a CPU) or any `tritonserver` on PATH / in
$MQ_TRITONSERVER (NVIDIA's container: /opt/tritonserver/bin/tritonserver).

pytriton keeps one Python-backend stub per Python version (`python_backend_stubs/3.X/`); the stub
embeds the system's libpython3.X, so the models run in *that* interpreter (Debian: /usr/bin/python3.11),
which must import what the models import (numpy, onnxruntime, PIL, tokenizers): checked before the server
starts, installed by `mq-deploy serve --setup` (mq_deploy/serve/setup.py). Like pytriton itself, we assemble
a backend folder (`backends/python/` = libtriton_python.so + the stub + triton_python_backend_utils.py)
in a temporary folder and point the server at pytriton's bundled libraries with LD_LIBRARY_PATH.

Loopback only by default: `host` is passed as --http-address / --grpc-address.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from mq_deploy.errors import MQUserError

SERVER_ENV = "MQ_TRITONSERVER"          # path of a tritonserver binary to use instead of pytriton's
STUB_PYTHON_ENV = "MQ_TRITON_PYTHON"    # e.g. "3.11": which pytriton stub (and system libpython) to use
INSTALL_HINT = ("install a Triton server: `mq-deploy serve --setup` (pytriton's tritonserver, which runs the "
                "Python backend on a CPU, and what its Python needs), or use NVIDIA's container "
                f"nvcr.io/nvidia/tritonserver:<yy.mm>-py3; or set {SERVER_ENV}=/path/to/tritonserver")
APT_PACKAGES = {"numpy": "python3-numpy", "PIL": "python3-pil"}   # the stub's Python: Debian's builds
PIP_PINNED = ("onnxruntime", "tokenizers")      # the stub's Python: our versions, so served outputs equal ours


def _pytriton_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = os.path.join(list(spec.submodule_search_locations)[0], "tritonserver")
    return d if os.path.isfile(os.path.join(d, "bin", "tritonserver")) else None


@dataclass
class ServerInstall:
    binary: str
    backend_dir: str | None = None       # None: the server's own default (/opt/tritonserver/backends)
    env: dict = field(default_factory=dict)
    stub_python: str | None = None
    cleanup: str | None = None           # temporary folder we assembled

    def close(self) -> None:
        if self.cleanup:
            shutil.rmtree(self.cleanup, ignore_errors=True)
            self.cleanup = None


def _libpython_present(version: str) -> bool:
    import ctypes.util

    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib", "/usr/local/lib", "/lib"):
        if os.path.exists(os.path.join(d, f"libpython{version}.so.1.0")):
            return True
    return ctypes.util.find_library(f"python{version}") is not None


def find_server() -> ServerInstall:
    """The tritonserver to run, with the backend folder and environment it needs."""
    explicit = os.environ.get(SERVER_ENV)
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise MQUserError(f"${SERVER_ENV}={explicit}: not an executable tritonserver")
        return ServerInstall(binary=explicit)
    base = _pytriton_dir()
    if base is None:
        found = shutil.which("tritonserver")
        if found:
            return ServerInstall(binary=found)
        raise MQUserError(f"no tritonserver found; {INSTALL_HINT}")
    stubs = os.path.join(base, "python_backend_stubs")
    versions = sorted(os.listdir(stubs), key=lambda v: tuple(int(x) for x in v.split(".")), reverse=True) \
        if os.path.isdir(stubs) else []
    wanted = os.environ.get(STUB_PYTHON_ENV)
    if wanted:
        if wanted not in versions:
            raise MQUserError(f"${STUB_PYTHON_ENV}={wanted}: pytriton ships stubs for {', '.join(versions)}")
        version = wanted
    else:
        usable = [v for v in versions if _libpython_present(v)]
        if not usable:
            raise MQUserError(f"pytriton's Python-backend stubs ({', '.join(versions)}) each need the system's "
                              "libpython3.X.so.1.0 and none is installed; run `mq-deploy serve --setup` (Debian: "
                              "apt-get install libpython3.11 python3-numpy)")
        version = usable[0]
    tmp = tempfile.mkdtemp(prefix="mq-tritonserver-")
    py = os.path.join(tmp, "backends", "python")
    os.makedirs(py)
    src = os.path.join(base, "backends", "python")
    for name in os.listdir(src):
        if name != "__pycache__":
            shutil.copy2(os.path.join(src, name), py)
    shutil.copy2(os.path.join(stubs, version, "triton_python_backend_stub"), py)
    libs = os.path.join(os.path.dirname(os.path.dirname(base)), "nvidia_pytriton.libs")
    env = {"LD_LIBRARY_PATH": ":".join(p for p in (libs, os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    # The embedded interpreter finds its prefix (stdlib, site-packages) from the first `python3` on
    # PATH; under pyenv or a venv that is another installation, whose packages the system libpython
    # must not mix with. A `python3` -> the system python3.X first on PATH makes it the system's.
    system_python = stub_interpreter(version)
    if system_python:
        os.makedirs(os.path.join(tmp, "bin"))
        os.symlink(system_python, os.path.join(tmp, "bin", "python3"))
        env["PATH"] = os.path.join(tmp, "bin") + os.pathsep + os.environ.get("PATH", "")
    return ServerInstall(binary=os.path.join(base, "bin", "tritonserver"), backend_dir=os.path.join(tmp, "backends"),
                         env=env, stub_python=version, cleanup=tmp)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM (Triton's graceful shutdown) when the starting process dies,
    even by SIGKILL, so a crashed test run or benchmark leaves no server listening."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


_BACKEND_RE = re.compile(r'^\s*(backend|platform)\s*:\s*"([^"]+)"', re.M)


def _model_backends(repo: str):
    """(model name, backend) of every model folder of a repository, from its config.pbtxt."""
    for name in sorted(os.listdir(repo)):
        cfg = os.path.join(repo, name, "config.pbtxt")
        if not os.path.isfile(cfg):
            continue
        with open(cfg, encoding="utf-8", errors="replace") as f:
            found = dict(m.groups() for m in _BACKEND_RE.finditer(f.read()))
        platform = found.get("platform")
        yield name, found.get("backend") or {"ensemble": None, "tensorrt_plan": "tensorrt",
                                             "onnxruntime_onnx": "onnxruntime"}.get(platform, platform)


def python_model_imports(repo: str) -> dict:
    """{model: third-party modules} of the repository's Python-backend models: the imports of their .py
    files (parsed, never run), less the standard library, Triton's own module, files beside them and the
    names of our own helper files (serve/triton_models: `mq-deploy triton` copies those a model uses beside
    it; the generate model imports mq_ort_session only when it runs the step graph itself, and then it is
    there). Ours need numpy, onnxruntime (ORT models, an inline generate model through mq_ort_session),
    PIL (image preprocessing), tokenizers (BPE generation)."""
    import ast
    import sys

    models_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_models")
    ours = {f[:-3] for f in os.listdir(models_dir) if f.endswith(".py")}
    out = {}
    for name, backend in _model_backends(repo):
        if backend != "python":
            continue
        mdir = os.path.join(repo, name)
        sources = []
        for version in sorted(os.listdir(mdir)):
            vdir = os.path.join(mdir, version)
            if version.isdigit() and os.path.isdir(vdir):
                sources += [os.path.join(vdir, f) for f in sorted(os.listdir(vdir)) if f.endswith(".py")]
        local = {os.path.basename(f)[:-3] for f in sources}
        mods = set()
        for src in sources:
            try:
                with open(src, encoding="utf-8") as f:
                    tree = ast.parse(f.read(), src)
            except (OSError, SyntaxError, ValueError):
                continue        # the server reports a model it cannot load; nothing to check here
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    mods |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    mods.add(node.module.split(".")[0])
        mods -= set(sys.stdlib_module_names) | {"triton_python_backend_utils", "__future__"} | local | ours
        if mods:
            out[name] = mods
    return out


def stub_interpreter(version: str) -> str | None:
    """The system python3.X whose libpython pytriton's stub embeds."""
    return shutil.which(f"python{version}", path="/usr/bin:/usr/local/bin:/bin")


def install_commands(python: str, modules) -> list:
    """The commands that give `python` (the stub's interpreter) the modules: Debian's numpy and Pillow,
    our own onnxruntime and tokenizers versions (so served outputs equal ours), anything else from pip."""
    from importlib import metadata

    apt = sorted({APT_PACKAGES[m] for m in modules if m in APT_PACKAGES})
    pip = []
    for m in sorted(set(modules) - set(APT_PACKAGES)):
        try:
            pip.append(f"{m}=={metadata.version(m)}" if m in PIP_PINNED else m)
        except metadata.PackageNotFoundError:
            pip.append(m)
    cmds = []
    if apt:
        cmds.append("apt-get install -y " + " ".join(apt))
    if pip:
        cmds.append(f"{python} -m pip install --break-system-packages " + " ".join(pip))
    return cmds


def check_stub_python(repo: str, install: "ServerInstall") -> None:
    """Before pytriton's server starts: the interpreter its Python-backend stub embeds imports what the
    repository's Python models import; else one line naming what is missing and the commands that fix it
    (instead of a Triton log of failed model loads)."""
    if install.stub_python is None:      # another server (NVIDIA's container): its Python is its own
        return
    needs = python_model_imports(repo)
    modules = sorted(set().union(*needs.values())) if needs else []
    if not modules:
        return
    python = stub_interpreter(install.stub_python)
    if python is None:
        raise MQUserError(f"pytriton's Python-backend stub embeds Python {install.stub_python}, and there is no "
                          f"python{install.stub_python} in /usr/bin; run `mq-deploy serve --setup`")
    code = ("import importlib, sys\n"
            "for m in sys.argv[1:]:\n"
            "    try:\n"
            "        importlib.import_module(m)\n"
            "    except Exception:\n"
            "        print(m)\n")
    env = {**os.environ, **install.env}
    try:
        r = subprocess.run([python, "-c", code, *modules], capture_output=True, text=True, env=env, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MQUserError(f"cannot run {python} (the Python-backend stub's interpreter): {e}") from None
    missing = r.stdout.split() if r.returncode == 0 else modules
    if missing:
        users = sorted(n for n, m in needs.items() if set(m) & set(missing))
        ours = set(missing) <= set(APT_PACKAGES) | set(PIP_PINNED)     # what `--setup` installs
        raise MQUserError(f"{python} (the interpreter pytriton's Python-backend stub embeds) cannot import "
                          f"{', '.join(missing)}, needed by {', '.join(users)}; "
                          + ("run `mq-deploy serve --setup`, or: " if ours else "install it: ")
                          + "; ".join(install_commands(python, missing)))


def check_backends(repo: str, install: ServerInstall) -> None:
    """pytriton's server has the Python backend only: refuse, before starting it, a repository whose
    models need another backend (the server would fail to load them with a long log)."""
    if install.backend_dir is None:       # another server: it knows its own backends
        return
    have = set(os.listdir(install.backend_dir))
    for name, backend in _model_backends(repo):
        if backend and backend not in have:
            raise MQUserError(f"{repo}: model {name} needs Triton's {backend} backend, which this tritonserver "
                              f"(pytriton's, backends: {', '.join(sorted(have))}) does not have; write the repository "
                              "with `mq-deploy triton ... --backend python` to serve it here, or run NVIDIA's "
                              f"container (the commands are in {os.path.join(repo, 'README.md')})")


def check_ports(host: str, ports: dict) -> None:
    """{flag: port}: each in 1..65535, no two the same, each free on `host`; checked before the server
    starts (tritonserver answers a clash with its whole usage text)."""
    seen = {}
    for flag, port in ports.items():
        if port is None:
            continue
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise MQUserError(f"{flag} {port}: must lie in 1..65535")
        if port in seen:
            raise MQUserError(f"{seen[port]} and {flag} are both {port}: the server needs a port for each")
        seen[port] = flag
    for port, flag in seen.items():
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # as the server: TIME_WAIT is no clash
            try:
                s.bind((host, port))
            except OSError as e:
                raise MQUserError(f"{flag} {port}: cannot listen on {host}:{port} ({e.strerror or e}); is another "
                                  "server running there? choose another port") from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def generate_counters(metrics_url: str, model: str, timeout: float = 60.0) -> tuple:
    """(steps, step-graph calls) so far of an inline generate model (triton_models/generate_model.py), from its
    counters mq_generate_steps_total and mq_generate_step_calls_total on the server's Prometheus endpoint
    (metrics_url: HOST:PORT); 0 for a counter not (yet) there. Their ratio is the model's mean batch."""
    with urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=timeout) as r:
        text = r.read().decode()
    got = {}
    for line in text.splitlines():
        for name in ("mq_generate_steps_total", "mq_generate_step_calls_total"):
            if line.startswith(name + "{") and f'model="{model}"' in line:
                got[name] = int(float(line.rsplit(" ", 1)[1]))
    return got.get("mq_generate_steps_total", 0), got.get("mq_generate_step_calls_total", 0)


def server_command(install: ServerInstall, repo: str, host: str, http_port: int, grpc_port: int,
                   extra=(), metrics_port: int | None = None) -> list:
    metrics = ["--allow-metrics=false"] if metrics_port is None else \
        ["--allow-metrics=true", f"--metrics-address={host}", f"--metrics-port={metrics_port}"]
    cmd = [install.binary, f"--model-repository={os.path.abspath(repo)}",
           f"--http-address={host}", f"--http-port={http_port}",
           f"--grpc-address={host}", f"--grpc-port={grpc_port}",
           *metrics, "--allow-sagemaker=false", "--allow-vertex-ai=false",
           "--exit-on-error=true", "--strict-readiness=true", "--log-verbose=0",
           # on SIGINT the server waits this long for clients to close their connections
           "--exit-timeout-secs=10",
           # one model loaded at a time: with the default pool, pytriton's server crashed at startup on this 2-core
           # machine now and then, in the Python backend (SIGSEGV, boost::interprocess::lock_exception), while its
           # models' stubs started side by side (tests/test_serve_server.py: 1 of 3 runs under CPU load, 0 of 4 with
           # this flag)
           "--model-load-thread-count=1"]
    if install.backend_dir:
        cmd.append(f"--backend-directory={install.backend_dir}")
    return cmd + list(extra)


class TritonServer:
    """A tritonserver child process on `host` (loopback by default).

        with TritonServer("repo") as srv:
            srv.http_url, srv.grpc_url   # "127.0.0.1:PORT"
    """

    def __init__(self, repo: str, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, log_path: str | None = None, ready_timeout: float = 120.0,
                 extra_args=(), metrics_port: int | None = None):
        if not os.path.isdir(repo):
            raise MQUserError(f"{repo}: no such model repository folder")
        if not any(os.path.isfile(os.path.join(repo, d, "config.pbtxt")) for d in os.listdir(repo)):
            raise MQUserError(f"{repo}: not a Triton model repository (no MODEL/config.pbtxt in it; write one with "
                              "`mq-deploy triton ARTIFACT -o REPO`)")
        ports = {"--http-port": http_port, "--grpc-port": grpc_port, "--metrics-port": metrics_port}
        check_ports(host, {k: v for k, v in ports.items() if v is not None})
        self.repo, self.host = repo, host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        while self.grpc_port in (self.http_port, metrics_port):
            self.grpc_port = free_port(host)
        self.metrics_port = metrics_port
        self.log_path, self.ready_timeout, self.extra_args = log_path, ready_timeout, tuple(extra_args)
        self.proc: subprocess.Popen | None = None
        self.install: ServerInstall | None = None
        self._log = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self) -> list:
        return server_command(self.install, self.repo, self.host, self.http_port, self.grpc_port, self.extra_args,
                              self.metrics_port)

    def prepare(self) -> dict:
        """Find the server and check, before it starts, everything that would otherwise end in its log: the
        backends the models need, the stub's Python, the ports. Returns the server's environment."""
        self.install = find_server()
        try:
            check_backends(self.repo, self.install)
            check_stub_python(self.repo, self.install)
        except MQUserError:
            self.install.close()
            raise
        return {**os.environ, **self.install.env}

    def start(self, wait: bool = True) -> "TritonServer":
        env = self.prepare()
        if self.log_path:
            self._log = open(self.log_path, "a+b")
        else:
            self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True, preexec_fn=_die_with_parent)
        atexit.register(self.stop)      # a script that ends without stop() leaves no server behind
        if wait:
            try:
                self.wait_ready()
            except BaseException:
                self.stop()
                raise
        return self

    def log_text(self, tail: int = 4000) -> str:
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0, os.SEEK_END)
        size = self._log.tell()
        self._log.seek(max(0, size - tail))
        text = self._log.read().decode("utf-8", "replace")
        self._log.seek(0, os.SEEK_END)
        return text

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise MQUserError(f"tritonserver exited with status {self.proc.returncode} while loading {self.repo}:"
                                  f"\n{self.log_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.25)
        raise MQUserError(f"tritonserver did not become ready within {self.ready_timeout:.0f} s:\n{self.log_text()}")

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT (Triton's clean shutdown: in-flight requests finish, models unload), then SIGKILL."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait(10)
            code = self.proc.returncode
        if self.install is not None:
            self.install.close()
        return code    # the log stays readable (log_text) until this object goes away

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(repo: str, host: str = "127.0.0.1", http_port: int = 8000, grpc_port: int = 8001,
          metrics_port: int | None = None) -> int:
    """`mq-deploy serve`: run tritonserver in the foreground until SIGINT or SIGTERM, which are passed on
    to it (Triton's graceful shutdown); return its exit status."""
    srv = TritonServer(repo, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port)
    env = srv.prepare()
    cmd = srv.command()
    print(" ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)

    def forward(signum, frame):
        # also when this process was started in the background with SIGINT ignored (`cmd &` in a script)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
        return code if code >= 0 else 128 - code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        srv.install.close()
