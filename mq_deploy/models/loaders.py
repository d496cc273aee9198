"""Checkpoint loading: format detection, safe readers, and the checks every format shares.

The format is detected from what the path holds:

| format      | what is there                                                                 |
|-------------|-------------------------------------------------------------------------------|
| mq-deploy   | config.json with "mq_deploy_format" + model.safetensors                       |
| hf-*        | config.json with a model_type (or architectures entry) a family registers      |
| mamba-ssm*  | config.json with d_model/n_layer/vocab_size (ssm_cfg.layer names the family)   |
| vim         | a .pth/.pt file (hustvl/Vim: {"model": state_dict, ...}), or a folder with one|

Each family's checkpoint formats (mq_deploy.families: config parsing and key maps, the only code that
knows other projects' parameter names) live in its own folder and use the readers here.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field

import torch

from mq_deploy.config import config_from_dict
from mq_deploy.errors import MQUserError
from mq_deploy.models.io import FORMAT_KEY, build_model, check_memory


@dataclass
class LoadedModel:
    model: torch.nn.Module
    format: str
    path: str
    config: object
    extra: dict

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def folder(self) -> str:
        return self.path if os.path.isdir(self.path) else os.path.dirname(self.path)

    @property
    def tokenizer_path(self) -> str | None:
        """The tokenizer.json that came with the checkpoint (None: none bundled)."""
        return confined_extra(self.folder, self.extra, "tokenizer")

    def data_path(self, key: str) -> str | None:
        """The checkpoint's default data (`eval_data`, `calib_data`): a path inside its folder; for a
        quantized checkpoint, the one its source model declares inside the source's folder."""
        own = confined_extra(self.folder, self.extra, key)
        if own is not None or not (self.extra or {}).get("source"):
            return own
        src = confined_extra(self.folder, self.extra, "source", confine=False)
        cfg_path = os.path.join(src, "config.json")
        if not os.path.isfile(cfg_path):
            return None          # the source model was moved: the caller asks for --data / --calib
        raw = read_json(cfg_path)
        if FORMAT_KEY not in raw:
            raise MQUserError(f"{shown(os.path.join(self.folder, 'config.json'))}: extra.source {src} is not an "
                              "mq-deploy model folder")
        return confined_extra(src, raw.get("extra"), key)


_EXTRA_PATHS = ("eval_data", "calib_data", "tokenizer", "source")


def confined_extra(folder: str, extra, key: str, confine: bool = True) -> str | None:
    """A path that a checkpoint's config.json names (read back, so untrusted): a relative path that stays
    inside `folder` once links are resolved, or one clear error. `confine=False` (a quantized
    checkpoint's pointer to its source model) only checks the type."""
    if extra is None:
        return None
    where = shown(os.path.join(folder, "config.json"))
    if not isinstance(extra, dict):
        raise MQUserError(f"{where}: 'extra' must be an object")
    rel = extra.get(key)
    if rel is None or rel == "":
        return None
    if not isinstance(rel, str) or "\0" in rel:
        raise MQUserError(f"{where}: extra.{key} must be a path (a string), got {rel!r}")
    path = os.path.normpath(os.path.join(folder, rel))
    if confine:
        real, base = os.path.realpath(path), os.path.realpath(folder)
        if os.path.isabs(rel) or not (real == base or real.startswith(base.rstrip(os.sep) + os.sep)):
            raise MQUserError(f"{where}: extra.{key} {rel!r} lies outside the model's folder; paths in a "
                              "checkpoint's config are confined to its folder (pass the file on the command line)")
    return path


# --- paths ---------------------------------------------------------------------------------------

def path_problem(path: str) -> str:
    """Why `path` cannot be opened, in words: no such file, broken symlink, symlink loop, permission..."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symlink loop (a link that points back to itself)"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return f"broken symlink (to {os.readlink(path)})"
        return (e.strerror or str(e)).lower()
    return "cannot be read"


def require_file(path: str) -> None:
    """MQUserError unless path is an existing regular file (named with the real reason)."""
    if not os.path.isfile(path):
        if os.path.isdir(path):
            raise MQUserError(f"{path}: is a directory, not a file")
        if os.path.exists(path):
            raise MQUserError(f"{path}: not a regular file")
        raise MQUserError(f"{path}: {path_problem(path)}")


@contextlib.contextmanager
def native_path(path: str):
    """A name for `path` that libraries taking UTF-8 strings (safetensors) can open.

    A file name with bytes that are not UTF-8 (Python keeps them as surrogate escapes) is opened here and
    handed over as /proc/self/fd/N, so it is read, not reported as a corrupt file."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        if not os.path.isdir("/proc/self/fd"):
            raise MQUserError(f"{os.fsencode(path)!r}: the file name is not valid UTF-8; rename it") from None
        fd = os.open(path, os.O_RDONLY)
        try:
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    yield path


