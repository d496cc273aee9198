"""The one writer for every file and folder mq-deploy produces.

Rules (coreutils' `install`/`mv` habits, STYLE.md 16):
- an output is built under a recognisable temporary name in its target's folder
  (`.NAME.mq-tmp-PID-RAND`), fsynced, then renamed into place, so a reader never sees half a file;
- without `overwrite` the rename is exclusive (renameat2 RENAME_NOREPLACE), so of two concurrent
  writers one fails cleanly instead of both reporting success;
- with `overwrite` only something mq-deploy wrote is replaced (`is_ours`), never a user's file, a
  symlink, or anything that is, holds, or lies inside one of the command's inputs (`check_output`);
- temporaries are removed on exceptions, SIGINT and SIGTERM; those a SIGKILL left behind are swept
  from the folder on the next write there;
- modes follow the umask (mkstemp's 0600 / mkdtemp's 0700 are corrected).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
import signal
import stat
import threading

from mq_deploy.errors import MQInternalError, MQUserError

TMP_TAG = ".mq-tmp-"
MARKER = ".mq-deploy"          # inside every folder we write
JSON_KEY = "mq_deploy_version"  # in every JSON object we write
_ONNX_PRODUCER = b"\x12\x09mq-deploy"   # ModelProto field 2 (producer_name), serialized near the start

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _libc():
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        fn = lib.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _libc()


def _rename2(src: str, dst: str, flags: int) -> bool:
    """renameat2(src, dst, flags); False where the kernel or filesystem lacks it (caller falls back)."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(e, os.strerror(e), dst)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---- paths -------------------------------------------------------------------------------------

def _real(path: str) -> str:
    """realpath of a path that may not exist yet: its folder resolved, its last component kept."""
    path = os.path.abspath(os.fsdecode(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def check_output(path: str, inputs=(), what: str = "output") -> str:
    """Refuse an output path that is an input, lies inside an input folder, or holds an input.
    Returns the absolute output path (its folder resolved)."""
    out = _real(path)
    out_resolved = os.path.realpath(out)
    for inp in inputs:
        if inp is None:
            continue
        src = os.path.realpath(os.fsdecode(inp))
        if out_resolved == src or out == src:
            raise MQUserError(f"{path}: that is an input of this command; the {what} must be a new path")
        if os.path.isdir(src) and (_inside(out, src) or _inside(out_resolved, src)):
            raise MQUserError(f"{path}: lies inside the input folder {inp}; write the {what} somewhere else")
        if _inside(src, out) or _inside(src, out_resolved):
            raise MQUserError(f"{path}: holds the input {inp}; the {what} must not contain an input")
    return out


def is_ours(path: str) -> bool:
    """True for what mq-deploy wrote: a folder with our marker (or our checkpoint config), an ONNX
    file we produced (producer_name), a JSON object carrying our key, or a file with our sidecar."""
    if os.path.islink(path):
        return False
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MARKER)):
            return True
        try:   # checkpoints written before the marker existed
            with open(os.path.join(path, "config.json")) as f:
                return "mq_deploy_format" in json.load(f)
        except (OSError, ValueError, TypeError):
            return False
    if not os.path.isfile(path):
        return False
    if path.endswith(".onnx.data"):
        return is_ours(path[:-len(".data")])
    if os.path.isfile(_sidecar(path)):
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if path.endswith(".onnx") or _ONNX_PRODUCER in head:
                return _ONNX_PRODUCER in head
            if path.endswith(".json") and os.fstat(f.fileno()).st_size < 256 * 2 ** 20:
                f.seek(0)
                obj = json.loads(f.read().decode("utf-8"))
                return isinstance(obj, dict) and JSON_KEY in obj
    except (OSError, ValueError):
        return False
    return False


def _sidecar(path: str) -> str:
    d, b = os.path.split(path)
    return os.path.join(d, f".{b}{MARKER}")


def check_target(path: str, overwrite: bool = False, inputs=(), what: str = "output", inout: bool = False,
                 folder: bool = False) -> str:
    """Everything a writer checks before it starts (call it early, before long work): the output is
    no input, its folder exists, and an existing file is only replaced with overwrite when it is ours
    (`inout`: a file this command reads and updates, like a timing cache, may be any regular file)."""
    out = _real(path)
    _check_target(path, out, overwrite, inputs, what, inout, folder)
    return out


