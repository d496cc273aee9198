"""`mq-deploy quantize --resume` (quant.partial, quant.streamed): a layer-streamed quantize stopped after block k (an
interrupt, SIGINT, SIGKILL, a full disk) keeps OUT.partial, and --resume finishes it with the bytes of an
uninterrupted run. Inputs that differ, a damaged partial folder, a folder that is not ours: one line each.

Equality is byte for byte (every shard, scales.safetensors, config.json, the index; manifest.json but for its
"created" time): the held stream is stored as the float32 tensor it was and the stats context as its float64
tensor, so each remaining block sees the inputs it would have seen; nothing is replayed.
"""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mq_deploy import fileio
from mq_deploy.cli.main import main
from mq_deploy.quant import partial as partial_mod

from conftest import SAMPLES
from helpers import assert_user_error

WINDOWS = ("--calib-samples", "2", "--seq-len", "64")
_REFS = {}


def _argv(sample, out, *flags):
    src = os.path.join(SAMPLES, sample)
    return ["quantize", src, "-o", str(out), "--calib", os.path.join(src, "data", "calib.txt"), *WINDOWS,
            "--stream", "on", *flags]


def _reference(tmp_path_factory, sample, *flags):
    """An uninterrupted run, once per (sample, flags) in this module."""
    key = (sample, flags)
    if key not in _REFS:
        out = tmp_path_factory.mktemp("ref") / "q"
        assert main(_argv(sample, out, *flags)) == 0
        _REFS[key] = out
    return _REFS[key]


def _same_bytes(ref, out):
    names = sorted(os.listdir(ref))
    assert names == sorted(os.listdir(out))
    for name in names:
        a, b = (ref / name).read_bytes(), (out / name).read_bytes()
        if name == "manifest.json":
            a, b = json.loads(a), json.loads(b)
            a.pop("created"), b.pop("created")
        elif name == fileio.MARKER:
            a = {k: v for k, v in json.loads(a)["files"].items() if k != "manifest.json"}
            b = {k: v for k, v in json.loads(b)["files"].items() if k != "manifest.json"}
        assert a == b, name


def _record(out):
    return json.loads((out.parent / (out.name + ".partial") / fileio.MARKER).read_text())["record"]


def _stop_after(monkeypatch, done):
    """KeyboardInterrupt (what SIGINT raises) right after block `done` - 1 is committed."""
    commit = partial_mod.Partial.commit

    def stop(self, tensors, **record):
        commit(self, tensors, **record)
        if self.rec["done"] == done:
            raise KeyboardInterrupt
    monkeypatch.setattr(partial_mod.Partial, "commit", stop)


@pytest.mark.parametrize("sample,flags,done", [
    ("mamba-byte-lm", (), 0),                                           # only the statistics pass
    ("mamba-byte-lm", (), 3),                  # 2 of 4 layers done; the ends untied the head (config restored)
    ("hybrid-byte-lm", ("--kv-cache", "int8", "--wbits", "4"), 5),     # after the attention layer (index 3)
    ("mamba2-byte-lm", ("--weight-rounding", "gptq"), 1),               # only the ends block
    ("mamba-byte-lm", ("--recipe", "smoothquant"), 1),                  # a recipe with no statistics pass
])
def test_interrupted_then_resumed_is_byte_identical(tmp_path, tmp_path_factory, capsys, monkeypatch, sample, flags,
                                                    done):
    ref = _reference(tmp_path_factory, sample, *flags)
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        _stop_after(m, done)
        assert main(_argv(sample, out, *flags)) == 130
    err = capsys.readouterr().err
    kept = {0: "keeps the statistics pass", 1: "keeps the embedding and head (none of"}.get(done, f"keeps {done - 1} of")
    assert kept in err and "--resume" in err, err
    assert not out.exists() and _record(out)["done"] == done
    assert main(_argv(sample, out, *flags, "--resume")) == 0
    assert f"resumed after {max(done - 1, 0)} finished layers" in capsys.readouterr().out
    _same_bytes(ref, out)
    assert not (tmp_path / "q.partial").exists()
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_a_transformers_written_sharded_bf16_checkpoint_resumes(tmp_path, capsys, monkeypatch):
    """A Nemotron-H written by transformers (Mamba2, attention and MLP blocks; bf16, in several shards)."""
    pytest.importorskip("transformers")
    from test_streamed import _nemotron_bf16

    src = _nemotron_bf16(tmp_path)
    argv = ["quantize", src, "--calib", os.path.join(SAMPLES, "hybrid-byte-lm", "data", "calib.txt"), *WINDOWS,
            "--stream", "on"]
    assert main(argv + ["-o", str(tmp_path / "ref")]) == 0
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        assert main(argv + ["-o", str(tmp_path / "q")]) == 130
    assert main(argv + ["-o", str(tmp_path / "q"), "--resume"]) == 0
    _same_bytes(tmp_path / "ref", tmp_path / "q")