def shown(path: str) -> str:
    """A path for messages: printable even when it is not UTF-8."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        return os.fsencode(path).decode("utf-8", errors="replace")


def weight_file(directory: str, name, listed_in: str | None = None) -> str:
    """directory/name, refused unless it stays inside the model folder.

    `name` comes from files we do not trust (a shard index): it must be a relative file name without
    "..", and after resolving symlinks it must lie inside the folder (or in the blobs/ store beside an
    HF hub cache snapshot, whose files are symlinks into ../../blobs)."""
    where = listed_in or directory
    if (not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name)
            or any(part == ".." for part in re.split(r"[\\/]", name))):
        raise MQUserError(f"{where}: weight file {name!r} is not a file name inside the model folder; refused")
    path = os.path.join(directory, name)
    root = os.path.realpath(directory)
    real = os.path.realpath(path)
    allowed = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    if not any(real == a or real.startswith(a + os.sep) for a in allowed):
        raise MQUserError(f"{where}: weight file {name!r} resolves to {real}, outside the model folder {root}; "
                          "refused")
    require_file(path)
    return path


# --- raw readers -----------------------------------------------------------------------------------

def read_json(path: str) -> dict:
    require_file(path)
    try:
        with open(path, "rb") as f:
            d = json.loads(f.read().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MQUserError(f"{shown(path)}: not valid JSON ({e})") from None
    except RecursionError:
        raise MQUserError(f"{shown(path)}: not valid JSON (nested too deeply)") from None
    except OSError as e:
        raise MQUserError(f"{shown(path)}: cannot read ({e.strerror})") from None
    if not isinstance(d, dict):
        raise MQUserError(f"{shown(path)}: expected a JSON object")
    return d


def read_safetensors(path: str) -> dict:
    """Every tensor of a (small) safetensors file, e.g. scales; models are read tensor by tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    require_file(path)
    try:
        with native_path(path) as p:
            return load_file(p)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise MQUserError(f"{shown(path)}: corrupt or truncated safetensors file ({e})") from None


# safetensors dtype names -> what they are; only float tensors are model weights
_FLOAT_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
_TORCH_FLOAT = {torch.float16, torch.bfloat16, torch.float32, torch.float64}