def _check_target(path: str, out: str, overwrite: bool, inputs, what: str, inout: bool = False,
                  folder: bool = False) -> None:
    if not inout:
        check_output(path, inputs, what)
    if not folder and (os.fspath(path).endswith(os.sep) or os.path.isdir(out)):
        raise MQUserError(f"{path}: is a folder; give the path of the file to write")
    if folder and os.path.lexists(out) and not os.path.isdir(out):
        raise MQUserError(f"{path}: exists and is not a folder")
    parent = os.path.dirname(out)
    while not os.path.isdir(parent):        # missing folders are created when writing (mkdir -p)
        if os.path.lexists(parent):
            raise MQUserError(f"{path}: {parent} is not a folder")
        parent = os.path.dirname(parent)
    if os.path.lexists(out):
        if not overwrite:
            raise MQUserError(f"{path}: already exists (pass --overwrite to replace it)")
        if os.path.islink(out):
            raise MQUserError(f"{path}: is a symbolic link; --overwrite replaces only files mq-deploy wrote, "
                              "remove the link first")
        if inout and os.path.isfile(out):
            return
        if not is_ours(out):
            raise MQUserError(f"{path}: exists and was not written by mq-deploy; --overwrite replaces only "
                              "mq-deploy's own outputs, move or remove it yourself")


# ---- temporaries, signals, sweeping ------------------------------------------------------------

_live: set = set()
_lock = threading.Lock()
_handler_installed = False


def _on_term(signum, frame):
    raise SystemExit(128 + signum)


def _install_handlers() -> None:
    """SIGTERM becomes SystemExit, so the `finally` blocks that remove temporaries run (SIGINT already
    raises KeyboardInterrupt). Only from the main thread, only over the default handler."""
    global _handler_installed
    if _handler_installed or threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_term)
    _handler_installed = True


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: str) -> list:
    """Remove temporaries of ours whose process is gone (left by a SIGKILL or power loss)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(".") or TMP_TAG not in name:
            continue
        try:
            pid = int(name.rsplit(TMP_TAG, 1)[1].split("-", 1)[0])
        except (IndexError, ValueError):
            continue
        if _pid_alive(pid):
            continue
        p = os.path.join(folder, name)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
            removed.append(p)
        except OSError:
            pass
    return removed


def temp_path(target: str) -> str:
    """A recognisable temporary name beside target (swept later if this process dies)."""
    d, b = os.path.split(target)
    return os.path.join(d, f".{b}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}")


def _remove(p: str) -> None:
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.remove(p)
    except OSError:
        pass


@contextlib.contextmanager
def tracked_temp(p: str):
    """Remove temporary `p` if the block fails (exception, SIGINT, SIGTERM)."""
    with _lock:
        _live.add(p)
    try:
        yield p
    except BaseException:
        _remove(p)
        raise
    finally:
        with _lock:
            _live.discard(p)


def _create(path: str, make):
    """Create a temporary; the system's refusal names the target, not the temporary."""
    try:
        return make()
    except OSError as e:
        raise MQUserError(f"{path}: cannot write there ({e.strerror or e})") from None


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit_file(tmp: str, out: str, overwrite: bool, path: str | None = None) -> None:
    """Rename a finished temporary into place: exclusive unless overwrite (checked by the caller)."""
    path = path or out
    if overwrite and os.path.lexists(out):
        os.replace(tmp, out)
    else:
        try:
            if not _rename2(tmp, out, _RENAME_NOREPLACE):
                os.link(tmp, out)     # exclusive too: fails if out exists
                os.remove(tmp)
        except FileExistsError:
            raise MQUserError(f"{path}: already exists (another writer created it first; pass --overwrite "
                              "to replace it)") from None
    _fsync_dir(os.path.dirname(out))


# ---- the public writers ------------------------------------------------------------------------

def _prepare(path: str, overwrite: bool, inputs, what: str, inout: bool = False, folder: bool = False):
    """Every writer's start: the checks, signal handling, the target's folder, a sweep of dead
    writers' temporaries there, and this writer's temporary name. Returns (target, temporary)."""
    out = _real(path)
    _check_target(path, out, overwrite, inputs, what, inout, folder)
    _install_handlers()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    sweep_stale(os.path.dirname(out))
    return out, temp_path(out)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", *, overwrite: bool = False, inputs=(), what: str = "output",
                sidecar: bool = False, inout: bool = False):
    """Yield a file object open on a temporary beside `path`; on success fsync and rename it into
    place. `sidecar` marks formats that cannot carry our marker themselves (engines)."""
    if mode not in ("w", "wb"):
        raise MQInternalError(f"atomic_file mode {mode!r}")
    out, tmp = _prepare(path, overwrite, inputs, what, inout)
    with tracked_temp(tmp):
        fd = _create(path, lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        commit_file(tmp, out, overwrite, path)
    if sidecar:
        marker = _sidecar(out)
        with open(marker, "w") as f:
            f.write(json.dumps({"written_by": "mq-deploy", "file": os.path.basename(out)}) + "\n")


@contextlib.contextmanager
def atomic_path(path: str, *, overwrite: bool = False, inputs=(), what: str = "output", sidecar: bool = False,
                inout: bool = False):
    """Like atomic_file, for writers that want a path (onnx.save, safetensors): yield the temporary
    path; the caller writes a complete file there; it is then fsynced and renamed into place."""
    out, tmp = _prepare(path, overwrite, inputs, what, inout)
    with tracked_temp(tmp):
        yield tmp
        if not os.path.isfile(tmp):
            raise MQInternalError(f"atomic_path: nothing was written to {tmp}")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())
        commit_file(tmp, out, overwrite, path)
    if sidecar:
        with open(_sidecar(out), "w") as f:
            f.write(json.dumps({"written_by": "mq-deploy", "file": os.path.basename(out)}) + "\n")


