"""The bad-input catalogue: one row per case a user or an attacker tried (issue 10), each asserting the
exit code, a single-line message with no traceback, and that every input is unchanged and nothing
was left behind. Cases that need a real process (a pipe closed by `head`, SIGKILL, two concurrent
writers) follow the table.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

from mq_deploy.cli.main import main
from mq_deploy.models.io import save_model

from helpers import run_cli, small_lm, small_vim, tiny_exports


def _snapshot(paths) -> dict:
    """sha256 of every file under `paths` (and the listing), to prove nothing was touched."""
    out = {}
    for root in paths:
        root = str(root)
        if os.path.isfile(root) or os.path.islink(root):
            out[root] = _digest(root)
            continue
        for d, dirs, files in os.walk(root):
            dirs.sort()
            for f in sorted(files):
                p = os.path.join(d, f)
                out[p] = _digest(p)
    return out


def _digest(p):
    if os.path.islink(p):
        return "link:" + os.readlink(p)
    with open(p, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a byte LM and a Vim in our format, a text file, the tiny exports."""
    d = tmp_path_factory.mktemp("bad")
    lm = save_model(small_lm(vocab=256, d_model=32, d_model2=32), d / "models" / "lm")
    vim = save_model(small_vim(), d / "models" / "vim")
    (d / "unrelated.txt").write_text("a user's file next to the model folder\n")
    text = d / "text.txt"
    text.write_bytes(b"In the beginning God created the heaven and the earth. " * 60)
    ex = tiny_exports()
    huge = small_lm(vocab=256, d_model=32, d_model2=32)
    import torch
    with torch.no_grad():      # finite weights whose logits overflow float32 (the final norm's gain)
        huge.norm_f.weight.fill_(3e38)
    huge_dir = save_model(huge, d / "models" / "huge")
    return {"d": d, "lm": str(lm), "vim": str(vim), "text": str(text), "huge": str(huge_dir), **ex}


def _user_file(ws, name, content=b"user data"):
    p = ws["d"] / "files" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(content)
    return str(p)


