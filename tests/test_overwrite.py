"""--overwrite never deletes what mq-deploy did not write (issue 20): every output folder carries a
manifest of its files; a folder is replaced only when it is an output kind and everything in it is a
recorded, unchanged file on its own filesystem; removal never follows a link or crosses a mount. Also
here: the permission bits of outputs and copies, a full disk, and the paths a checkpoint's config names.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from mq_deploy import fileio
from mq_deploy.cli.main import main
from mq_deploy.models.io import save_model

from helpers import assert_user_error, small_lm, tiny_exports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "samples", "mamba-byte-lm")


def _tree(root) -> dict:
    """sha256 of every file under root, links as their targets: what must not change."""
    out = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files) + [x for x in dirs if os.path.islink(os.path.join(d, x))]:
            p = os.path.join(d, f)
            if os.path.islink(p):
                out[os.path.relpath(p, root)] = "link:" + os.readlink(p)
            else:
                with open(p, "rb") as fh:
                    out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    d = tmp_path_factory.mktemp("ow")
    lm = str(save_model(small_lm(vocab=256, d_model=32, d_model2=32), d / "lm"))
    text = d / "text.txt"
    text.write_bytes(b"In the beginning God created the heaven and the earth. " * 60)
    return {"d": d, "lm": lm, "text": str(text)}


def _quantize(ws, out, *extra):
    return ["quantize", ws["lm"], "-o", str(out), "--calib", ws["text"], "--calib-samples", "2", "--seq-len", "64",
            *extra]


def test_manifest_records_every_file(ws, tmp_path):
    out = tmp_path / "q"
    assert main(_quantize(ws, out)) == 0
    m = fileio.read_manifest(str(out))
    print(sorted(m["files"]))
    assert m["kind"] == "quantized checkpoint" and m["manifest"] == fileio.MANIFEST_VERSION
    on_disk = {os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs} - {fileio.MARKER}
    assert set(m["files"]) == on_disk
    for rel, e in m["files"].items():
        with open(out / rel, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == e["sha256"]
    # a clean earlier output is replaced
    assert main(_quantize(ws, out, "--overwrite")) == 0
    assert fileio.read_manifest(str(out))["files"].keys() == m["files"].keys()


def test_copy_of_a_shipped_sample_is_never_an_output(ws, tmp_path, capsys):
    """The sample's config.json carries mq_deploy_format; that no longer makes the folder ours."""
    copy = tmp_path / "sample-copy"
    shutil.copytree(SAMPLE, copy)
    (copy / "my-notes.txt").write_text("a user's notes\n")
    before = _tree(copy)
    assert_user_error(capsys, _quantize(ws, copy, "--overwrite"), str(copy), "not written by mq-deploy")
    assert _tree(copy) == before


def test_a_model_checkpoint_is_an_input_kind(ws, tmp_path, capsys):
    """save_model writes a marker and manifest, but a checkpoint is an input: never replaced."""
    ck = save_model(small_lm(), tmp_path / "ck")
    before = _tree(ck)
    assert_user_error(capsys, _quantize(ws, ck, "--overwrite"), "is a model (an input)")
    assert _tree(ck) == before


def test_user_files_inside_an_earlier_output_are_kept(ws, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(_quantize(ws, out)) == 0
    (out / "logs").mkdir()
    (out / "logs" / "eval.log").write_text("bits/byte 2.1\n")
    before = _tree(out)
    assert_user_error(capsys, _quantize(ws, out, "--overwrite"), os.path.join("logs"), "did not write")
    assert _tree(out) == before
    shutil.rmtree(out / "logs")
    # an edited file of ours counts as the user's too
    with open(out / "manifest.json", "a") as f:
        f.write("\n")
    before = _tree(out)
    assert_user_error(capsys, _quantize(ws, out, "--overwrite"), "manifest.json (changed since")
    assert _tree(out) == before


def test_links_inside_an_output_are_refused_not_followed(ws, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(_quantize(ws, out)) == 0
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work\n")
    os.symlink(precious, out / "data")
    before = _tree(precious)
    assert_user_error(capsys, _quantize(ws, out, "--overwrite"), "data (a symbolic link)")
    assert _tree(precious) == before


def test_older_folders_without_a_manifest_are_refused(ws, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(_quantize(ws, out)) == 0
    marker = out / fileio.MARKER
    m = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: m[k] for k in ("written_by", "version", "kind")}))   # a version-1 marker
    assert_user_error(capsys, _quantize(ws, out, "--overwrite"), "without a manifest")
    marker.write_text("[1, 2]")   # a marker that is not ours
    assert_user_error(capsys, _quantize(ws, out, "--overwrite"), "not written by mq-deploy")


def test_removal_keeps_what_appears_during_the_write(ws, tmp_path):
    """A file added to the old folder after the last check is kept (renamed aside), never deleted."""
    out = tmp_path / "q"
    assert main(_quantize(ws, out)) == 0
    old = str(out) + ".swapped"
    os.rename(out, old)
    os.makedirs(out)
    with open(os.path.join(old, "late.txt"), "w") as f:
        f.write("added while quantize ran\n")
    fileio._discard_old(old, str(out), str(out))
    kept = [p for p in os.listdir(tmp_path) if p.startswith("q.kept-")]
    assert len(kept) == 1 and not os.path.exists(old)
    assert os.listdir(tmp_path / kept[0]) == ["late.txt"]