def test_stopped_in_the_last_step_and_before_any_block(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """Stopped after every block while the output is assembled: --resume only assembles it. Stopped in the
    statistics pass (nothing finished): no partial folder is left, and --resume says it starts afresh."""
    ref = _reference(tmp_path_factory, "mamba-byte-lm")
    out = tmp_path / "q"

    def stop(self, names, folder):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(partial_mod.Partial, "link_into", stop)
        assert main(_argv("mamba-byte-lm", out)) == 130
    assert "keeps 4 of 4 layers" in capsys.readouterr().err
    assert main(_argv("mamba-byte-lm", out, "--resume")) == 0
    _same_bytes(ref, out)

    import mq_deploy.quant.streamed as streamed_mod
    from mq_deploy.models import loaders

    def interrupt(model, name):
        if name == "layers.2":
            raise KeyboardInterrupt
        return loaders.materialize(model, name)
    out2 = tmp_path / "q2"
    with monkeypatch.context() as m:
        m.setattr(streamed_mod, "materialize", interrupt)
        assert main(_argv("mamba-byte-lm", out2)) == 130
    assert "keeps" not in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["q"]
    assert main(_argv("mamba-byte-lm", out2, "--resume")) == 0
    assert "starts from the first layer" in capsys.readouterr().err
    _same_bytes(ref, out2)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_real_signal_after_block_k_then_resume(tmp_path, tmp_path_factory, capsys, sig):
    """The CLI in its own process, killed (SIGKILL: nothing runs after it) or interrupted (SIGINT) once the partial
    folder records two finished layers (the child pauses after each commit, so the signal lands while it still
    runs); --resume in this process gives the uninterrupted bytes."""
    ref = _reference(tmp_path_factory, "mamba-byte-lm")
    out = tmp_path / "q"
    marker = tmp_path / "q.partial" / fileio.MARKER
    # The real CLI in the child, each commit followed by a pause: on an idle machine the sample's layers take
    # ~0.1 s, so the run could end between this process seeing block k recorded and the signal arriving.
    # (Python's SIGINT handler set in the child: a process that inherits SIGINT ignored, as a job a shell starts in the
    # background without job control does, keeps ignoring it; this test failed twice inside full-suite runs started
    # that way and passed alone)
    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
             "from mq_deploy.quant import partial\n"
             "commit = partial.Partial.commit\n"
             "def slow(self, *a, **k):\n"
             "    commit(self, *a, **k)\n"
             "    time.sleep(0.5)\n"
             "partial.Partial.commit = slow\n"
             "from mq_deploy.cli.main import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.Popen([sys.executable, "-c", child, *_argv("mamba-byte-lm", out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if json.loads(marker.read_text())["record"]["done"] >= 3:
                    break
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)
        assert p.poll() is None, "the run ended before it could be stopped"
        p.send_signal(sig)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL
    else:
        assert p.returncode == 130 and "Traceback" not in err and "--resume" in err, err
    done = _record(out)["done"]
    assert 3 <= done <= 5 and not out.exists()
    assert main(_argv("mamba-byte-lm", out, "--resume")) == 0
    assert f"resumed after {done - 1} finished layers" in capsys.readouterr().out
    _same_bytes(ref, out)
    assert sorted(os.listdir(tmp_path)) == ["q"]