# id: (argv builder(ws) -> argv, paths that must not change, needle in the message)
CASES = {
    # ---- data loss -------------------------------------------------------------------------------
    "quantize -o PARENT_OF_INPUT --overwrite": (
        lambda ws: ["quantize", ws["lm"], "-o", str(ws["d"] / "models"), "--overwrite", "--calib", ws["text"]],
        lambda ws: [ws["d"] / "models", ws["d"] / "unrelated.txt"], "holds the input"),
    "quantize -o the input --overwrite": (
        lambda ws: ["quantize", ws["lm"], "-o", ws["lm"], "--overwrite", "--calib", ws["text"]],
        lambda ws: [ws["lm"]], "input of this command"),
    "quantize -o into the input folder": (
        lambda ws: ["quantize", ws["lm"], "-o", os.path.join(ws["lm"], "q"), "--calib", ws["text"]],
        lambda ws: [ws["lm"]], "inside the input folder"),
    "quantize -o a user's folder --overwrite": (
        lambda ws: ["quantize", ws["lm"], "-o", os.path.dirname(_user_file(ws, "x")), "--overwrite",
                    "--calib", ws["text"]],
        lambda ws: [ws["d"] / "files"], "not written by mq-deploy"),
    "info --json onto the model's weights": (
        lambda ws: ["info", ws["lm"], "--json", os.path.join(ws["lm"], "model.safetensors")],
        lambda ws: [ws["lm"]], "input"),
    "info --json onto the weights --overwrite": (
        lambda ws: ["info", ws["lm"], "--json", os.path.join(ws["lm"], "model.safetensors"), "--overwrite"],
        lambda ws: [ws["lm"]], "inside the input folder"),
    "export -o over its input ONNX": (
        lambda ws: ["export", ws["lm_q"], "-o", os.path.join(ws["lm_q"], "model.safetensors"), "--overwrite"],
        lambda ws: [ws["lm_q"]], "inside the input folder"),
    "build --saveEngine its own input": (
        lambda ws: ["build", _copy(ws, "vim"), "--backend", "onnxruntime", "--int8",
                    "--saveEngine", str(ws["d"] / "copies" / "vim.onnx"), "--overwrite"],
        lambda ws: [ws["d"] / "copies"], "input of this command"),
    "export --overwrite onto a user's file": (
        lambda ws: ["export", ws["lm"], "-o", _user_file(ws, "notes.onnx"), "--overwrite"],
        lambda ws: [ws["d"] / "files"], "not written by mq-deploy"),
    "export --overwrite onto a symlink": (
        lambda ws: ["export", ws["lm"], "-o", _symlink(ws), "--overwrite"],
        lambda ws: [ws["d"] / "files"], "symbolic link"),
    # ---- tracebacks before -----------------------------------------------------------------------
    "quantize --abits 16": (
        lambda ws: ["quantize", ws["lm"], "-o", str(ws["d"] / "q16"), "--abits", "16", "--calib", ws["text"]],
        lambda ws: [ws["lm"]], "invalid choice: 16"),
    "--threads -1": (
        lambda ws: ["eval", ws["lm"], "--data", ws["text"], "--threads", "-1"],
        lambda ws: [ws["lm"]], "must be a positive integer, got -1"),
    "--threads 0": (
        lambda ws: ["eval", ws["lm"], "--data", ws["text"], "--threads", "0"],
        lambda ws: [ws["lm"]], "must be a positive integer, got 0"),
    "build --optShapes images:0x1x12x12": (
        lambda ws: ["build", ws["vim_onnx"], "--backend", "onnxruntime",
                    "--optShapes", "images:0x1x12x12"],
        lambda ws: [ws["vim_onnx"]], "must be >= 1"),
    "build --optShapes images:99999999x1x12x12": (
        lambda ws: ["build", ws["vim_onnx"], "--backend", "onnxruntime", "--optShapes", "images:99999999x1x12x12"],
        lambda ws: [ws["vim_onnx"]], "GiB"),
    "--json onto a folder": (
        lambda ws: ["info", ws["lm"], "--json", str(ws["d"] / "models"), "--overwrite"],
        lambda ws: [ws["d"] / "models"], "holds the input"),
    "--json onto an existing folder that is no input": (
        lambda ws: ["info", ws["lm"], "--json", os.path.dirname(_user_file(ws, "y")), "--overwrite"],
        lambda ws: [ws["d"] / "files"], "is a folder"),
    "export -o DIR/ (a folder, for a file)": (
        lambda ws: ["export", ws["lm_q"], "-o", str(ws["d"] / "newdir") + "/"],
        lambda ws: [ws["lm_q"]], "is a folder"),
    "quantize -o where the system refuses": (
        lambda ws: ["quantize", ws["lm"], "-o", "/proc/mq-deploy-test", "--calib", ws["text"]],
        lambda ws: [ws["lm"]], "cannot write there"),
    # ---- silent wrong results before -------------------------------------------------------------
    "eval of finite weights that overflow to NaN": (
        lambda ws: ["eval", ws["huge"], "--data", ws["text"], "--seq-len", "32", "--limit", "2"],
        lambda ws: [ws["huge"]], "not finite"),
    "build --optShapes with an unknown input": (
        lambda ws: ["build", ws["vim_onnx"], "--backend", "onnxruntime", "--optShapes", "pixels:1x1x12x12"],
        lambda ws: [ws["vim_onnx"]], "not an input"),
    "build --optShapes larger than --maxShapes": (
        lambda ws: ["build", ws["vim_onnx"], "--int8", "--plugins", _fake_plugin(ws), "--optShapes", "images:8x1x12x12",
                    "--maxShapes", "images:4x1x12x12"],
        lambda ws: [ws["vim_onnx"]], "min <= opt <= max"),
    "build (TensorRT) --optShapes with an unknown input": (
        lambda ws: ["build", ws["vim_onnx"], "--int8", "--plugins", _fake_plugin(ws), "--optShapes", "pixels:1x1x12x12"],
        lambda ws: [ws["vim_onnx"]], "--optShapes names pixels, which is not an input"),
    "generate --temperature -1": (
        lambda ws: ["generate", ws["lm_step"], "--prompt-ids", "1 2 3", "--temperature", "-1"],
        lambda ws: [ws["lm_step"]], "must be >= 0"),
    "generate --temperature nan": (
        lambda ws: ["generate", ws["lm_step"], "--prompt-ids", "1 2 3", "--temperature", "nan"],
        lambda ws: [ws["lm_step"]], "finite"),
    "generate --prompt on a full graph (nothing echoed)": (
        lambda ws: ["generate", ws["lm_onnx"], "--prompt", "In the beginning"],
        lambda ws: [ws["lm_onnx"]], "needs the decode-step graph"),
    # ---- messages --------------------------------------------------------------------------------
    "verify a foreign ONNX": (
        lambda ws: ["verify", _foreign_onnx(ws), "--reference", ws["lm_q"]],
        lambda ws: [ws["lm_q"]], "was not exported by mq-deploy"),
    "verify an LM export against a Vim": (
        lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["vim_q"]],
        lambda ws: [ws["vim_q"]], "verify an artifact against the checkpoint it was exported from"),
    "verify: a corrupt ONNX": (
        lambda ws: ["verify", _user_file(ws, "bad.onnx", b"\x08\x07garbage" * 10), "--reference", ws["lm_q"]],
        lambda ws: [ws["lm_q"]], "not a readable ONNX model"),
    # --- loaders and data (issue 9 session) ---
    "HF shard index pointing at ../x": (
        lambda ws: ["info", _hf_index(ws, "dotdot", "../outside.safetensors")],
        lambda ws: [ws["d"] / "loader"], "is not a file name inside the model folder; refused"),
    "HF shard index pointing at /etc/passwd": (
        lambda ws: ["info", _hf_index(ws, "abs", "/etc/passwd")],
        lambda ws: [ws["d"] / "loader"], "is not a file name inside the model folder; refused"),
    "HF shard that is a symlink out of the folder": (
        lambda ws: ["info", _hf_shard_link(ws)],
        lambda ws: [ws["d"] / "loader"], "outside the model folder"),
    "int8 tensor in a float checkpoint": (
        lambda ws: ["info", _lm_variant(ws, "int8", tensor=("layers.0.mixer.in_proj.weight", "int8"))],
        lambda ws: [ws["d"] / "loader"], "is stored as I8, not as floating point"),
    "norm_eps: -1": (
        lambda ws: ["info", _lm_variant(ws, "eps", config={"norm_eps": -1})],
        lambda ws: [ws["d"] / "loader"], "config.json: MambaLMConfig.norm_eps must be a finite number > 0"),
    "Vim image_std with a 0": (
        lambda ws: ["info", _vim_variant(ws, {"image_std": [0.0]})],
        lambda ws: [ws["d"] / "loader"], "image_std entries must be > 0"),
    "LM config d_model 10^9 (checked before allocating)": (
        lambda ws: ["info", _lm_variant(ws, "huge_d", config={"d_model": 10**9, "mixer": {"d_model": 10**9}})],
        lambda ws: [ws["d"] / "loader"], "MixerConfig.d_model must be in [1, 131072], got 1000000000"),
    "LM config n_layer 10^9": (
        lambda ws: ["info", _lm_variant(ws, "huge_n", config={"n_layer": 10**9})],
        lambda ws: [ws["d"] / "loader"], "MambaLMConfig.n_layer must be in [1, 1024], got 1000000000"),
    "HF config with a bad field names config.json": (
        lambda ws: ["info", _hf_config(ws, {"num_hidden_layers": -3})],
        lambda ws: [ws["d"] / "loader"], "config.json: MambaLMConfig.n_layer must be in [1, 1024], got -3"),
    "idx header whose dimensions overflow int64": (
        lambda ws: ["eval", ws["vim"], "--data", _idx_overflow(ws)],
        lambda ws: [ws["d"] / "loader"], "its header announces"),
    "a symlink loop as the model": (
        lambda ws: ["info", _loop(ws)],
        lambda ws: [ws["d"] / "loader"], "symlink loop"),
    "a corrupt tokenizer.json": (
        lambda ws: ["eval", ws["lm"], "--data", ws["text"], "--tokenizer",
                    _user_file(ws, "tokenizer.json", b'{"model": {"type": "BPE"}}')],
        lambda ws: [ws["d"] / "files"], "not a valid `tokenizers` tokenizer.json"),
    "an empty image folder": (
        lambda ws: ["eval", ws["vim"], "--data", _empty_dir(ws)],
        lambda ws: [ws["d"] / "loader"], "no images in it"),
}