def test_triton_overwrite_keeps_a_hand_written_model(tmp_path, capsys):
    art = tiny_exports()
    repo = tmp_path / "repo"
    assert main(["triton", art["lm"], "-o", str(repo)]) == 0
    mine = repo / "my_model" / "1"
    mine.mkdir(parents=True)
    (mine / "model.py").write_text("# hand-written\n")
    (repo / "my_model" / "config.pbtxt").write_text('name: "my_model"\nbackend: "python"\n')
    before = _tree(repo)
    assert_user_error(capsys, ["triton", art["lm"], "-o", str(repo), "--overwrite"], "my_model")
    assert _tree(repo) == before
    shutil.rmtree(repo / "my_model")
    assert main(["triton", art["lm"], "-o", str(repo), "--overwrite"]) == 0


def _unshare_ok() -> bool:
    if not shutil.which("unshare") or os.geteuid() != 0:
        return False
    r = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    return r.returncode == 0


needs_mount_ns = pytest.mark.skipif(not _unshare_ok(), reason="needs root and `unshare -m` (a private mount namespace)")


@needs_mount_ns
def test_bind_mount_inside_the_output_is_never_crossed(ws, tmp_path):
    """Same filesystem bind mount (same st_dev): found through mountinfo, refused; nothing outside touched.
    And the remover itself, given such a folder, keeps the mount's files."""
    out = tmp_path / "q"
    assert main(_quantize(ws, out)) == 0
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "data.bin").write_bytes(os.urandom(64))
    before = _tree(outside)
    argv = [sys.executable, "-m", "mq_deploy", *_quantize(ws, out, "--overwrite")]
    script = (f"mkdir -p {out}/mnt && mount --bind {outside} {out}/mnt && "
              + " ".join(f"'{a}'" for a in argv) + "; rc=$?; "
              + f"{sys.executable} -c \"from mq_deploy import fileio; print(fileio._remove_entries('{out}', None))\"; "
              + "exit $rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "mnt (a mount point)" in err[0], r.stderr
    assert "['mnt']" in r.stdout          # the remover refused to descend
    assert _tree(outside) == before


@needs_mount_ns
def test_full_disk_is_one_line_and_leaves_nothing(ws, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    argv = [sys.executable, "-m", "mq_deploy", *_quantize(ws, small / "q")]
    script = (f"mount -t tmpfs -o size=96k tmpfs {small} && " + " ".join(f"'{a}'" for a in argv)
              + f"; rc=$?; ls -A {small}; exit $rc")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300)
    print(r.stdout, r.stderr)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in r.stderr
    assert "No space left on device" in err[0] and str(small / "q") in err[0], err
    assert r.stdout.strip() == ""           # no temporary left behind


def test_outputs_of_a_private_model_stay_private(ws, tmp_path):
    ck = save_model(small_lm(vocab=256, d_model=32, d_model2=32), tmp_path / "private")
    for f in os.listdir(ck):
        os.chmod(os.path.join(ck, f), 0o600)
    out = tmp_path / "q"
    old = os.umask(0o022)
    try:
        assert main(["quantize", str(ck), "-o", str(out), "--calib", ws["text"], "--calib-samples", "2",
                     "--seq-len", "64"]) == 0
        assert main(["export", str(out), "-o", str(tmp_path / "m.onnx")]) == 0
    finally:
        os.umask(old)
    modes = {f: oct(fileio.mode_bits(os.path.join(out, f))) for f in os.listdir(out)}
    print(modes)
    assert set(modes.values()) == {"0o600"}
    assert oct(fileio.mode_bits(tmp_path / "m.onnx")) == "0o600"
    # a public model's outputs follow the umask
    out2 = tmp_path / "q2"
    assert main(_quantize(ws, out2)) == 0
    assert oct(fileio.mode_bits(out2 / "model.safetensors")) == oct(0o666 & ~old)


def test_copy_file_keeps_the_source_mode(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(b"x" * 10)
    os.chmod(src, 0o640)
    old = os.umask(0o022)
    try:
        with fileio.atomic_dir(str(tmp_path / "repo"), kind="triton-repository", inputs=[str(src)]) as d:
            fileio.copy_file(str(src), os.path.join(d, "m.onnx"))
            with open(os.path.join(d, "README.md"), "w") as f:
                f.write("ours\n")
    finally:
        os.umask(old)
    assert oct(fileio.mode_bits(tmp_path / "repo" / "m.onnx")) == "0o640"
    assert oct(fileio.mode_bits(tmp_path / "repo" / "README.md")) == "0o640"   # no more readable than its input


def test_config_paths_are_confined_to_the_model_folder(ws, tmp_path, capsys):
    ck = save_model(small_lm(vocab=256, d_model=32, d_model2=32), tmp_path / "m")
    cfg_path = os.path.join(ck, "config.json")
    cfg = json.load(open(cfg_path))
    for bad in ("/etc/passwd", "../text.txt", "data/../../x"):
        cfg["extra"] = {"eval_data": bad}
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        assert_user_error(capsys, ["eval", ck], "extra.eval_data", "outside the model's folder")
    os.symlink("/etc", os.path.join(ck, "data"))          # a link inside that leads outside
    cfg["extra"] = {"eval_data": "data/passwd"}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert_user_error(capsys, ["eval", ck], "outside the model's folder")
    cfg["extra"] = {"eval_data": 7}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    assert_user_error(capsys, ["eval", ck], "extra.eval_data must be a path")


def test_quantized_sample_keeps_its_default_data(tmp_path):
    """A quantized sample finds the sample's own held-out data through `source` (and nothing else)."""
    out = tmp_path / "q"
    assert main(["quantize", SAMPLE, "-o", str(out), "--calib-samples", "2", "--seq-len", "64"]) == 0
    cfg = json.load(open(out / "config.json"))
    assert cfg["extra"] == {"source": os.path.relpath(SAMPLE, out)}
    assert main(["eval", str(out), "--limit", "1", "--seq-len", "64"]) == 0