class TensorSource:
    """The tensors of a checkpoint, read one at a time: shapes and dtypes first (headers only), then data.

    Keeps peak memory at the model plus one tensor, and lets every shape be checked against the
    config before anything is allocated."""

    def __init__(self):
        self.shapes: dict = {}     # name -> tuple
        self.dtypes: dict = {}     # name -> str (e.g. "BF16", "torch.int8")
        self.origin: dict = {}     # name -> file, for messages

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (a vocabulary-sized embedding or head, a block at a time). Sources
        that can read a slice override it; this one reads the whole tensor."""
        return self.get(name)[start:stop]

    def rename(self, rules) -> "TensorSource":
        """Apply regex (pattern, replacement) rules to the names (first match wins)."""
        mapping = {}
        for k in list(self.shapes):
            new = k
            for pat, rep in rules:
                k2, n = re.subn(pat, rep, k)
                if n:
                    new = k2
                    break
            mapping[new] = k
        return _Renamed(self, mapping)

    def split_rows(self, pattern: str, parts) -> "TensorSource":
        """Every tensor whose name matches regex `pattern` (fused weights: Granite's input_linear holds gate and
        up) replaced by row slices: parts [(replacement name, fraction index, fraction count)], each the
        index-th of count equal row blocks. Shapes are checked before anything is read."""
        return _RowSplit(self, pattern, parts)

    def drop(self, name: str) -> None:
        for d in (self.shapes, self.dtypes, self.origin):
            d.pop(name, None)


class _Renamed(TensorSource):
    def __init__(self, base: TensorSource, mapping: dict):
        super().__init__()
        self.base, self.mapping = base, mapping
        for new, old in mapping.items():
            self.shapes[new], self.dtypes[new], self.origin[new] = base.shapes[old], base.dtypes[old], base.origin[old]

    def get(self, name):
        return self.base.get(self.mapping[name])

    def get_rows(self, name, start, stop):
        return self.base.get_rows(self.mapping[name], start, stop)


class _RowSplit(TensorSource):
    def __init__(self, base: TensorSource, pattern: str, parts):
        super().__init__()
        self.base, self.slices = base, {}
        for k in base.shapes:
            if not re.search(pattern, k):
                self.shapes[k], self.dtypes[k], self.origin[k] = base.shapes[k], base.dtypes[k], base.origin[k]
                continue
            rows = base.shapes[k][0] if base.shapes[k] else 0
            for rep, idx, count in parts:
                if rows % count:
                    raise MQUserError(f"{shown(base.origin[k])}: tensor {k} has {rows} rows, not {count} equal parts")
                new = re.sub(pattern, rep, k)
                n = rows // count
                self.slices[new] = (k, idx * n, (idx + 1) * n)
                self.shapes[new] = (n,) + tuple(base.shapes[k][1:])
                self.dtypes[new], self.origin[new] = base.dtypes[k], base.origin[k]

    def get(self, name):
        if name in self.slices:
            k, a, b = self.slices[name]
            return self.base.get(k)[a:b]
        return self.base.get(name)

    def get_rows(self, name, start, stop):
        if name in self.slices:
            k, a, b = self.slices[name]
            return self.base.get_rows(k, a + start, a + min(stop, b - a))
        return self.base.get_rows(name, start, stop)


class SafetensorsSource(TensorSource):
    def __init__(self, files):
        super().__init__()
        from safetensors import SafetensorError, safe_open

        self._files = {}
        for path in files:
            try:
                with native_path(path) as p, safe_open(p, framework="pt") as f:
                    for k in f.keys():
                        sl = f.get_slice(k)
                        if k in self.shapes:
                            raise MQUserError(f"{shown(path)}: tensor {k} is also in {shown(self.origin[k])}")
                        self.shapes[k] = tuple(sl.get_shape())
                        self.dtypes[k] = sl.get_dtype()
                        self.origin[k] = path
            except (SafetensorError, OSError, ValueError, RuntimeError) as e:
                raise MQUserError(f"{shown(path)}: corrupt or truncated safetensors file ({e})") from None

    def get(self, name):
        return self._read(name, None)

    def get_rows(self, name, start, stop):
        return self._read(name, (start, stop))

    def _read(self, name, rows):
        from safetensors import SafetensorError, safe_open

        path = self.origin[name]
        try:
            with native_path(path) as p, safe_open(p, framework="pt") as f:
                return f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise MQUserError(f"{shown(path)}: corrupt or truncated safetensors file ({e})") from None


class DictSource(TensorSource):
    def __init__(self, sd: dict, path: str):
        super().__init__()
        self._sd = sd
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise MQUserError(f"{shown(path)}: entry {k!r} of the state dict is a {type(v).__name__}, "
                                  "not a tensor")
            self.shapes[k], self.dtypes[k], self.origin[k] = tuple(v.shape), str(v.dtype), path

    def get(self, name):
        return self._sd[name]


def sharded_source(directory: str, index_name: str) -> SafetensorsSource:
    index_path = os.path.join(directory, index_name)
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise MQUserError(f"{index_path}: no weight_map")
    shards = []
    for shard in weight_map.values():     # every name is checked before any file is opened
        path = weight_file(directory, shard, index_path)
        if path not in shards:
            shards.append(path)
    src = SafetensorsSource(sorted(shards))
    missing = sorted(set(weight_map) - set(src.shapes))
    if missing:
        raise MQUserError(f"{index_path}: tensors listed there are in no shard: {missing[:5]}")
    return src


def read_torch_pickle(path: str):
    """torch.load with weights_only=True; argparse.Namespace (Vim/DeiT save their args) is allowed.

    Zip checkpoints are memory-mapped, so tensors are paged in as they are copied into the model."""
    require_file(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):   # legacy (non-zip) files cannot be mapped
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise MQUserError(f"{shown(path)}: refused to unpickle (only tensors and plain containers are loaded "
                          f"with weights_only=True): {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, UnicodeDecodeError) as e:
        raise MQUserError(f"{shown(path)}: corrupt or truncated checkpoint ({str(e).splitlines()[0]})") from None


# --- detection -------------------------------------------------------------------------------------

def _formats() -> dict:
    from mq_deploy.families import checkpoint_formats

    return {f.name: f for f in checkpoint_formats()}


def detect_format(path: str) -> str:
    if not os.path.exists(path):
        raise MQUserError(f"{shown(path)}: {path_problem(path)}")
    if os.path.isfile(path):
        if path.endswith((".pth", ".pt", ".bin")):
            return "vim"
        raise MQUserError(f"{shown(path)}: a model is a checkpoint directory or a Vim .pth file")
    if not os.path.isdir(path):
        raise MQUserError(f"{shown(path)}: not a regular file or a directory")
    cfg_path = os.path.join(path, "config.json")
    if os.path.lexists(cfg_path):
        cfg = read_json(cfg_path)
        if FORMAT_KEY in cfg:
            return "mq-deploy"
        formats = _formats().values()
        model_type, archs = cfg.get("model_type"), cfg.get("architectures") or []
        for f in formats:
            if model_type in f.hf_model_types:
                return f.name
        if model_type:       # a model_type we do not know is refused, whatever its architectures say
            known = sorted(t for f in formats for t in f.hf_model_types)
            raise MQUserError(f"{cfg_path}: unsupported model_type {model_type!r} (supported: {', '.join(known)}, "
                              "and Vision Mamba .pth checkpoints)")
        for a in archs if isinstance(archs, list) else []:
            for f in formats:
                if a in f.hf_architectures:
                    return f.name
        if {"d_model", "n_layer", "vocab_size"} <= set(cfg):
            ssm_cfg = cfg.get("ssm_cfg") or {}
            if not isinstance(ssm_cfg, dict):
                raise MQUserError(f"{cfg_path}: ssm_cfg must be an object")
            layer = ssm_cfg.get("layer", "Mamba1")
            for f in formats:
                if layer in f.ssm_layers:
                    return f.name
            known = sorted(v for f in formats for v in f.ssm_layers)
            raise MQUserError(f"{cfg_path}: ssm_cfg.layer {layer!r} is not supported (supported: {', '.join(known)})")
        if find_pth(path):   # Vim: the .pth holds the weights, config.json only img_size/stride/normalisation
            return "vim"
        raise MQUserError(f"{cfg_path}: cannot tell which model format this is "
                          "(not mq-deploy, HF transformers Mamba/FalconMamba, mamba-ssm or Vim)")
    if find_pth(path):
        return "vim"
    raise MQUserError(f"{path}: no config.json and no .pth checkpoint in this directory")


def find_pth(directory: str):
    cands = sorted(f for f in os.listdir(directory) if f.endswith((".pth", ".pt")))
    if len(cands) > 1:
        raise MQUserError(f"{directory}: several checkpoints ({', '.join(cands)}); name one file")
    return weight_file(directory, cands[0]) if cands else None


# --- state dict checks -----------------------------------------------------------------------------

def config_for(src: str, make):
    """Build a config; its validation errors name the file it came from."""
    try:
        return make()
    except MQUserError as e:
        raise MQUserError(f"{shown(src)}: {e}") from None
    except TypeError as e:   # unknown or missing field
        raise MQUserError(f"{shown(src)}: invalid config ({e})") from None


def json_flag(c: dict, key: str, default: bool, src: str) -> bool:
    """A boolean read from someone else's config: a JSON boolean, or one clear error ("false" as a
    string is truthy and would silently mean true)."""
    v = c.get(key, default)
    if not isinstance(v, bool):
        raise MQUserError(f"{shown(src)}: {key} must be true or false (a JSON boolean), got {v!r}")
    return v


def eos_token(c: dict, vocab) -> int | None:
    """An HF config's eos_token_id (the first of a list) when it is a token id of the vocabulary."""
    eos = c.get("eos_token_id")
    if isinstance(eos, list) and eos:
        eos = eos[0]
    if isinstance(eos, int) and not isinstance(eos, bool) and isinstance(vocab, int) and 0 <= eos < vocab:
        return eos
    return None