# --- issue 20, by class: a case not listed here but of the same class must end the same way -----------
# class: an artifact's mq.* metadata is untrusted input (parsed once, config_from_dict + type checks, and
# checked against the graph's own input/output shapes)
_META = {
    "image_std a string": ("vim_onnx", {"image_std": "abc"}),
    "image_std 0": ("vim_onnx", {"image_std": [0.0]}),
    "image_std NaN": ("vim_onnx", {"image_std": [float("nan")]}),
    "image_std negative": ("vim_onnx", {"image_std": [-0.5]}),
    "image_mean Infinity": ("vim_onnx", {"image_mean": [float("inf")]}),
    "image_std of 3 entries for 1 channel": ("vim_onnx", {"image_std": [0.5, 0.5, 0.5]}),
    "img_size -5": ("vim_onnx", {"img_size": -5}),
    "img_size 10^9": ("vim_onnx", {"img_size": 10**9}),
    "num_classes other than the graph's": ("vim_onnx", {"num_classes": 1000}),
    "in_chans a string": ("vim_onnx", {"in_chans": "1"}),
    "n_layer 10^9": ("lm_step", {"n_layer": 10**9}),
    "d_inner 10^9": ("lm_step", {"mixer": {"d_inner": 10**9}}),
    "d_state other than the graph's": ("lm_step", {"mixer": {"d_state": 3}}),
    "vocab_size a float": ("lm_step", {"vocab_size": 256.0}),
    "an unknown config field": ("lm_step", {"layers_extra": 1}),
}
_RAW_META = {   # the metadata strings themselves
    "mq.config not JSON": ("vim_onnx", "mq.config", "{not json"),
    "mq.config a JSON list": ("vim_onnx", "mq.config", "[1, 2]"),
    "mq.kind unknown": ("vim_onnx", "mq.kind", "toaster"),
    "mq.kind lm on a Vim": ("vim_onnx", "mq.kind", "lm"),
    "mq.graph unknown": ("lm_step", "mq.graph", "sideways"),
    "mq.graph full on a step graph": ("lm_step", "mq.graph", "full"),
    "mq.tokenizer unknown": ("lm_step", "mq.tokenizer", "rot13"),
    "mq.quant not an object": ("lm_step", "mq.quant", "[8, 8]"),
    "mq.quant wbits a string": ("lm_step", "mq.quant", '{"recipe": "rtn", "wbits": "8", "abits": 8}'),
}


def _edited(ws, src_key, name, edit):
    """A copy of one of the tiny exports with `edit(model)` applied (made once)."""
    import onnx

    d = ws["d"] / "edited"
    d.mkdir(exist_ok=True)
    p = d / (name.replace(" ", "_").replace("/", "_") + ".onnx")
    if not p.exists():
        m = onnx.load(ws[src_key])
        edit(m)
        onnx.save(m, p)
    return str(p)


def _set_meta(model, key, value):
    for prop in model.metadata_props:
        if prop.key == key:
            prop.value = value
            return
    model.metadata_props.add(key=key, value=value)


def _meta_config(ws, name, src_key, change):
    def edit(m):
        cfg = json.loads(next(p.value for p in m.metadata_props if p.key == "mq.config"))
        for k, v in change.items():
            if isinstance(v, dict):
                cfg[k].update(v)
            else:
                cfg[k] = v
        _set_meta(m, "mq.config", json.dumps(cfg))     # NaN / Infinity as Python's json writes them
    return _edited(ws, src_key, "meta " + name, edit)


def _artifact_argv(ws, src_key, path):
    if src_key == "vim_onnx":
        return ["run", path, "--images", _npy(ws, "ok", np.zeros((2, 12, 12), np.uint8)), "--no-native"]
    return ["generate", path, "--prompt", "In the beginning", "--max-new-tokens", "4", "--no-native"]


for _name, (_key, _change) in _META.items():
    CASES[f"metadata: {_name}"] = (
        lambda ws, n=_name, k=_key, c=_change: _artifact_argv(ws, k, _meta_config(ws, n, k, c)),
        lambda ws: [ws["d"] / "edited"], "metadata")
for _name, (_key, _meta_key, _value) in _RAW_META.items():
    CASES[f"metadata: {_name}"] = (
        lambda ws, n=_name, k=_key, mk=_meta_key, v=_value:
            _artifact_argv(ws, k, _edited(ws, k, "raw " + n, lambda m: _set_meta(m, mk, v))),
        lambda ws: [ws["d"] / "edited"], "metadata")
CASES["metadata: a tokenizer with an empty vocabulary inside the artifact"] = (
    lambda ws: _artifact_argv(ws, "lm_step", _edited(ws, "lm_step", "empty tokenizer", lambda m: (
        _set_meta(m, "mq.tokenizer", "tokenizers"), _set_meta(m, "mq.tokenizer_json", json.dumps(_EMPTY_BPE))))),
    lambda ws: [ws["d"] / "edited"], "empty vocabulary")
