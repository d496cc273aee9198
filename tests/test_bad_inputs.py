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
        lambda ws: [ws["d"] / "loader"], "the config in"),
    "LM config n_layer 10^9": (
        lambda ws: ["info", _lm_variant(ws, "huge_n", config={"n_layer": 10**9})],
        lambda ws: [ws["d"] / "loader"], "the config has 1000000000 layers"),
    "HF config with a bad field names config.json": (
        lambda ws: ["info", _hf_config(ws, {"num_hidden_layers": -3})],
        lambda ws: [ws["d"] / "loader"], "config.json: MambaLMConfig.n_layer must be a positive integer"),
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
