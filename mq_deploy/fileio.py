"""The one writer for every file and folder mq-deploy produces.

Rules (coreutils' `install`/`mv` habits, STYLE.md 16):
- an output is built under a recognisable temporary name in its target's folder
  (`.NAME.mq-tmp-PID-RAND`), fsynced, then renamed into place, so a reader never sees half a file;
- without `overwrite` the rename is exclusive (renameat2 RENAME_NOREPLACE), so of two concurrent
  writers one fails cleanly instead of both reporting success;
- with `overwrite` only something mq-deploy wrote is replaced, never a user's file, a symlink, or
  anything that is, holds, or lies inside one of the command's inputs (`check_output`). A folder we
  write carries a manifest (`.mq-deploy`: kind, and every file's path, size and sha256); it is replaced
  only when it is an output kind (not a model checkpoint or sample, which are inputs) and every entry in
  it is one of its recorded files, unchanged, on the folder's own filesystem, with no mount point inside.
  The old folder is then removed entry by entry, never following a link or crossing a mount;
- temporaries are removed on exceptions, SIGINT and SIGTERM; those a SIGKILL left behind are swept
  from the folder on the next write there (with the same care: no links followed, no mounts crossed);
- modes follow the umask (mkstemp's 0600 / mkdtemp's 0700 are corrected), and an output is no more
  readable than its inputs: when a model or data file the command read has no group/other read bit,
  the outputs lose it too. Copies (`copy_file`) keep their source's bits masked by the umask, as cp does;
- a full disk (or quota, or a read-only filesystem) while writing is one line naming the output.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import stat
import threading

from mq_deploy.errors import MQInternalError, MQUserError

TMP_TAG = ".mq-tmp-"
MARKER = ".mq-deploy"          # inside every folder we write: its kind and the manifest of its files
MANIFEST_VERSION = 2
# folders that are outputs and may be replaced by --overwrite; any other kind (a model checkpoint
# written by save_model, a sample) is an input and never replaced
OUTPUT_KINDS = ("quantized checkpoint", "inspect report", "triton-repository", "unfinished quantize")
_MARKER_LIMIT = 64 * 2 ** 20
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
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
    """True for what --overwrite may replace: an output folder whose manifest covers everything in it
    (`check_replaceable_dir`), an ONNX file we produced (producer_name), a JSON object carrying our
    key, or a file with our sidecar."""
    if os.path.islink(path):
        return False
    if os.path.isdir(path):
        try:
            check_replaceable_dir(path)
        except MQUserError:
            return False
        return True
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


# ---- folders we wrote: the manifest, and the checks before one is replaced or removed ----------

def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _unescape_mount(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mount_points_under(path: str) -> list:
    """Mount points that are `path` or lie inside it (Linux: /proc/self/mountinfo; a bind mount of the
    same filesystem has the same st_dev, so comparing devices alone does not find it)."""
    root = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        parts = line.split(" ")
        if len(parts) > 4:
            mp = _unescape_mount(parts[4])
            if _inside(mp, root):
                found.append(mp)
    return found


def _manifest_of(folder: str) -> dict:
    """{"files": {relative path: {"size", "sha256"}}, "dirs": [relative paths]} of a finished folder."""
    files, dirs = {}, []
    for root, dnames, fnames in os.walk(folder):
        dnames.sort()
        for name in dnames:
            dirs.append(os.path.relpath(os.path.join(root, name), folder))
        for name in sorted(fnames):
            p = os.path.join(root, name)
            rel = os.path.relpath(p, folder)
            if rel == MARKER or os.path.islink(p):
                continue
            files[rel] = {"size": os.lstat(p).st_size, "sha256": sha256_file(p)}
    return {"files": files, "dirs": dirs}


def read_manifest(folder: str) -> dict | None:
    """The marker of a folder we wrote, validated (it is read back, so it is untrusted); None if absent
    or not ours. Folders written before manifests existed (version 1, or a config.json carrying
    mq_deploy_format and no marker) have none."""
    p = os.path.join(folder, MARKER)
    try:
        st = os.lstat(p)
        if not stat.S_ISREG(st.st_mode) or st.st_size > _MARKER_LIMIT:
            return None
        with open(p, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("written_by") != "mq-deploy" or not isinstance(m.get("kind"), str):
        return None
    files, dirs = m.get("files"), m.get("dirs", [])
    if m.get("manifest") != MANIFEST_VERSION or not isinstance(files, dict) or not isinstance(dirs, list):
        return m | {"files": None}
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and not isinstance(entry["size"], bool)
                and isinstance(entry.get("sha256"), str) and _relative_inside(rel)):
            return m | {"files": None}
    if not all(isinstance(d, str) and _relative_inside(d) for d in dirs):
        return m | {"files": None}
    return m


def _relative_inside(rel) -> bool:
    return (isinstance(rel, str) and rel != "" and "\0" not in rel and not os.path.isabs(rel)
            and os.path.normpath(rel) == rel and rel.split(os.sep, 1)[0] != os.pardir)


def _foreign_entry(folder: str, manifest: dict) -> str | None:
    """The first entry of `folder` that is not one of the manifest's unchanged files (or folders) on
    the folder's filesystem, as a relative path with the reason; None when everything is ours."""
    files, dirs = manifest["files"], set(manifest.get("dirs") or [])
    dirs |= {os.path.dirname(rel) for rel in files}
    dev = os.lstat(folder).st_dev
    for mp in mount_points_under(folder):
        return f"{os.path.relpath(mp, folder)} (a mount point)"
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(os.path.join(folder, rel_dir)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            rel = os.path.join(rel_dir, e.name) if rel_dir else e.name
            if rel == MARKER:
                continue
            st = e.stat(follow_symlinks=False)
            if st.st_dev != dev:
                return f"{rel} (on another filesystem)"
            if stat.S_ISDIR(st.st_mode):
                if rel not in dirs:
                    return rel
                stack.append(rel)
            elif stat.S_ISREG(st.st_mode) and rel in files:
                want = files[rel]
                if st.st_size != want["size"] or sha256_file(e.path) != want["sha256"]:
                    return f"{rel} (changed since mq-deploy wrote it)"
            else:
                return rel + (" (a symbolic link)" if stat.S_ISLNK(st.st_mode) else "")
    return None


def check_replaceable_dir(path: str, shown: str | None = None) -> None:
    """Refuse (MQUserError, one line) to replace folder `path` unless mq-deploy wrote it as an output
    and everything in it is what it recorded."""
    shown = shown or path
    if os.path.islink(path) or not os.path.isdir(path):
        raise MQUserError(f"{shown}: is not a folder mq-deploy wrote")
    m = read_manifest(path)
    if m is None:
        raise MQUserError(f"{shown}: exists and was not written by mq-deploy (no {MARKER} manifest); --overwrite "
                          "replaces only mq-deploy's own outputs: move or remove it yourself")
    if m["kind"] not in OUTPUT_KINDS:
        raise MQUserError(f"{shown}: is a {m['kind']} (an input), which --overwrite never replaces; write to a "
                          "new folder")
    if m["files"] is None:
        raise MQUserError(f"{shown}: was written by an older mq-deploy without a manifest of its files, so what "
                          "inside it is ours cannot be told; move or remove it yourself")
    foreign = _foreign_entry(path, m)
    if foreign is not None:
        raise MQUserError(f"{shown}: holds {foreign}, which mq-deploy did not write; --overwrite replaces a folder "
                          "only when everything in it is mq-deploy's: move that out, or write to a new folder")


def _remove_entries(folder: str, manifest: dict | None) -> list:
    """Remove `folder` bottom-up without following links or crossing mounts; with a manifest, only its
    unchanged files. Returns what was kept (relative paths); the folder itself stays if anything was."""
    kept = []
    try:
        top = os.lstat(folder)
    except OSError:
        return kept
    if not stat.S_ISDIR(top.st_mode):
        return [folder]
    mounts = set(mount_points_under(folder))
    if mounts:
        return sorted(os.path.relpath(m, folder) for m in mounts)
    files = manifest["files"] if manifest else None

    def walk(rel_dir: str) -> bool:
        d = os.path.join(folder, rel_dir)
        empty = True
        try:
            with os.scandir(d) as it:
                entries = list(it)
        except OSError:
            kept.append(rel_dir or ".")
            return False
        for e in entries:
            rel = os.path.join(rel_dir, e.name) if rel_dir else e.name
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_dev != top.st_dev:
                kept.append(rel)
                empty = False
                continue
            if stat.S_ISDIR(st.st_mode):
                if walk(rel):
                    try:
                        os.rmdir(e.path)
                        continue
                    except OSError:
                        pass
                empty = False
                continue
            ok = files is None or rel == MARKER or (
                rel in files and stat.S_ISREG(st.st_mode) and st.st_size == files[rel]["size"])
            if ok:
                try:
                    os.unlink(e.path)      # a link itself, never what it points to
                    continue
                except OSError:
                    pass
            kept.append(rel)
            empty = False
        return empty

    if walk(""):
        try:
            os.rmdir(folder)
        except OSError:
            kept.append(".")
    return kept


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
        if os.path.isdir(out):
            check_replaceable_dir(out, path)
        elif not is_ours(out):
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
                if _remove_entries(p, None):
                    continue
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
    """Remove a temporary of this process (a file, or a folder it was building: no links followed,
    no mounts crossed)."""
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            _remove_entries(p, None)
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

def _allowed_bits(inputs) -> int:
    """Permission bits an output may have: group/other read is dropped when any input the command read
    (a file, or a folder and the files at its top) lacks it, so a private model's outputs stay private."""
    allowed = 0o777
    for inp in inputs:
        if inp is None:
            continue
        p = os.fsdecode(inp)
        try:
            paths = [p]
            if os.path.isdir(p):
                with os.scandir(p) as it:
                    paths += [e.path for e in it if e.is_file(follow_symlinks=True)]
            for q in paths:
                mode = os.stat(q).st_mode
                if not mode & stat.S_IRGRP:
                    allowed &= ~0o070
                if not mode & stat.S_IROTH:
                    allowed &= ~0o007
        except OSError:
            continue
    return allowed


def _file_mode(execute: bool, allowed: int) -> int:
    return (0o777 if execute else 0o666) & ~_umask() & allowed


@contextlib.contextmanager
def _write_errors(path: str):
    """A full disk, an exceeded quota or a read-only filesystem while writing `path` is the user's
    situation, said in one line about the output (not about an input, not about our temporary)."""
    try:
        yield
    except OSError as e:
        if e.errno in _WRITE_ERRNOS:
            raise MQUserError(f"{path}: cannot write it: {e.strerror or os.strerror(e.errno)}") from None
        raise
    except MQUserError:          # already one line, naming the file (a writer nested in a folder being written)
        raise
    except Exception as e:       # safetensors, protobuf and numpy writers wrap the OSError in their own type
        text = str(e)
        for code in _WRITE_ERRNOS:
            if os.strerror(code) in text or f"os error {code}" in text:
                raise MQUserError(f"{path}: cannot write it: {os.strerror(code)}") from None
        raise


def _prepare(path: str, overwrite: bool, inputs, what: str, inout: bool = False, folder: bool = False):
    """Every writer's start: the checks, signal handling, the target's folder, a sweep of dead
    writers' temporaries there, and this writer's temporary name. Returns (target, temporary, the
    permission bits its files may have)."""
    out = _real(path)
    _check_target(path, out, overwrite, inputs, what, inout, folder)
    _install_handlers()
    with _write_errors(path):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    sweep_stale(os.path.dirname(out))
    return out, temp_path(out), _allowed_bits(inputs)


def _write_sidecar(out: str) -> None:
    with open(_sidecar(out), "w") as f:
        f.write(json.dumps({"written_by": "mq-deploy", "file": os.path.basename(out)}) + "\n")


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", *, overwrite: bool = False, inputs=(), what: str = "output",
                sidecar: bool = False, inout: bool = False):
    """Yield a file object open on a temporary beside `path`; on success fsync and rename it into
    place. `sidecar` marks formats that cannot carry our marker themselves (engines)."""
    if mode not in ("w", "wb"):
        raise MQInternalError(f"atomic_file mode {mode!r}")
    out, tmp, allowed = _prepare(path, overwrite, inputs, what, inout)
    with tracked_temp(tmp), _write_errors(path):
        fd = _create(path, lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(False, allowed))
        commit_file(tmp, out, overwrite, path)
        if sidecar:
            _write_sidecar(out)