def write_bytes(path: str, data: bytes, **kw) -> str:
    with atomic_file(path, "wb", **kw) as f:
        f.write(data)
    return _real(path)


def write_text(path: str, text: str, **kw) -> str:
    with atomic_file(path, "w", **kw) as f:
        f.write(text)
    return _real(path)


def write_json(path: str, obj, **kw) -> str:
    """JSON objects get our key (`mq_deploy_version`) so a later --overwrite recognises them."""
    from mq_deploy import __version__

    if isinstance(obj, dict) and JSON_KEY not in obj:
        obj = {JSON_KEY: __version__, **obj}
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n", **kw)


def _json_default(o):
    try:
        import numpy as np
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    if isinstance(o, (set, tuple)):
        return list(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool = False, inputs=(), what: str = "output folder", kind: str = ""):
    """Yield a temporary folder beside `path`; on success write our marker, fsync every file and swap
    the folder into place (an old folder of ours is exchanged atomically, then removed)."""
    from mq_deploy import __version__

    out, tmp = _prepare(path, overwrite, inputs, what, folder=True)
    with tracked_temp(tmp):
        _create(path, lambda: os.mkdir(tmp, 0o777))
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        with open(os.path.join(tmp, MARKER), "w") as f:
            f.write(json.dumps({"written_by": "mq-deploy", "version": __version__, "kind": kind}) + "\n")
        mask = _umask()
        for root, dirs, files in os.walk(tmp):
            for name in files:
                p = os.path.join(root, name)
                if os.path.islink(p):
                    continue
                with _lock:
                    copied = os.path.abspath(p) in _copied
                    _copied.discard(os.path.abspath(p))
                if not copied:   # writers like safetensors create 0600 files: give them the umask's modes
                    execute = os.stat(p).st_mode & 0o100
                    os.chmod(p, (0o777 if execute else 0o666) & ~mask)
                fd = os.open(p, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
                _fsync_dir(os.path.join(root, name))
        _fsync_dir(tmp)
        if overwrite and os.path.lexists(out):
            if not _rename2(tmp, out, _RENAME_EXCHANGE):
                old = temp_path(out)
                os.rename(out, old)
                os.rename(tmp, out)
                tmp_old = old
            else:
                tmp_old = tmp        # after the exchange, tmp names the old folder
            shutil.rmtree(tmp_old, ignore_errors=True)
        else:
            try:
                if not _rename2(tmp, out, _RENAME_NOREPLACE):
                    if os.path.lexists(out):
                        raise FileExistsError(out)
                    os.rename(tmp, out)
            except FileExistsError:
                raise MQUserError(f"{path}: already exists (another writer created it first; pass --overwrite "
                                  "to replace it)") from None
        _fsync_dir(os.path.dirname(out))


def mode_bits(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


_copied: set = set()     # files copy_file made inside folders being written: atomic_dir keeps their modes


def copy_file(src: str, dst: str) -> str:
    """Copy a regular file as `cp` does: the bytes, and the source's permission bits masked by the umask
    (a private 0600 model stays 0600 in a repository). `dst` must not exist yet (it is created
    exclusively, never through a link); it is normally inside a folder that atomic_dir is writing."""
    st = os.stat(src)
    if not stat.S_ISREG(st.st_mode):
        raise MQUserError(f"{src}: not a regular file")
    mode = stat.S_IMODE(st.st_mode) & 0o777 & ~_umask()
    with open(src, "rb") as fin:
        fd = _create(dst, lambda: os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        with os.fdopen(fd, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
    os.chmod(dst, mode)
    with _lock:
        _copied.add(os.path.abspath(dst))
    return dst