def hf_tensor_source(path: str, what: str):
    """(file named in messages, TensorSource) of an HF transformers folder: model.safetensors, a sharded
    index, or pytorch_model.bin."""
    if os.path.lexists(os.path.join(path, "model.safetensors")):
        src = weight_file(path, "model.safetensors")
        return src, SafetensorsSource([src])
    if os.path.lexists(os.path.join(path, "model.safetensors.index.json")):
        return os.path.join(path, "model.safetensors.index.json"), sharded_source(path, "model.safetensors.index.json")
    if os.path.lexists(os.path.join(path, "pytorch_model.bin")):
        src = weight_file(path, "pytorch_model.bin")
        sd = read_torch_pickle(src)
        if not isinstance(sd, dict):
            raise MQUserError(f"{src}: expected a state dict")
        return src, DictSource(sd, src)
    raise MQUserError(f"{path}: {what} directory without model.safetensors, its index, or pytorch_model.bin")


def mamba_ssm_tensor_source(path: str):
    """(file, TensorSource) of a mamba-ssm folder (pytorch_model.bin, or model.safetensors), keys without
    the `backbone.` prefix."""
    for name in ("pytorch_model.bin", "model.safetensors"):
        if os.path.lexists(os.path.join(path, name)):
            src = weight_file(path, name)
            break
    else:
        raise MQUserError(f"{path}: mamba-ssm directory without pytorch_model.bin")
    if src.endswith(".bin"):
        sd = read_torch_pickle(src)
        if not isinstance(sd, dict):
            raise MQUserError(f"{src}: expected a state dict")
        tensors = DictSource(sd, src)
    else:
        tensors = SafetensorsSource([src])
    return src, tensors.rename([(r"^backbone\.", "")])


