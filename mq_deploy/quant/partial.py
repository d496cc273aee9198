"""The partial folder of a layer-streamed quantize (quant.streamed): what `mq-deploy quantize --resume` continues.

`OUT.partial/`, beside the output OUT, is created when a layer-streamed quantize starts and removed when OUT is
in place. After each finished block (block 0: the embedding, final norm and head; block i + 1: layer i) it holds:

  model-{k:05d}-of-{n:05d}.safetensors  the finished shards: the bytes the output gets (hard-linked into it at
                                        the end, so nothing is written twice)
  stats.safetensors                     the recipe's stats context (MambaQuant's KLT·H and QuaRot's Hadamard
                                        residual rotation R, [d_model, d_model] float64), written once after the
                                        statistics passes
  state-{k:05d}.safetensors             what block k + 1 needs: the calibration windows' residual stream after
                                        block k ("stream.h", [windows, seq, d_model] float32, and "stream.emb"
                                        for a family whose blocks read the embeddings), the activation and
                                        weight scales so far ("act:"/"weight:" + name, as quantize made them)
                                        and torch's RNG state
  .mq-deploy                            fileio's marker: kind "unfinished quantize" and the size and sha256 of
                                        every finished file (so --overwrite and the cleanup treat the folder as
                                        ours, and resume finds a damaged file), and under "record" the state:
                                        the fingerprint of the inputs, how many blocks are done, which state
                                        file is current, the layer flags, the weight_map, and the model config
                                        as the finished blocks left it (an untied head, int8 KV caches)

Each file goes to a temporary, is fsynced and renamed (fileio); the marker's rename commits a block. A kill at any
point leaves the last committed block; what was written after it is swept by the next run. The folder holds no
config.json, so nothing loads it as a model.

Size, at the 2.8b shape (d_model 2560, 64 layers, 8 windows of 512 tokens): per block the state file is rewritten:
the stream, 8·512·2560·4 B = 40 MiB, plus the scales so far (at most those of scales.safetensors: 23,232 float32
weight scales a layer, 5.7 MiB after 64 layers); R (2560²·8 B = 50 MiB) is written once; the marker grows by
about 0.9 KB a layer, mostly the weight_map (some 60 KB at 64 layers). Bounded by the stream and the final scales,
whatever the depth.

The fingerprint (`fingerprint`) says which inputs the result depends on: the checkpoint's files (name, size,
modification time, and the sha256 of a safetensors file's header (tensor names, dtypes, shapes, offsets) or of a
small file's content), the recipe's whole config, the calibration token windows themselves (sha256 of the tensor,
so the data, tokenizer, --seq-len, --calib-samples are all in it), the calibration batch, the seed, and the
mq-deploy, torch and Python versions and torch's thread count (the manifest's depends_on: what makes the bytes
equal). `--resume` continues only when all of it is the same; otherwise one line names what differs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import re
import stat

import torch

from mq_deploy import __version__, fileio
from mq_deploy.errors import MQInternalError, MQUserError, note

KIND = "unfinished quantize"
SUFFIX = ".partial"
FORMAT = 1
STATS = "stats.safetensors"
_STATE = "state-{:05d}.safetensors"
_OURS = re.compile(r"(model-\d{5}-of-\d{5}|state-\d{5}|stats)\.safetensors")
_SMALL = 16 * 2 ** 20          # files up to this size are hashed whole; a larger one by its header
_HEADER_LIMIT = 100 * 2 ** 20   # safetensors' own bound on a header


def partial_path(out_dir: str) -> str:
    return os.fspath(out_dir).rstrip(os.sep) + SUFFIX


# ---- what the result depends on ------------------------------------------------------------------

def _file_print(path: str) -> dict:
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if path.endswith(".safetensors") and st.st_size >= 8:
            head = f.read(8)
            n = int.from_bytes(head, "little")
            h.update(head)
            h.update(f.read(min(n, _HEADER_LIMIT)))
        else:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                if f.tell() >= _SMALL:
                    break
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": h.hexdigest()}


def model_print(model_path: str) -> dict:
    """{file name: size, modification time, sha256 of its header or content} of a checkpoint's files (a folder's
    regular files at its top, not hidden; or the file itself). A file that cannot be read is {"unreadable"}."""
    p = os.path.realpath(model_path)
    if os.path.isdir(p):
        try:
            names = sorted(e.name for e in os.scandir(p) if not e.name.startswith(".") and e.is_file())
        except OSError:
            names = []
        paths = [(name, os.path.join(p, name)) for name in names]
    else:
        paths = [(os.path.basename(p), p)]
    out = {}
    for name, q in paths:
        try:
            out[name] = _file_print(q)
        except OSError as e:
            out[name] = {"unreadable": e.strerror or str(e)}
    return out


def _normal(obj):
    """JSON's view of obj (what the record holds after it is read back)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def fingerprint(model_path: str, loop, recipe_cfg, seed: int) -> dict:
    data = loop.data.contiguous()
    return _normal({
        "mq_deploy": __version__, "torch": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "model": model_print(model_path),
        "recipe": dataclasses.asdict(recipe_cfg),
        "calibration": {"windows": len(data), "seq_len": int(data.shape[1]), "batch": loop.batch, "seed": seed,
                        "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()},
    })


def _model_change(old: dict, new: dict) -> str | None:
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if a is None:
            return f"{name} is new"
        if b is None:
            return f"{name} is gone"
        if "unreadable" in b:
            return f"{name} cannot be read ({b['unreadable']})"
        if a.get("size") != b.get("size"):
            return f"{name} is {b.get('size')} bytes, was {a.get('size')}"
        if a.get("sha256") != b.get("sha256"):
            return f"{name}'s content changed"
        return f"{name} was modified since"
    return None


def difference(old, new: dict) -> str | None:
    """What differs between the fingerprint `old` (read back: untrusted) and `new`, in words; None if nothing."""
    if not isinstance(old, dict):
        return "its record has no fingerprint"
    if old.get("model") != new["model"]:
        m = old.get("model")
        why = _model_change(m, new["model"]) if isinstance(m, dict) else "unknown"
        return f"the model checkpoint ({why})"
    if old.get("recipe") != new["recipe"]:
        a, b = _flat(old.get("recipe")), _flat(new["recipe"])
        diffs = [f"{k} {a.get(k)} then, {b.get(k)} now" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return f"the recipe settings ({'; '.join(diffs) or 'unknown'})"
    if old.get("calibration") != new["calibration"]:
        a, b = old.get("calibration"), new["calibration"]
        a = a if isinstance(a, dict) else {}
        for k, what in (("windows", "windows"), ("seq_len", "--seq-len"), ("seed", "--seed"), ("batch", "batch")):
            if a.get(k) != b[k]:
                return f"the calibration data ({what} {a.get(k)} then, {b[k]} now)"
        return "the calibration data (its token windows differ: another file or tokenizer)"
    for k, what in (("mq_deploy", "mq-deploy version"), ("torch", "torch version"), ("python", "Python version"),
                    ("torch_threads", "torch threads")):
        if old.get(k) != new[k]:
            hint = f"; pass --threads {old.get(k)}" if k == "torch_threads" and isinstance(old.get(k), int) else ""
            return f"the {what} ({old.get(k)} then, {new[k]} now{hint})"
    return None


def _flat(d, prefix: str = "") -> dict:
    """{"quant": {"wbits": 8}} -> {"quant.wbits": 8}"""
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else ()):
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---- the folder ------------------------------------------------------------------------------------

def precheck(out_dir: str, inputs, resume: bool, overwrite: bool) -> None:
    """Before any work: an OUT.partial that is not ours, or one there without --resume or --overwrite, is one
    line; --resume with nothing to resume is a note (the run starts from the first block)."""
    path = partial_path(out_dir)
    if not os.path.lexists(path):
        if resume:
            note(f"--resume: there is no {path}, so this quantize starts from the first layer")
        return
    fileio.check_output(path, inputs, "unfinished quantize folder")
    m = _ours(path)
    if not resume and not overwrite:
        rec = m.get("record") if isinstance(m.get("record"), dict) else {}
        done, blocks = rec.get("done"), rec.get("blocks")
        what = (f" ({done - 1} of {blocks - 1} layers done)" if isinstance(done, int) and isinstance(blocks, int)
                and done >= 1 else "")
        raise MQUserError(f"{path}: an interrupted quantize of {out_dir} is there{what}; pass --resume to continue "
                          "it, or --overwrite to start over (or remove it)")


def _ours(path: str) -> dict:
    if os.path.islink(path) or not os.path.isdir(path):
        raise MQUserError(f"{path}: is in the way (mq-deploy keeps an unfinished quantize there, and this is not "
                          "one): move or remove it")
    m = fileio.read_manifest(path)
    if m is None or m.get("kind") != KIND:
        raise MQUserError(f"{path}: exists and is not an unfinished quantize mq-deploy wrote (mq-deploy keeps one "
                          "there): move or remove it")
    return m


class Partial:
    """OUT.partial, opened for one run (Partial.open): the committed state, and the writers that extend it."""

    def __init__(self, out_dir: str, inputs, fp: dict, blocks: int):
        self.out, self.path = out_dir, partial_path(out_dir)
        self.inputs, self.fp, self.blocks = list(inputs), fp, blocks
        self.files: dict = {}       # committed: name -> {"size", "sha256"}
        self.pending: dict = {}     # written since the last commit
        self.rec: dict = {"format": FORMAT, "fingerprint": fp, "blocks": blocks, "done": 0, "stats": False,
                          "state": None, "flags": None, "weight_map": {}, "config": None}
        self._lock = None
        self.resumed = False

    # -- opening ---------------------------------------------------------------------------------------
    @classmethod
    def open(cls, out_dir: str, inputs, fp: dict, blocks: int, *, resume: bool, overwrite: bool) -> Partial:
        """Continue OUT.partial (resume: refused, in one line, when it was made from other inputs or a file in it
        is damaged), replace it (overwrite), or create it."""
        self = cls(out_dir, inputs, fp, blocks)
        try:
            if os.path.lexists(self.path):
                fileio.check_output(self.path, inputs, "unfinished quantize folder")
                _ours(self.path)
                self._take_lock()
                self._sweep()
                if resume:
                    self._load()
                    self.resumed = True
                    note(f"--resume: {self.path} holds " + self._what() + " (every file checked); continuing")
                    return self
                if not overwrite:
                    precheck(out_dir, inputs, False, False)
                fileio.remove_dir(self.path, check=True)
                if os.path.lexists(self.path):
                    raise MQUserError(f"{self.path}: could not be removed entirely; remove it yourself")
                self._release_lock()
            fileio.create_marked_dir(self.path, KIND, self.rec, inputs=inputs, what="unfinished quantize folder")
            self._take_lock()
        except BaseException:
            self.close()
            raise
        return self

    def _take_lock(self):
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MQUserError(f"{self.path}: another mq-deploy quantize is writing it; wait for it to end, or stop "
                              "it") from None
        self._lock = fd

    def _release_lock(self):
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def close(self):
        self._release_lock()

    def _sweep(self):
        """Remove what a killed run wrote after its last commit: our temporaries, and shards and state files the
        marker does not record (only regular files with our names; anything else stays and is seen as foreign)."""
        fileio.sweep_stale(self.path)
        m = fileio.read_manifest(self.path)
        recorded = m.get("files") if m else None
        if not isinstance(recorded, dict):
            return
        for e in os.scandir(self.path):
            if _OURS.fullmatch(e.name) and e.name not in recorded and e.is_file(follow_symlinks=False):
                os.unlink(e.path)

    def _damaged(self, detail: str) -> MQUserError:
        return MQUserError(f"{self.path}: cannot be resumed: {detail}; remove it to start over")

    def _load(self):
        """The committed state, every field checked (it is read back: untrusted), every recorded file hashed."""
        m = fileio.read_manifest(self.path)
        if m is None or m.get("files") is None:
            raise self._damaged(f"its {fileio.MARKER} marker is not one mq-deploy wrote")
        rec = m.get("record")
        if not isinstance(rec, dict) or rec.get("format") != FORMAT:
            raise self._damaged(f"its {fileio.MARKER} marker holds no state this mq-deploy reads")
        why = difference(rec.get("fingerprint"), self.fp)
        if why is not None:
            raise MQUserError(f"{self.path}: was started from other inputs: {why}; --resume continues only the same "
                              "quantize (run without --resume and with --overwrite to start over)")
        n = self.blocks
        done, state, weight_map = rec.get("done"), rec.get("state"), rec.get("weight_map")
        ok = (rec.get("blocks") == n and isinstance(done, int) and not isinstance(done, bool) and 0 <= done <= n
              and isinstance(rec.get("stats"), bool) and isinstance(weight_map, dict)
              and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())
              and (state is None or (isinstance(state, str) and state in m["files"]))
              and (rec.get("flags") is None or isinstance(rec.get("flags"), dict))
              and (done == 0 or (isinstance(rec.get("config"), dict) and state is not None)))
        if not ok:
            raise self._damaged(f"the state in its {fileio.MARKER} marker is inconsistent")
        shards = {shard_name(k, n) for k in range(done)}
        if not set(weight_map.values()) <= shards or not shards <= set(m["files"]):
            raise self._damaged("its weight_map does not match the finished shards")
        if rec["stats"] and STATS not in m["files"]:
            raise self._damaged(f"{STATS} is not recorded")
        files = m["files"]
        for name, want in files.items():
            p = os.path.join(self.path, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                raise self._damaged(f"{name} is missing") from None
            if not stat.S_ISREG(st.st_mode) or st.st_size != want["size"]:
                raise self._damaged(f"{name} is {st.st_size} bytes, {want['size']} were written")
            if fileio.sha256_file(p) != want["sha256"]:
                raise self._damaged(f"{name} is not what was written (sha256 differs)")
        self.files, self.rec = dict(files), rec

    # -- the committed state ---------------------------------------------------------------------------
    @property
    def done(self) -> int:
        return self.rec["done"]

    def load_tensors(self, name: str) -> dict:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(os.path.join(self.path, name))
        except (OSError, SafetensorError) as e:
            raise self._damaged(f"{name} cannot be read ({e})") from None

    def state(self) -> dict:
        return self.load_tensors(self.rec["state"]) if self.rec["state"] else {}

    # -- writing ---------------------------------------------------------------------------------------
    def write(self, name: str, tensors: dict, metadata: dict | None = None) -> None:
        """One safetensors file into the folder (temporary, fsync, rename); recorded at the next commit. A full
        disk or any write error is one line naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        p = os.path.join(self.path, name)
        with fileio.atomic_path(p, inputs=self.inputs, what="file") as tmp:
            try:
                save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            except SafetensorError as e:
                text = str(e)
                if any(os.strerror(c) in text for c in fileio._WRITE_ERRNOS):
                    raise                     # fileio says it in one line, naming the file
                raise MQUserError(f"{p}: cannot write it ({text})") from None
        self.pending[name] = {"size": os.path.getsize(p), "sha256": fileio.sha256_file(p)}

    @contextlib.contextmanager
    def write_rows(self, name: str, shapes: dict, metadata: dict | None = None):
        """One safetensors file of float32 tensors (`shapes`: name -> shape) written a block of rows at a time: yields
        put(tensor, start, rows), which writes `rows` as rows [start, start + len(rows)) of `tensor`; every row must be
        put before the block ends. Temporary, fsync, rename and record as write(); nothing of a tensor is held whole
        (a vocabulary-sized embedding and head: 7.8 GiB at Mamba2-8B's 256000 x 4096)."""
        p = os.path.join(self.path, name)
        header, offset = ({"__metadata__": dict(metadata)} if metadata else {}), 0
        for k, shape in shapes.items():
            size = 4 * int(torch.Size(shape).numel())
            header[k] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        base = 8 + len(text)
        written = {k: 0 for k in shapes}
        with fileio.atomic_path(p, inputs=self.inputs, what="file") as tmp:
            with open(tmp, "wb") as f:
                f.write(len(text).to_bytes(8, "little") + text)
                f.truncate(base + offset)

                def put(k, start, rows):
                    rows = rows.detach().to(torch.float32).contiguous()
                    shape = shapes[k]
                    if tuple(rows.shape[1:]) != tuple(shape[1:]) or not 0 <= start <= start + len(rows) <= shape[0]:
                        raise MQInternalError(f"write_rows: rows {tuple(rows.shape)} at {start} do not fit {k} {shape}")
                    f.seek(base + header[k]["data_offsets"][0] + 4 * start * int(torch.Size(shape[1:]).numel()))
                    f.write(rows.numpy().data)
                    written[k] += len(rows)

                yield put
            short = {k: n for k, n in written.items() if n != shapes[k][0]}
            if short:
                raise MQInternalError(f"write_rows: {name} got {short} rows of {({k: shapes[k][0] for k in short})}")
        self.pending[name] = {"size": os.path.getsize(p), "sha256": fileio.sha256_file(p)}

    def commit(self, tensors: dict, **record) -> None:
        """Write the state file of this commit (`tensors`) and the marker that records it with every file written
        since the last commit and `record`'s fields; then drop the state file it replaces."""
        old = self.rec["state"]
        name = _STATE.format(record.get("done", self.rec["done"]))   # done only grows: never the old one's name
        tensors = {**tensors, "rng.torch": torch.get_rng_state()}
        self.write(name, tensors)
        files = {**self.files, **self.pending}
        files.pop(old, None)
        rec = _normal({**self.rec, **record, "state": name})
        fileio.write_marker(self.path, KIND, files, rec, self.inputs)
        self.files, self.pending, self.rec = files, {}, rec
        if old:
            try:
                os.unlink(os.path.join(self.path, old))
            except FileNotFoundError:
                pass

    def link_into(self, names, folder: str) -> None:
        """Put the finished shards `names` into `folder` (the output being written): hard links, or copies where
        the filesystem has none."""
        for name in names:
            src, dst = os.path.join(self.path, name), os.path.join(folder, name)
            try:
                os.link(src, dst)
            except OSError:
                fileio.copy_file(src, dst)

    def _what(self) -> str:
        n = self.blocks - 1
        if self.done > 1:
            return f"{self.done - 1} of {n} layers"
        if self.done:
            return f"the embedding and head (none of {n} layers)"
        return "the statistics pass" if self.rec["stats"] else "nothing finished yet"

    # -- the end -----------------------------------------------------------------------------------------
    def discard(self) -> None:
        """Remove the folder (the output is in place, or nothing in it can be resumed): its recorded files."""
        self.close()
        fileio.sweep_stale(self.path)
        self._sweep()
        kept = fileio.remove_dir(self.path, check=False)
        if kept and os.path.lexists(self.path):
            note(f"{self.path}: kept, it holds {kept[0]}, which mq-deploy did not write there")

    def after_failure(self, model_path: str) -> None:
        """A run that stopped (interrupted, killed by a signal we see, a full disk, an error): keep the folder when
        it holds finished work that --resume can continue (the checkpoint is as it was), with a note saying so;
        otherwise remove it."""
        self.close()
        if (self.done or self.rec["stats"]) and model_print(model_path) == self.fp["model"]:
            note(f"{self.path} keeps {self._what()}: run the same command with --resume to continue from there")
            return
        try:
            self.discard()
        except (OSError, MQUserError):
            pass


def shard_name(k: int, blocks: int) -> str:
    from mq_deploy.quant.streamed import SHARD

    return SHARD.format(k + 1, blocks)


__all__ = ["Partial", "partial_path", "precheck", "fingerprint", "difference", "KIND"]