def test_a_full_disk_keeps_the_last_finished_block(tmp_path, tmp_path_factory, capsys):
    """A real write failure (the file size limit, RLIMIT_FSIZE, fails a write as a full disk does) on the first
    layer's shard: one line naming it and the system's reason, exit 2; the partial folder keeps the statistics and
    the ends block, with no temporary left; --resume finishes it with the uninterrupted bytes."""
    ref = _reference(tmp_path_factory, "mamba-byte-lm")
    out = tmp_path / "q"
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))\n"
            "from mq_deploy.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    p = subprocess.run([sys.executable, "-c", code, *_argv("mamba-byte-lm", out)], capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 2, p.stderr
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln]
    assert "Traceback" not in p.stderr and len(errors) == 1, p.stderr
    assert "q.partial/model-00002-of-00005.safetensors" in errors[0] and "File too large" in errors[0], p.stderr
    assert "keeps the embedding and head (none of 4 layers)" in p.stderr, p.stderr
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["q.partial"]
    held = sorted(os.listdir(tmp_path / "q.partial"))
    assert held == [fileio.MARKER, "model-00001-of-00005.safetensors", "state-00001.safetensors",
                    "stats.safetensors"], held
    assert main(_argv("mamba-byte-lm", out, "--resume")) == 0
    _same_bytes(ref, out)


@pytest.fixture
def partial_run(tmp_path, monkeypatch):
    """A hybrid-sample quantize stopped after its first layer: (argv builder, output path, the partial's files)."""
    out = tmp_path / "q"
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        assert main(_argv("hybrid-byte-lm", out)) == 130
    part = tmp_path / "q.partial"
    return out, part, {f: fileio.sha256_file(str(part / f)) for f in os.listdir(part)}


def _unchanged(part, files):
    assert {f: fileio.sha256_file(str(part / f)) for f in os.listdir(part)} == files


def test_resume_refuses_other_inputs(tmp_path, capsys, monkeypatch, partial_run):
    out, part, files = partial_run
    capsys.readouterr()
    other_text = tmp_path / "other.txt"
    other_text.write_text("In the beginning was the Word, and the Word was with God. " * 20)
    threads = torch.get_num_threads()
    cases = [
        (("--wbits", "4"), "quant.wbits 8 then, 4 now"),
        (("--recipe", "quarot"), "recipe mambaquant then, quarot now"),
        (("--klt-source", "sum"), "klt_source last then, sum now"),
        (("--seq-len", "32"), "--seq-len 64 then, 32 now"),
        (("--calib-samples", "1"), "windows 2 then, 1 now"),
        (("--calib", other_text), "its token windows differ"),
        (("--seed", "1"), "--seed 0 then, 1 now"),
        (("--threads", str(threads + 1)), f"torch threads ({threads} then, {threads + 1} now; pass --threads {threads})"),
    ]
    try:
        for flags, needle in cases:
            assert_user_error(capsys, _argv("hybrid-byte-lm", out, "--resume", *flags), "q.partial",
                              "was started from other inputs", needle)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(partial_mod, "__version__", "9.9.9")
    assert_user_error(capsys, _argv("hybrid-byte-lm", out, "--resume"), "mq-deploy version (0.1.0 then, 9.9.9 now)")
    monkeypatch.undo()
    _unchanged(part, files)
    assert not out.exists()
    assert main(_argv("hybrid-byte-lm", out, "--resume")) == 0      # the refusals changed nothing


def test_resume_refuses_a_changed_model(tmp_path, capsys, monkeypatch):
    src = tmp_path / "model"
    shutil.copytree(os.path.join(SAMPLES, "mamba-byte-lm"), src)
    argv = ["quantize", str(src), "-o", str(tmp_path / "q"), *WINDOWS, "--stream", "on"]
    with monkeypatch.context() as m:
        _stop_after(m, 2)
        assert main(argv) == 130
    capsys.readouterr()
    st = os.stat(src / "model.safetensors")
    os.utime(src / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert_user_error(capsys, argv + ["--resume"], "the model checkpoint (model.safetensors was modified since)")
    (src / "config.json").write_text((src / "config.json").read_text() + " ")
    assert_user_error(capsys, argv + ["--resume"], "config.json is", "bytes, was")


def _damage_cases(part):
    shard = part / "model-00002-of-00008.safetensors"
    state = next(part.glob("state-*.safetensors"))

    def truncate():
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)

    def flip(path, at):
        def go():
            b = bytearray(path.read_bytes())
            b[at] ^= 1
            path.write_bytes(bytes(b))
        return go

    def record(**change):
        def go():
            m = json.loads((part / fileio.MARKER).read_text())
            m["record"].update(change)
            (part / fileio.MARKER).write_text(json.dumps(m))
        return go

    return [
        (truncate, "model-00002-of-00008.safetensors is"),
        (flip(shard, -10), "model-00002-of-00008.safetensors is not what was written"),
        (flip(state, -10), f"{state.name} is not what was written"),
        (lambda: os.remove(part / "stats.safetensors"), "stats.safetensors is missing"),
        (lambda: (part / fileio.MARKER).write_text("{not json"), "is not an unfinished quantize mq-deploy wrote"),
        (record(done=99), "inconsistent"),
        (record(weight_map={"x": "model-00009-of-00008.safetensors"}), "weight_map"),
        (record(config={"architecture": "mamba_lm", "d_model": -1}), "model config it recorded"),
    ]