CASES["verify: an artifact with image_std 0 (verify checks what run applies)"] = (
    lambda ws: ["verify", _meta_config(ws, "image_std 0", "vim_onnx", {"image_std": [0.0]}), "--reference",
                ws["vim_q"], "--data", _idx(ws, "ok", [0, 1, 2, 3])],
    lambda ws: [ws["d"] / "edited"], "image_std entries must be > 0")

# class: mq:: node attributes (and Q/DQ scales) are checked when the file is opened, whichever path runs
# (the function bodies would run a NaN scale silently; the native op refuses it)
_ATTRS = {
    "x_scale NaN": ("vim_onnx", "SelectiveScan", "x_scale", float("nan")),
    "x_scale inf": ("vim_onnx", "SelectiveScan", "x_scale", float("inf")),
    "delta_scale 0": ("vim_onnx", "SelectiveScan", "delta_scale", 0.0),
    "B_scale negative": ("vim_onnx", "SelectiveScan", "B_scale", -0.1),
    "C_scale missing": ("vim_onnx", "SelectiveScan", "C_scale", None),
    "state update conv_scale NaN": ("lm_step", "SelectiveStateUpdate", "conv_scale", float("nan")),
    "state update layer 99": ("lm_step", "SelectiveStateUpdate", "layer", 99),
}


def _attr_edit(op, attr, value):
    def edit(m):
        from onnx import helper

        node = next(n for n in m.graph.node if n.domain == "mq" and n.op_type == op)
        keep = [a for a in node.attribute if a.name != attr]
        del node.attribute[:]
        node.attribute.extend(keep)
        if value is not None:
            node.attribute.append(helper.make_attribute(attr, value))
    return edit


for _name, (_key, _op, _attr, _value) in _ATTRS.items():
    for _native in (False, True):
        CASES[f"node attribute: {_name}{' (native op library)' if _native else ' (function body)'}"] = (
            lambda ws, n=_name, k=_key, o=_op, a=_attr, v=_value, nat=_native:
                [x for x in _artifact_argv(ws, k, _edited(ws, k, "attr " + n, _attr_edit(o, a, v)))
                 if not (nat and x == "--no-native")],
            lambda ws: [ws["d"] / "edited"], "the file was edited or corrupted")
CASES["a QuantizeLinear / DequantizeLinear scale of NaN"] = (
    lambda ws: _artifact_argv(ws, "vim_onnx", _edited(ws, "vim_onnx", "dq nan", _dq_scale_nan)),
    lambda ws: [ws["d"] / "edited"], "non-finite")


def _dq_scale_nan(m):
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    node = next(n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.input[1] in inits)
    t = inits[node.input[1]]
    a = numpy_helper.to_array(t).copy()
    a.flat[0] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, t.name))


# class: arrays given as data (.npy for run and verify): empty, wrongly typed or shaped, unreadable
_RUN_NPY = {
    "empty 1-D": np.zeros((0,), np.uint8),
    "no images [0, 12, 12]": np.zeros((0, 12, 12), np.uint8),
    "a zero-sized picture [2, 0, 12]": np.zeros((2, 0, 12), np.uint8),
    "float pixels": np.zeros((2, 12, 12), np.float32),
    "bool pixels": np.zeros((2, 12, 12), bool),
    "5-D": np.zeros((2, 1, 1, 12, 12), np.uint8),
    "1-D": np.zeros((12,), np.uint8),
    "the wrong picture size": np.zeros((2, 20, 20), np.uint8),
    "truncated file": b"\x93NUMPY\x01\x00v\x00{'descr': '|u1', 'fortran_order': False, 'shape': (9, 12, 12), }",
    "an object array": np.array([None, 1], dtype=object),
}
_VERIFY_NPY = {
    "empty [0, 5]": np.zeros((0, 5), np.int64),
    "windows of one token [3, 1]": np.zeros((3, 1), np.int64),
    "float ids": np.zeros((2, 5), np.float32),
    "negative ids": np.full((2, 5), -1, np.int64),
    "ids past the vocabulary": np.full((2, 5), 256, np.int64),
    "1-D ids": np.zeros((5,), np.int64),
    "3-D ids": np.zeros((1, 2, 5), np.int64),
    "truncated file": b"\x93NUMPY\x01\x00v\x00{'descr': '<i8', 'fortran_order': False, 'shape': (9, 12), }",
}


def _npy(ws, name, value):
    d = ws["d"] / "npy"
    d.mkdir(exist_ok=True)
    p = d / (name.replace(" ", "_").replace("/", "_") + ".npy")
    if not p.exists():
        if isinstance(value, bytes):
            p.write_bytes(value.ljust(127) + b"\n" + b"\x00" * 10)
        else:
            np.save(p, value, allow_pickle=value.dtype == object)
    return str(p)


for _name, _value in _RUN_NPY.items():
    CASES[f"run --images .npy: {_name}"] = (
        lambda ws, n=_name, v=_value: ["run", ws["vim_onnx"], "--images", _npy(ws, "run " + n, v)],
        lambda ws: [ws["d"] / "npy", ws["vim_onnx"]], ".npy")
for _name, _value in _VERIFY_NPY.items():
    CASES[f"verify --data .npy: {_name}"] = (
        lambda ws, n=_name, v=_value: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"], "--data",
                                       _npy(ws, "verify " + n, v)],
        lambda ws: [ws["d"] / "npy", ws["lm_q"]], ".npy")

# class: labels are checked against the model's classes where they are scored
CASES["run: idx labels past the model's classes"] = (
    lambda ws: ["run", ws["vim_onnx"], "--images", _idx(ws, "bad", [0, 1, 12, 3])],
    lambda ws: [ws["d"] / "idx"], "outside the model's 7 classes")