def check_mamba_ssm_backbone(c: dict, cfg_path: str) -> None:
    """What mamba-ssm's MixerModel may hold that a pure SSM LM of ours has not."""
    if c.get("attn_layer_idx"):
        raise MQUserError(f"{cfg_path}: hybrid attention layers (attn_layer_idx) are not supported")
    if c.get("d_intermediate", 0):
        raise MQUserError(f"{cfg_path}: MLP blocks (d_intermediate > 0) are not supported")
    if not json_flag(c, "rms_norm", True, cfg_path):
        raise MQUserError(f"{cfg_path}: LayerNorm models (rms_norm false) are not supported, only RMSNorm")


def padded_vocab(c: dict, cfg_path: str) -> int:
    """mamba-ssm's vocabulary: vocab_size rounded up to pad_vocab_size_multiple (the embedding's rows)."""
    vocab = c.get("vocab_size")
    pad = c.get("pad_vocab_size_multiple", 1) or 1
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (vocab, pad)):
        raise MQUserError(f"{cfg_path}: vocab_size and pad_vocab_size_multiple must be positive integers")
    return vocab + (pad - vocab % pad) % pad


def layer_count(names) -> int:
    idx = [int(m.group(1)) for k in names if (m := re.match(r"layers\.(\d+)\.", k))]
    return 1 + max(idx) if idx else 0


def _config_label(cfg, cfg_source: str | None) -> str:
    """What the config says the model is, for a mismatch message: its model_type (if the file has one) and the
    mixer family it was read as."""
    from mq_deploy.families import family_of

    names = sorted({family_of(m).name for m in cfg.layer_configs()})
    label = f"a {names[0]} model" if len(names) == 1 else f"a hybrid model ({', '.join(names)})"
    if cfg_source and cfg_source.endswith(".json"):
        try:
            with open(cfg_source, "rb") as f:
                mt = json.loads(f.read()).get("model_type")
            if isinstance(mt, str):
                label = f"model_type {mt!r}, {label}"
        except (OSError, ValueError, AttributeError):
            pass
    return label


_LAZY: list = []       # load_model(lazy=True) is running: load_into returns the model on the meta device


@dataclass
class LazyWeights:
    """What a lazily loaded model (load_model(lazy=True)) reads its tensors from, module by module
    (materialize); every name, shape and dtype was checked when it was built."""
    src: TensorSource
    expected: dict       # parameter / buffer name -> shape
    quant: dict | None
    rotations: dict = field(default_factory=dict)    # the online rotations, one per width, shared by the layers