@contextlib.contextmanager
def atomic_path(path: str, *, overwrite: bool = False, inputs=(), what: str = "output", sidecar: bool = False,
                inout: bool = False):
    """Like atomic_file, for writers that want a path (onnx.save, safetensors): yield the temporary
    path; the caller writes a complete file there; it is then fsynced and renamed into place."""
    out, tmp, allowed = _prepare(path, overwrite, inputs, what, inout)
    with tracked_temp(tmp), _write_errors(path):
        yield tmp
        if not os.path.isfile(tmp):
            raise MQInternalError(f"atomic_path: nothing was written to {tmp}")
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, _file_mode(False, allowed))
        commit_file(tmp, out, overwrite, path)
        if sidecar:
            _write_sidecar(out)


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


def _finish_dir(tmp: str, kind: str, allowed: int) -> None:
    """Modes, fsync, and the marker with the manifest of every file in the finished folder."""
    from mq_deploy import __version__

    for root, dirs, files in os.walk(tmp):
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            with _lock:
                copied = os.path.abspath(p) in _copied
                _copied.discard(os.path.abspath(p))
            if not copied:   # writers like safetensors create 0600 files: give them the umask's modes
                os.chmod(p, _file_mode(bool(os.stat(p).st_mode & 0o100), allowed))
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~_umask() & allowed)
            _fsync_dir(os.path.join(root, name))
    marker = {"written_by": "mq-deploy", "version": __version__, "kind": kind, "manifest": MANIFEST_VERSION,
              **_manifest_of(tmp)}
    with open(os.path.join(tmp, MARKER), "w") as f:
        f.write(json.dumps(marker, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(os.path.join(tmp, MARKER), _file_mode(False, allowed))
    _fsync_dir(tmp)


def _discard_old(old: str, out: str, path: str) -> None:
    """Remove the folder that was swapped out of `out` (it held only recorded files when checked); what
    appeared in it since is kept, in a folder beside the output whose name says so."""
    manifest = read_manifest(old)
    kept = _remove_entries(old, manifest if manifest and manifest.get("files") is not None else None)
    if kept and os.path.lexists(old):
        keep_as = f"{out}.kept-{secrets.token_hex(3)}"
        os.rename(old, keep_as)
        from mq_deploy.errors import note

        note(f"{path}: {kept[0]} appeared in the old folder while it was being replaced; kept in {keep_as}")


@contextlib.contextmanager
def atomic_dir(path: str, *, overwrite: bool = False, inputs=(), what: str = "output folder", kind: str = ""):
    """Yield a temporary folder beside `path`; on success write our marker (with the manifest of the
    files in it), fsync every file and swap the folder into place. An old folder is replaced only when
    check_replaceable_dir passes, checked again right before the exchange; it is then removed file by
    file (only recorded files, no links followed, no mounts crossed)."""
    if not kind:
        raise MQInternalError("atomic_dir needs the kind of folder it writes")
    out, tmp, allowed = _prepare(path, overwrite, inputs, what, folder=True)
    with tracked_temp(tmp), _write_errors(path):
        _create(path, lambda: os.mkdir(tmp, 0o777))
        os.chmod(tmp, 0o777 & ~_umask() & allowed)
        yield tmp
        _finish_dir(tmp, kind, allowed)
        if overwrite and os.path.lexists(out):
            check_replaceable_dir(out, path)          # again: the user may have added something meanwhile
            if _rename2(tmp, out, _RENAME_EXCHANGE):
                old = tmp                              # after the exchange, tmp names the old folder
            else:
                old = temp_path(out)
                os.rename(out, old)
                os.rename(tmp, out)
            _discard_old(old, out, path)
        else:
            _rename_new(tmp, out, f"{path}: already exists (another writer created it first; pass --overwrite "
                                  "to replace it)")
        _fsync_dir(os.path.dirname(out))


def _rename_new(tmp: str, out: str, taken: str) -> None:
    """Rename folder `tmp` to `out`, which must not exist (atomically where the system can say so); `taken`: the
    one line when something is there."""
    try:
        if not _rename2(tmp, out, _RENAME_NOREPLACE):
            if os.path.lexists(out):
                raise FileExistsError(out)
            os.rename(tmp, out)
    except FileExistsError:
        raise MQUserError(taken) from None


# ---- folders filled over time (an unfinished layer-streamed quantize, quant.partial) --------------

def write_marker(folder: str, kind: str, files: dict, record: dict | None = None, inputs=()) -> None:
    """(Re)write the marker of a folder mq-deploy fills over time: `files` {relative path: {"size", "sha256"}}
    are the files finished in it (what check_replaceable_dir and remove_dir then accept as ours), `record` the
    writer's own entries. A temporary beside it, fsync, rename, fsync the folder: a reader sees the old marker
    or the new one, never half of one."""
    from mq_deploy import __version__

    marker = {"written_by": "mq-deploy", "version": __version__, "kind": kind, "manifest": MANIFEST_VERSION,
              "files": files, "dirs": []}
    if record is not None:
        marker["record"] = record
    p = os.path.join(folder, MARKER)
    tmp = temp_path(p)
    with tracked_temp(tmp), _write_errors(p):
        fd = _create(p, lambda: os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(marker, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode(False, _allowed_bits(inputs)))
        os.replace(tmp, p)
    _fsync_dir(folder)


def create_marked_dir(path: str, kind: str, record: dict | None = None, *, inputs=(), what: str = "folder") -> str:
    """Create the new folder `path`, already carrying our marker (`kind`, no files yet, `record`): it is built
    under a temporary name and renamed into place exclusively, so it is never there unmarked. One line if
    something is already there."""
    out, tmp, allowed = _prepare(path, False, inputs, what, folder=True)
    with tracked_temp(tmp), _write_errors(path):
        _create(path, lambda: os.mkdir(tmp, 0o777))
        os.chmod(tmp, 0o777 & ~_umask() & allowed)
        write_marker(tmp, kind, {}, record, inputs)
        _rename_new(tmp, out, f"{path}: already exists (another writer created it first)")
        _fsync_dir(os.path.dirname(out))
    return out


def remove_dir(path: str, check: bool = True) -> list:
    """Remove a folder mq-deploy wrote: with `check`, only when check_replaceable_dir passes (every file hashed);
    either way only its recorded files of their recorded size go, no link followed, no mount crossed. Returns
    what was kept (relative paths; the folder itself stays when anything was)."""
    if check:
        check_replaceable_dir(path)
    m = read_manifest(path)
    if m is None or m.get("files") is None:
        return ["."]
    return _remove_entries(path, m)


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