CASES["verify: idx labels past the model's classes"] = (
    lambda ws: ["verify", ws["vim_onnx"], "--reference", ws["vim_q"], "--data", _idx(ws, "bad", [0, 1, 12, 3])],
    lambda ws: [ws["d"] / "idx"], "out of range for 7 classes")
CASES["run --class-names of the wrong length (before any work)"] = (
    lambda ws: ["run", ws["vim_onnx"], "--images", _idx(ws, "ok", [0, 1, 2, 3]), "--class-names", "a,b"],
    lambda ws: [ws["d"] / "idx"], "the model has 7 classes")


def _idx(ws, name, labels):
    from mq_deploy.data.images import write_idx

    d = ws["d"] / "idx" / name
    if not d.exists():
        d.mkdir(parents=True)
        write_idx(str(d / "t10k-images-idx3-ubyte.gz"), np.random.default_rng(0).integers(0, 255, (len(labels), 12, 12)))
        write_idx(str(d / "t10k-labels-idx1-ubyte.gz"), np.asarray(labels, np.uint8))
    return str(d)


# class: degenerate tokenizer.json files (read from --tokenizer or from an artifact)
_EMPTY_BPE = {"version": "1.0", "added_tokens": [], "model": {"type": "BPE", "vocab": {}, "merges": []}}
_TOKENIZERS = {
    "an empty BPE vocabulary": (_EMPTY_BPE, "empty vocabulary"),
    "an empty Unigram vocabulary": ({"version": "1.0", "model": {"type": "Unigram", "unk_id": None, "vocab": []}},
                                    "empty vocabulary"),
    "a WordLevel model whose unknown token is missing": (
        {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "zz"}},
        "the tokenizer cannot encode this text"),
    "a tokenizer.json that is JSON null": (None, "not a valid `tokenizers` tokenizer.json"),
    "a tokenizer.json that is a JSON list": ([1, 2], "not a valid `tokenizers` tokenizer.json"),
    "ids past the model's vocabulary": (
        {"version": "1.0", "model": {"type": "WordLevel", "vocab": {"a": 0, "[UNK]": 5000}, "unk_token": "[UNK]"}},
        "embeds only 256 tokens"),
}
for _name, (_tok, _needle) in _TOKENIZERS.items():
    CASES[f"eval --tokenizer: {_name}"] = (
        lambda ws, n=_name, t=_tok: ["eval", ws["lm"], "--data", ws["text"], "--tokenizer",
                                     _user_file(ws, "tok_" + n.replace(" ", "_") + ".json", json.dumps(t).encode())],
        lambda ws: [ws["d"] / "files"], _needle)
    CASES[f"generate --tokenizer: {_name}"] = (
        lambda ws, n=_name, t=_tok: ["generate", ws["lm_step"], "--prompt", "In the beginning", "--tokenizer",
                                     _user_file(ws, "tok_" + n.replace(" ", "_") + ".json", json.dumps(t).encode())],
        lambda ws: [ws["d"] / "files"], _needle)

# class: numeric flags are range-checked where each flag group is declared (before any work)
_FLAGS = {
    "generate --seed -1": (lambda ws: ["generate", ws["lm_step"], "--prompt-ids", "1 2", "--seed", "-1"],
                           "from 0 to 4294967295"),
    "generate --seed 2^40": (lambda ws: ["generate", ws["lm_step"], "--prompt-ids", "1 2", "--seed", str(2**40)],
                             "from 0 to 4294967295"),
    "quantize --seed -1": (lambda ws: ["quantize", ws["lm"], "-o", str(ws["d"] / "q_seed"), "--calib", ws["text"],
                                       "--seed", "-1"], "from 0 to 4294967295"),
    "generate --max-new-tokens 10^9": (lambda ws: ["generate", ws["lm_step"], "--prompt-ids", "1 2",
                                                   "--max-new-tokens", "1000000000"], "from 0 to 4096"),
    "generate --max-new-tokens -1": (lambda ws: ["generate", ws["lm_step"], "--prompt-ids", "1 2",
                                                 "--max-new-tokens", "-1"], "from 0 to 4096"),
    "generate --prompt X --prompt-ids 1": (lambda ws: ["generate", ws["lm_step"], "--prompt", "X", "--prompt-ids",
                                                       "1"], "not allowed with argument --prompt"),
    "generate with no prompt": (lambda ws: ["generate", ws["lm_step"]], "--prompt --prompt-ids"),
    "generate --threads 100000": (lambda ws: ["generate", ws["lm_step"], "--prompt-ids", "1", "--threads", "100000"],
                                  "per CPU"),
    "run --threads 100000": (lambda ws: ["run", ws["vim_onnx"], "--images", _idx(ws, "ok", [0, 1, 2, 3]),
                                         "--threads", "100000"], "per CPU"),
    "verify --threads 100000": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"], "--threads",
                                            "100000"], "per CPU"),
    "eval --threads 100000": (lambda ws: ["eval", ws["lm"], "--data", ws["text"], "--threads", "100000"], "per CPU"),
    "quantize --threads 100000": (lambda ws: ["quantize", ws["lm"], "-o", str(ws["d"] / "q_thr"), "--calib",
                                              ws["text"], "--threads", "100000"], "per CPU"),
    "run --show -3": (lambda ws: ["run", ws["vim_onnx"], "--images", _idx(ws, "ok", [0, 1, 2, 3]), "--show", "-3"],
                      "must be an integer >= 0"),
    "verify --min-cosine -5": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"], "--min-cosine", "-5"],
                               "--min-cosine must be"),
    "verify --min-cosine 1.5": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"], "--min-cosine",
                                            "1.5"], "--min-cosine must be"),
    "verify --min-top1-agreement 2": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"],
                                                  "--min-top1-agreement", "2"], "--min-top1-agreement must be"),
    "verify --min-top1-agreement -1": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"],
                                                   "--min-top1-agreement", "-1"], "--min-top1-agreement must be"),
    "verify --max-metric-delta -1": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"],
                                                 "--max-metric-delta", "-1"], "must be >= 0"),
    "verify --atol -0.1": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"], "--atol", "-0.1"],
                           "must be >= 0"),
    "verify --rtol nan": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"], "--rtol", "nan"],
                          "finite"),
    "verify --seq-len 1": (lambda ws: ["verify", ws["lm_onnx"], "--reference", ws["lm_q"], "--seq-len", "1"],
                           "--seq-len must be at least 2"),
}
for _name, (_argv, _needle) in _FLAGS.items():
    CASES[f"flag: {_name}"] = (_argv, lambda ws: [ws["d"] / "models"], _needle)