def test_a_damaged_partial_folder_is_one_line(tmp_path, capsys, partial_run):
    out, part, _ = partial_run
    backup = tmp_path / "backup"
    shutil.copytree(part, backup)
    capsys.readouterr()
    for damage, needle in _damage_cases(part):
        shutil.rmtree(part)
        shutil.copytree(backup, part)
        damage()
        assert_user_error(capsys, _argv("hybrid-byte-lm", out, "--resume"), "q.partial", needle)
        assert not out.exists()
    # a changed file is not replaced by --overwrite either (fileio: only what mq-deploy wrote, unchanged)
    shutil.rmtree(part)
    shutil.copytree(backup, part)
    flip = part / "stats.safetensors"
    flip.write_bytes(flip.read_bytes()[:-1] + b"\0")
    assert_user_error(capsys, _argv("hybrid-byte-lm", out, "--overwrite"), "stats.safetensors",
                      "changed since mq-deploy wrote it")


def test_the_partial_folder_rules(tmp_path, tmp_path_factory, capsys, partial_run):
    """Without --resume an existing partial folder is refused (--overwrite replaces it); a folder of the user's at
    OUT.partial is never touched; a file the user put into ours stays; one run at a time; --stream off and what
    cannot stream are refused with --resume; nothing takes the partial folder for a model."""
    out, part, files = partial_run
    capsys.readouterr()
    assert_user_error(capsys, _argv("hybrid-byte-lm", out), "q.partial: an interrupted quantize of",
                      "(1 of 7 layers done)", "pass --resume to continue it, or --overwrite to start over")
    assert_user_error(capsys, _argv("hybrid-byte-lm", out, "--resume", "--stream", "off"), "--resume",
                      "drop --stream off")
    vim = os.path.join(SAMPLES, "vim-fashion-mnist")
    assert_user_error(capsys, ["quantize", vim, "-o", tmp_path / "v", "--resume"], "cannot stream",
                      "Vision Mamba")
    for cmd in (["export", part, "-o", tmp_path / "x.onnx"], ["eval", part]):
        assert_user_error(capsys, cmd, "q.partial")
    fd = os.open(part, os.O_RDONLY)           # another run holds it
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert_user_error(capsys, _argv("hybrid-byte-lm", out, "--resume"), "another mq-deploy quantize is writing")
    finally:
        os.close(fd)
    _unchanged(part, files)

    (part / "notes.txt").write_text("mine")
    assert_user_error(capsys, _argv("hybrid-byte-lm", out, "--overwrite"), "notes.txt", "did not write")
    assert main(_argv("hybrid-byte-lm", out, "--resume")) == 0
    assert "kept, it holds notes.txt" in capsys.readouterr().err
    assert sorted(os.listdir(part)) == ["notes.txt"]
    _same_bytes(_reference(tmp_path_factory, "hybrid-byte-lm"), out)

    mine = tmp_path / "r.partial"              # the user's own folder where ours would go
    mine.mkdir()
    (mine / "data.bin").write_bytes(b"1")
    for flags in ((), ("--overwrite",), ("--resume",)):
        assert_user_error(capsys, _argv("hybrid-byte-lm", tmp_path / "r", *flags), "r.partial", "move or remove it")
    assert sorted(os.listdir(mine)) == ["data.bin"] and not (tmp_path / "r").exists()


def test_overwrite_starts_over(tmp_path, tmp_path_factory, capsys, partial_run):
    out, part, _ = partial_run
    assert main(_argv("hybrid-byte-lm", out, "--overwrite")) == 0
    assert "resumed" not in capsys.readouterr().out
    assert not part.exists()
    _same_bytes(_reference(tmp_path_factory, "hybrid-byte-lm"), out)