def load_into(cfg, src: TensorSource, source: str, cfg_source: str | None = None, quant: dict | None = None):
    """Check every name, shape and dtype of `src` against what `cfg` implies, then allocate the model
    and copy the tensors in one at a time (converted to float32). Under load_model(lazy=True): the model
    stays on the meta device with its LazyWeights in `model.lazy_weights` (materialize reads a module in)."""
    n_ckpt = layer_count(src.shapes)
    if cfg.n_layer != n_ckpt:   # before building even the shapes: n_layer sizes the module list
        raise MQUserError(f"{shown(cfg_source or source)}: the config has {cfg.n_layer} layers, the weights in "
                          f"{shown(source)} have {n_ckpt}")
    with torch.device("meta"):     # shapes only: a config asking for 10^9 channels allocates nothing here
        model = build_model(cfg)
        if quant is not None:
            _add_transform_buffers(model, quant)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tied = getattr(cfg, "tie_embeddings", False)
    if tied:
        expected.pop("lm_head.weight", None)
        src.drop("lm_head.weight")
    for k in [k for k in src.shapes if k.endswith(".mixer.out_rotation") and quant is not None]:
        src.drop(k)   # earlier mq-deploy checkpoints stored the (rebuilt) Hadamard matrix in every layer
    missing = [k for k in expected if k not in src.shapes]
    unexpected = [k for k in src.shapes if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensors (e.g. {', '.join(unexpected[:3])})")
        raise MQUserError(f"{shown(source)}: state dict does not match its config ({_config_label(cfg, cfg_source)}): "
                          + "; ".join(parts))
    for k, shape in expected.items():
        if tuple(src.shapes[k]) != shape:
            raise MQUserError(f"{shown(src.origin[k])}: tensor {k} has shape {tuple(src.shapes[k])}, "
                              f"the config{' in ' + shown(cfg_source) if cfg_source else ''} "
                              f"({_config_label(cfg, cfg_source)}) implies {shape}")
    for k, dt in src.dtypes.items():
        if dt not in _FLOAT_DTYPES and dt not in {str(t) for t in _TORCH_FLOAT}:
            raise MQUserError(f"{shown(src.origin[k])}: tensor {k} is stored as {dt}, not as floating point "
                              "(float16, bfloat16, float32 or float64); integer or packed weights of other "
                              "quantization tools are not read as values")
    if _LAZY:
        model.lazy_weights = LazyWeights(src, expected, quant)
        return model
    check_memory(model)
    model = model.to_empty(device="cpu")
    _fill(model, "", src, expected)
    if tied:
        model.lm_head.weight = model.embedding.weight
    if quant is not None and quant.get("online_out_rotation"):
        _set_out_rotations(model)
    return model


_FILL_BLOCK_BYTES = 256 << 20    # a larger tensor is read and copied a block of rows at a time (_fill)


def _finite(src: TensorSource, k: str, t: torch.Tensor) -> torch.Tensor:
    """t (tensor k of src, or rows of it), refused in one line when it holds NaN or Inf."""
    if not torch.isfinite(t).all():
        raise MQUserError(f"{shown(src.origin[k])}: tensor {k} holds NaN or Inf")
    return t


def _fill(module, prefix: str, src: TensorSource, expected: dict) -> None:
    """Copy the tensors named `prefix` + a name of `module`'s state into it (allocated), checking each is finite.
    A tensor past _FILL_BLOCK_BYTES (a vocabulary-sized embedding or head) goes a block of rows at a time, so its
    copy as read is never held beside it whole (Mamba2-8B's 256000 x 4096: 4 GiB each)."""
    params = dict(module.named_parameters(remove_duplicate=False))
    params.update(dict(module.named_buffers()))
    with torch.no_grad():
        for name, p in params.items():
            k = prefix + name
            if k not in expected:
                continue
            if p.dim() < 2 or p.numel() * p.element_size() <= _FILL_BLOCK_BYTES:
                blocks = [(None, None)]
            else:
                step = max(1, _FILL_BLOCK_BYTES // (p[0].numel() * p.element_size()))
                blocks = [(a, min(len(p), a + step)) for a in range(0, len(p), step)]
            for a, b in blocks:
                t = _finite(src, k, src.get(k) if a is None else src.get_rows(k, a, b))
                (p if a is None else p[a:b]).copy_(t)
                del t


def materialize(model, name: str) -> torch.nn.Module:
    """Read submodule `name` of a lazily loaded model ("layers.3", "embedding", "norm_f", "lm_head") from its
    checkpoint into memory (float32) and return it; release() gives its memory back."""
    lw: LazyWeights = model.lazy_weights
    module = model.get_submodule(name)
    module.to_empty(device="cpu")
    if name == "lm_head" and getattr(model.cfg, "tie_embeddings", False):
        _fill(module, "embedding.", lw.src, lw.expected)        # the tied head reads the embedding's rows
    else:
        _fill(module, name + ".", lw.src, lw.expected)
    if name.startswith("layers.") and lw.quant is not None:
        _check_kv_scales(module, lw.src.origin.get(next(iter(lw.expected)), "the checkpoint"))
        if lw.quant.get("online_out_rotation") and module.mixer.out_linear is not None:
            _set_out_rotation(module.mixer, lw.rotations)
    return module


STREAM_MODES = ("auto", "on", "off")
# --stream auto reads a model layer by layer from this size of float32 weights up (2**30: about 270M parameters);
# below it the whole model is held, as small models always were
STREAM_AUTO_BYTES = 1 << 30


def streams(path: str, mode: str = "auto", why_not: str | None = None) -> bool:
    """Whether a stage reads the LM at `path` layer by layer (load_model(lazy=True)): mode "on" (one line where it
    cannot; why_not: the stage's own reason, if any), "off", or "auto" (where it can, from STREAM_AUTO_BYTES of
    float32 weights up)."""
    if mode not in STREAM_MODES:
        raise MQUserError(f"--stream must be one of {', '.join(STREAM_MODES)}, got {mode!r}")
    if mode == "off":
        return False
    if why_not is None and detect_format(path) == "vim":
        why_not = "a Vision Mamba is held whole"
    lazy = None
    if why_not is None:
        try:
            lazy = load_model(path, lazy=True)
        except MQUserError as e:
            why_not = str(e)
    if lazy is None:
        if mode == "on":
            raise MQUserError(f"--stream on: {why_not}")
        return False
    return mode == "on" or 4 * sum(p.numel() for p in lazy.model.parameters()) >= STREAM_AUTO_BYTES


def materialize_ends(model) -> None:
    """Read a lazily loaded LM's embedding, final norm and head in (what runs besides its layers)."""
    materialize(model, "embedding")
    materialize(model, "norm_f")
    if getattr(model.cfg, "tie_embeddings", False):
        model.lm_head.weight = model.embedding.weight
    else:
        materialize(model, "lm_head")


def read_rows(model, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a lazily loaded LM's "embedding.weight" or "lm_head.weight" (a tied head: the
    embedding's) as float32, checked finite: a vocabulary-sized end a block at a time, as materialize() would
    give it whole."""
    lw: LazyWeights = model.lazy_weights
    key = "embedding.weight" if name == "lm_head.weight" and getattr(model.cfg, "tie_embeddings", False) else name
    return _finite(lw.src, key, lw.src.get_rows(key, start, stop)).to(torch.float32).contiguous()


def release(module: torch.nn.Module) -> None:
    """Give a materialized module's memory back (its tensors return to the meta device)."""
    module.to(device="meta")


# --- formats ---------------------------------------------------------------------------------------

def with_tokenizer(path: str, extra: dict) -> dict:
    """extra["tokenizer"]: a tokenizer.json beside the weights (relative to the folder, like eval_data)."""
    if "tokenizer" not in extra and os.path.isfile(os.path.join(path, "tokenizer.json")):
        extra = {**extra, "tokenizer": "tokenizer.json"}
    return extra


def _load_ours(path):
    cfg_path = os.path.join(path, "config.json")
    raw = read_json(cfg_path)
    extra = raw.pop("extra", {}) or {}
    if not isinstance(extra, dict):
        raise MQUserError(f"{cfg_path}: 'extra' must be an object")
    quant = raw.pop("quant", None)
    raw.pop(FORMAT_KEY, None)
    raw.pop("mq_deploy_version", None)
    cfg = config_for(cfg_path, lambda: config_from_dict(raw))
    if quant is not None:
        # a quantized checkpoint (mq_deploy.quant.qcheckpoint) carries the transforms' runtime buffers
        if not isinstance(quant, dict):
            raise MQUserError(f"{cfg_path}: 'quant' must be an object")
        extra = {**extra, "quant": quant}
    if os.path.lexists(os.path.join(path, SHARD_INDEX)):       # a layer-streamed quantize writes shards
        src_file = os.path.join(path, SHARD_INDEX)
        tensors = sharded_source(path, SHARD_INDEX)
    else:
        src_file = weight_file(path, "model.safetensors")
        tensors = SafetensorsSource([src_file])
    model = load_into(cfg, tensors, src_file, cfg_path, quant)
    if not _LAZY:
        _check_kv_scales(model, src_file)
    return model, cfg, with_tokenizer(path, extra)


SHARD_INDEX = "model.safetensors.index.json"


def _check_kv_scales(model, src_file: str) -> None:
    """The int8 KV caches' scales (kv_scale of an attention block with kv_cache int8) are read from the file:
    each must be finite and > 0, or the cache would hold garbage."""
    for name, m in model.named_modules():
        s = m._buffers.get("kv_scale") if hasattr(m, "_buffers") else None
        if s is not None and (not torch.isfinite(s).all() or (s <= 0).any()):
            raise MQUserError(f"{shown(src_file)}: {name}.kv_scale must be finite and > 0; the file was edited or "
                              "corrupted (quantize the model again)")


def _add_transform_buffers(model, quant: dict):
    for layer in model.layers:
        layer.mixer.family.module().add_runtime_buffers(layer.mixer, quant)


def _set_out_rotations(model) -> None:
    """The online rotation before out_proj of a quantized checkpoint: the normalised Hadamard matrix of
    out_proj's input width (not stored in the file), one tensor per width shared by every layer."""
    shared = {}
    for layer in model.layers:
        if layer.mixer.out_linear is not None:
            _set_out_rotation(layer.mixer, shared)


def _set_out_rotation(mixer, shared: dict | None = None) -> None:
    """One mixer's online rotation (the Hadamard matrix of out_proj's input width; `shared`: one per width)."""
    from mq_deploy.ops.hadamard import hadamard_matrix

    shared = {} if shared is None else shared
    n = mixer.out_linear.in_features
    if n not in shared:
        shared[n] = torch.from_numpy(hadamard_matrix(n)).to(torch.float32)
    mixer.register_buffer("out_rotation", shared[n], persistent=False)




def load_model(path: str, lazy: bool = False) -> LoadedModel:
    """Load any supported checkpoint into our PyTorch model (fp32, eval mode).

    bfloat16 / float16 / float64 weights are converted to float32 tensor by tensor, so peak memory is
    the float32 model plus one tensor. lazy: only check the checkpoint and build the model on the meta
    device; its modules are read in one at a time (materialize / release: a layer-streamed quantize), for
    the formats whose loader does nothing to the weights after reading them (CheckpointFormat.streamable)."""
    fmt = detect_format(path)
    if lazy:
        if fmt == "vim":
            raise MQUserError(f"{shown(path)}: a Vision Mamba is not read layer by layer (it is small; load it whole)")
        if fmt != "mq-deploy" and not _formats()[fmt].streamable:
            raise MQUserError(f"{shown(path)}: {fmt} checkpoints are not read layer by layer yet "
                              f"({_formats()[fmt].not_streamable})")
        _LAZY.append(True)
    try:
        model, cfg, extra = _load_ours(path) if fmt == "mq-deploy" else _formats()[fmt].load(path)
    except KeyError as e:
        where = os.path.join(path, "config.json") if os.path.isdir(path) else path
        raise MQUserError(f"{shown(where)}: {fmt} config is missing the field {e}") from None
    finally:
        if lazy:
            _LAZY.pop()
    if lazy and not hasattr(model, "lm_head"):
        raise MQUserError(f"{shown(path)}: a Vision Mamba is not read layer by layer (it is small; load it whole)")
    model.eval()
    return LoadedModel(model=model, format=fmt, path=path, config=cfg, extra=extra)