def _copy(ws, key):
    d = ws["d"] / "copies"
    d.mkdir(exist_ok=True)
    dst = d / "vim.onnx"
    if not dst.exists():
        shutil.copy(ws["vim_onnx"], dst)
    return str(dst)


def _symlink(ws):
    target = _user_file(ws, "target.onnx")
    link = ws["d"] / "files" / "link.onnx"
    if not os.path.islink(link):
        os.symlink(target, link)
    return str(link)


def _fake_plugin(ws):
    return _user_file(ws, "libmq_scan_trt.so", b"")


def _foreign_onnx(ws):
    import onnx
    from onnx import TensorProto, helper

    p = ws["d"] / "files" / "foreign.onnx"
    p.parent.mkdir(exist_ok=True)
    g = helper.make_graph([helper.make_node("Relu", ["input_ids"], ["logits"])], "g",
                          [helper.make_tensor_value_info("input_ids", TensorProto.FLOAT, ["b", 4])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 4])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], producer_name="someone-else")
    m.ir_version = 10
    onnx.save(m, p)
    return str(p)


# --- loaders and data (issue 9 session): builders of bad checkpoints -------------------------------
def _loader_dir(ws, name):
    d = ws["d"] / "loader" / name
    d.parent.mkdir(exist_ok=True)
    return d


def _hf_base(ws):
    """A sharded HF Mamba folder written by transformers (made once)."""
    base = ws["d"] / "loader" / "hf_base"
    if not base.exists():
        import torch
        import transformers

        base.parent.mkdir(exist_ok=True)
        m = transformers.MambaForCausalLM(transformers.MambaConfig(vocab_size=50, hidden_size=16,
                                                                   num_hidden_layers=2, state_size=4))
        import contextlib
        import io

        with contextlib.redirect_stderr(io.StringIO()):     # its progress bar is not our message
            m.to(torch.float32).save_pretrained(base, max_shard_size="20KB")
    return base


def _hf_index(ws, name, shard):
    d = _loader_dir(ws, "hf_" + name)
    if not d.exists():
        shutil.copytree(_hf_base(ws), d)
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        first = sorted(idx["weight_map"])[0]
        idx["weight_map"][first] = shard
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))
    return str(d)


def _hf_shard_link(ws):
    d = _loader_dir(ws, "hf_link")
    if not d.exists():
        shutil.copytree(_hf_base(ws), d)
        shard = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))[0]
        outside = ws["d"] / "loader" / "outside.safetensors"
        shutil.copy(d / shard, outside)
        os.remove(d / shard)
        os.symlink(outside, d / shard)
    return str(d)


def _hf_config(ws, change):
    d = _loader_dir(ws, "hf_cfg")
    if not d.exists():
        shutil.copytree(_hf_base(ws), d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(change)
        (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _lm_variant(ws, name, config=None, tensor=None):
    """Our LM folder with config.json fields changed, or one tensor stored in another dtype."""
    d = _loader_dir(ws, "lm_" + name)
    if not d.exists():
        shutil.copytree(ws["lm"], d)
        if config:
            cfg = json.loads((d / "config.json").read_text())
            for k, v in config.items():
                if isinstance(v, dict):
                    cfg[k].update(v)
                else:
                    cfg[k] = v
            (d / "config.json").write_text(json.dumps(cfg))
        if tensor:
            import torch
            from safetensors.torch import load_file, save_file

            sd = load_file(d / "model.safetensors")
            sd[tensor[0]] = (sd[tensor[0]] * 100).round().clamp(-127, 127).to(getattr(torch, tensor[1]))
            save_file(sd, d / "model.safetensors")
    return str(d)


def _vim_variant(ws, config):
    d = _loader_dir(ws, "vim_cfg")
    if not d.exists():
        shutil.copytree(ws["vim"], d)
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(config)
        (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def _idx_overflow(ws):
    import struct

    d = _loader_dir(ws, "idx_overflow")
    if not d.exists():
        d.mkdir()
        # 4 dimensions of 2^32 - 1: their product wraps around int64 (np.prod) to a small number
        (d / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 4]) + struct.pack(">IIII", *[2**32 - 1] * 4)
                                                   + b"\x00" * 64)
        (d / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">I", 1) + b"\x00")
    return str(d)


def _loop(ws):
    p = ws["d"] / "loader" / "loop"
    p.parent.mkdir(exist_ok=True)
    if not os.path.islink(p):
        os.symlink(p, p)
    return str(p)


def _empty_dir(ws):
    d = _loader_dir(ws, "empty")
    d.mkdir(exist_ok=True)
    return str(d)


@pytest.fixture(scope="module")
def ws2(ws):
    ws = dict(ws)
    ws["vim_onnx"], ws["lm_onnx"] = ws["vim"], ws["lm"]     # tiny_exports' ONNX files
    ws["vim"], ws["lm"] = str(ws["d"] / "models" / "vim"), str(ws["d"] / "models" / "lm")
    return ws


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, ws2, capsys):
    argv_of, paths_of, needle = CASES[case]
    argv = [str(a) for a in argv_of(ws2)]
    watched = [p for p in paths_of(ws2)]
    before = _snapshot(watched)
    code = main(argv)
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert code == 2, (code, cap.err, cap.out)
    assert "Traceback" not in cap.err
    assert len(err.splitlines()) == 1, err          # one clear line
    assert needle in err, err
    if argv[0] == "generate":
        assert not cap.out, cap.out                 # a refused generation prints nothing (not even the prompt)
    assert _snapshot(watched) == before             # inputs and their neighbours untouched
    leftovers = [p for p in _snapshot([ws2["d"]]) if ".mq-tmp-" in p]
    assert not leftovers, leftovers


# ---- cases that need real processes ---------------------------------------------------------------

def test_generate_into_a_closed_pipe(ws2):
    """`mq-deploy generate ... | head -c 5`: the reader leaves; no BrokenPipeError traceback."""
    cmd = [sys.executable, "-m", "mq_deploy", "generate", ws2["lm_step"], "--prompt-ids", "1 2 3",
           "--max-new-tokens", "400", "--ids"]
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    gen.stdout.read(5)
    gen.stdout.close()           # what `head` does after its bytes
    err = gen.stderr.read().decode()
    gen.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert gen.returncode in (0, 141), (gen.returncode, err)


def test_stale_temporaries_of_a_killed_export_are_swept(ws2, tmp_path):
    """A SIGKILL leaves `.NAME.mq-tmp-PID-*` behind; the next write into that folder removes it (the
    process is gone), and never a temporary of a live process."""
    out = tmp_path / "m.onnx"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stale = tmp_path / f".m.onnx.mq-tmp-{proc.pid}-deadbeef"
    stale.write_bytes(b"half an onnx")
    live = tmp_path / f".other.mq-tmp-{os.getpid()}-cafe"
    live.write_bytes(b"being written")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert main(["export", ws2["lm_q"], "-o", str(out)]) == 0
    assert out.is_file() and not stale.exists() and live.exists()


def test_sigkill_mid_export_leaves_only_a_recognisable_temporary(ws2, tmp_path):
    out = tmp_path / "m.onnx"
    code = ("import time\n"
            "import mq_deploy.export.exporter as ex\n"
            "import mq_deploy.export.onnx_file as of\n"
            "real = of.write_model\n"
            "def slow(*a, **k):\n"
            "    real(*a, **k); print('saved', flush=True); time.sleep(60)\n"
            "of.write_model = slow\n"
            f"ex.export({ws2['lm_q']!r}, {str(out)!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saved"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    names = os.listdir(tmp_path)
    assert not out.exists() and names and all(".mq-tmp-" in n for n in names), names
    assert main(["export", ws2["lm_q"], "-o", str(out)]) == 0
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_two_concurrent_exports_one_wins(ws2, tmp_path):
    out = tmp_path / "m.onnx"
    procs = [subprocess.Popen([sys.executable, "-m", "mq_deploy", "export", ws2["lm_q"], "-o", str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes == [0, 2], results
    assert "already exists" in next(e for c, e in results if c == 2)
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_overwrite_leaves_no_old_file(ws2, tmp_path):
    out = tmp_path / "m.onnx"
    assert main(["export", ws2["lm_q"], "-o", str(out)]) == 0
    first = out.stat().st_ino
    assert main(["export", ws2["lm_q"], "-o", str(out), "--overwrite"]) == 0
    assert os.listdir(tmp_path) == ["m.onnx"] and out.stat().st_ino != first
    q = tmp_path / "q"
    args = ["quantize", ws2["lm"], "-o", str(q), "--calib", ws2["text"], "--calib-samples", "2"]
    assert main(args) == 0 and main(args + ["--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "q"]


def test_modes_follow_the_umask(ws2, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["export", ws2["lm_q"], "-o", str(tmp_path / "m.onnx")]) == 0
        assert main(["quantize", ws2["lm"], "-o", str(tmp_path / "q"), "--calib", ws2["text"],
                     "--calib-samples", "2"]) == 0
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "m.onnx").st_mode & 0o777) == oct(0o644)
    assert oct(os.stat(tmp_path / "q").st_mode & 0o777) == oct(0o755)
    assert oct(os.stat(tmp_path / "q" / "model.safetensors").st_mode & 0o777) == oct(0o644)


def test_usage_errors_are_one_line():
    r = run_cli("quantize")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "required" in r.stderr, r.stderr


def test_json_written_before_work_is_checked(ws2, tmp_path):
    """--json is checked before the export runs: no ONNX appears when the report cannot be written;
    missing folders of an output are created (mkdir -p) once the checks have passed."""
    out = tmp_path / "m.onnx"
    assert main(["export", ws2["lm_q"], "-o", str(out), "--json", os.path.join(ws2["lm_q"], "r.json")]) == 2
    assert not out.exists()
    rep = tmp_path / "no" / "r.json"
    assert main(["export", ws2["lm_q"], "-o", str(out), "--json", str(rep)]) == 0
    assert json.loads(rep.read_text())["path"] == str(out)
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "no"]


def _bad_op(m):
    next(n for n in m.graph.node if n.op_type == "Transpose").op_type = "NoSuchOp"


def test_onnx_runtime_adds_no_log_line_of_its_own(ws2, capfd):
    """ONNX Runtime logs a coloured line of its own (to the process's stderr, below Python) before it raises
    (here: a token id past the embedding, which only the runtime sees); we report the error ourselves, so
    nothing of ORT's reaches stderr, and a file it cannot load is our one line."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.errors import MQUserError

    runner = OrtRunner(ws2["lm_onnx"], custom_op_library=False)
    with pytest.raises(MQUserError, match="ONNX Runtime failed on inputs"):
        runner.infer({"input_ids": np.array([[1, 999]], np.int64)})
    err = capfd.readouterr().err
    assert err == "", err
    bad = _edited(ws2, "vim_onnx", "unknown op", _bad_op)
    code = main(["run", bad, "--images", _idx(ws2, "ok", [0, 1, 2, 3]), "--no-native"])
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "ONNX Runtime cannot load it" in err and "[E:" not in err, err


def test_a_generation_refused_after_the_checks_prints_nothing(ws2, monkeypatch, capsys):
    """The prompt is echoed only once the prefill has run: a failure there leaves stdout empty."""
    from mq_deploy.backends.ort.runner import OrtDecoder
    from mq_deploy.errors import MQUserError

    def failing_prefill(self, ids):
        raise MQUserError("ONNX Runtime failed on the prefill (simulated)")
    monkeypatch.setattr(OrtDecoder, "prefill", failing_prefill)
    code = main(["generate", ws2["lm_step"], "--prompt", "In the beginning", "--max-new-tokens", "3"])
    cap = capsys.readouterr()
    assert code == 2 and "simulated" in cap.err
    assert cap.out == "", cap.out
    monkeypatch.undo()
    assert main(["generate", ws2["lm_step"], "--prompt", "In the beginning", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("In the beginning")


@pytest.mark.parametrize("args, needle", [({"max_length": "abc"}, "max_length must be an integer"),
                                          ({"max_length": "1"}, "max_length must be at least 2"),
                                          ({"threads": "100000"}, "per CPU"),
                                          ({"threads": "0"}, "threads must be at least 1")])
def test_lm_eval_model_args_are_checked(ws2, args, needle):
    """lm-eval hands model_args over as strings: each is one clear line, not a ValueError traceback."""
    pytest.importorskip("lm_eval")
    from mq_deploy.errors import MQUserError
    from mq_deploy.lm_eval_adapter import MQDeployLM

    with pytest.raises(MQUserError, match=needle):
        MQDeployLM(path=ws2["lm_onnx"], **args)


def test_a_kv_cache_of_the_wrong_length_or_layout_is_refused_in_one_line(tmp_path):
    """A hybrid's step graph: every cache's 'past' length and every state's 'batch' must agree; a cache whose
    layout swaps heads and positions is refused on its fixed dimension. (ONNX Runtime ran mismatched past
    lengths without complaint: each layer concatenated its own cache.)"""
    transformers = pytest.importorskip("transformers")
    import torch

    from mq_deploy.backends.ort.runner import OrtRunner, empty_states
    from mq_deploy.errors import MQUserError
    from mq_deploy.export.exporter import export

    torch.manual_seed(0)
    cfg = transformers.NemotronHConfig(vocab_size=97, hidden_size=64, expand=2, chunk_size=8, conv_kernel=4,
                                       hybrid_override_pattern="M*M*", num_attention_heads=4, num_key_value_heads=2,
                                       head_dim=16, intermediate_size=128, mamba_num_heads=8, mamba_head_dim=16,
                                       ssm_state_size=16, n_groups=2)
    transformers.NemotronHForCausalLM(cfg).save_pretrained(tmp_path / "hf")
    export(str(tmp_path / "hf"), str(tmp_path / "s.onnx"), step=True)
    r = OrtRunner(str(tmp_path / "s.onnx"), custom_op_library=False)
    out = r.infer({"input_ids": np.array([[1, 2, 3]]), **empty_states(r, 1)})
    feeds = {"input_ids": np.array([[4]]), "conv_state": out["conv_state_out"], "ssm_state": out["ssm_state_out"]}
    feeds.update({f"past_{kv}_{i}": out[f"present_{kv}_{i}"] for kv in ("key", "value") for i in (1, 3)})
    r.infer(feeds)                                                    # consistent: runs
    cases = {
        "past_key_3": (feeds["past_key_3"][:, :, :2], "dimension 'past' is 3 in input past_key_1 but 2 in input "
                                                      "past_key_3"),
        "past_value_1": (np.concatenate([feeds["past_value_1"]] * 2), "dimension 'batch' is 1"),
        "past_value_3": (feeds["past_value_3"].transpose(0, 2, 1, 3).copy(), "past_value_3 dimension 1 must be 2"),
    }
    for name, (bad, want) in cases.items():
        with pytest.raises(MQUserError) as e:
            r.infer({**feeds, name: bad})
        msg = str(e.value)
        print(msg)
        assert want in msg and "\n" not in msg


def test_a_prompt_past_the_attention_layers_position_limit_is_refused(tmp_path, capsys):
    """An attention layer with max_positions: PyTorch (eval/verify) and generate on the ONNX step graph refuse
    a sequence past it in one line naming the limit."""
    import torch

    from mq_deploy.config import MambaLMConfig
    from mq_deploy.families.attention.config import AttentionConfig
    from mq_deploy.families.mamba2.config import Mamba2Config
    from mq_deploy.models.mamba import MambaLM

    cfg = MambaLMConfig(d_model=32, n_layer=2, vocab_size=256, layers=[
        Mamba2Config(d_model=32, d_state=8, head_dim=16, n_groups=1, chunk_size=8),
        AttentionConfig(d_model=32, n_heads=2, n_kv_heads=1, head_dim=16, rope_dim=16, max_positions=16)])
    model = MambaLM(cfg)
    model.reset_parameters(0)
    path = save_model(model, tmp_path / "m")
    step = tmp_path / "s.onnx"
    assert main(["export", str(path), "-o", str(step), "--decode-step"]) == 0
    capsys.readouterr()
    assert main(["generate", str(step), "--prompt-ids", "1,2,3", "--max-new-tokens", "13"]) == 0
    code = main(["generate", str(step), "--prompt-ids", "1,2,3", "--max-new-tokens", "14"])
    err = capsys.readouterr().err.strip()
    print(err)
    assert code == 2 and "limit of 16 positions" in err and "\n" not in err
    with pytest.raises(Exception, match="limit of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
