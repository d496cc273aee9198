"""`mq-deploy triton` / `serve` with untrusted input: build reports that name files outside their folder or
carry fields of the wrong type, hostile strings that end up in the repository README's shell commands (the
commands are run here, with fake `docker`, `tritonserver`, `pip` and `curl` that record their arguments),
copies that must keep the source's permission bits, flags beyond Triton's int32 fields, a text file as the
op library, port clashes, and a stub Python that lacks what the models import."""

import json
import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from helpers import assert_user_error, tiny_exports

pytest.importorskip("onnxruntime")

from mq_deploy.errors import MQUserError  # noqa: E402
from mq_deploy.serve.repository import TritonConfig, write_repository  # noqa: E402

# shell syntax without ';' ',' ':' or blanks, which no command could carry (those are refused, below)
HOSTILE = "/opt/x'&&touch${IFS}PWNED&&'$(touch${IFS}PWNED2)`touch${IFS}PWNED3`\"|&>PWNED7/libmq_scan_trt.so"


@pytest.fixture(scope="module")
def art():
    return tiny_exports()


def build_layout(folder, art, which="vim", plugins=["/opt/mq/libmq_scan_trt.so"], **fields):  # noqa: B006
    """What `mq-deploy build DIR/m.onnx --saveEngine DIR/m.plan --json DIR/m.plan.json` leaves: the ONNX, an
    engine (not a real plan: TensorRT cannot run here, the writer only copies it) and the report, all in one
    folder with absolute paths; `fields` replace report entries."""
    import onnx

    os.makedirs(folder, exist_ok=True)
    onnx_path = os.path.join(folder, f"{which}.onnx")
    shutil.copyfile(art[which], onnx_path)
    eng = os.path.join(folder, f"{which}.plan")
    with open(eng, "wb") as f:
        f.write(b"not a real TensorRT plan")
    proto = onnx.load(onnx_path, load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    inputs = [{"name": i.name, "shape": [d.dim_value if d.HasField("dim_value") else -1
                                         for d in i.type.tensor_type.shape.dim]}
              for i in proto.graph.input if i.name not in init]
    rep = {"onnx": onnx_path, "engine": eng, "tensorrt_version": "10.16.0", "inputs": inputs,
           "profile": {"images": {"min": [1, 1, 12, 12], "opt": [4, 1, 12, 12], "max": [8, 1, 12, 12]}}
           if which == "vim" else {}, "plugins": plugins, "warnings": []}
    rep.update(fields)
    report = os.path.join(folder, f"{which}.plan.json")
    with open(report, "w") as f:
        json.dump(rep, f)
    return report


# ---- build reports ---------------------------------------------------------------------------------

def test_report_paths_stay_in_the_reports_folder(art, tmp_path, capsys):
    """`"engine": "../../../etc/shadow"` once made triton copy that file into the repository as model.plan."""
    out = tmp_path / "repo"
    secret = tmp_path / "secret"
    secret.write_text("root:$6$hash")
    d = str(tmp_path / "b")
    for engine in ["../../../etc/shadow", "/etc/shadow", "../secret", str(secret)]:
        rep = build_layout(d, art, engine=engine)
        assert_user_error(capsys, ["triton", rep, "-o", out], "lies outside the report's folder",
                          "--saveEngine DIR/MODEL.plan --json DIR/MODEL.plan.json")
    os.symlink(secret, os.path.join(d, "link.plan"))       # inside by name, outside by target
    assert_user_error(capsys, ["triton", build_layout(d, art, engine="link.plan"), "-o", out], "lies outside")
    assert_user_error(capsys, ["triton", build_layout(d, art, onnx=art["vim"]), "-o", out], "its onnx",
                      "lies outside")
    # the engine named on the command line is the user's; its report's ONNX is still confined
    rep = build_layout(d, art, onnx="../../elsewhere.onnx")
    assert_user_error(capsys, ["triton", os.path.join(d, "vim.plan"), "-o", out], "its onnx", "lies outside")
    assert not out.exists()
    # a normal layout, relative or absolute, is served
    write_repository([build_layout(d, art, engine="vim.plan", onnx="vim.onnx")], str(out))
    assert (out / "vim" / "1" / "model.plan").read_bytes() == b"not a real TensorRT plan"
    write_repository([os.path.join(d, "vim.plan")], str(tmp_path / "repo2"))


@pytest.mark.parametrize("field,value,needle", [
    ("inputs", "images", "inputs must be a non-empty list"),
    ("inputs", [{"name": "images", "shape": ["batch", 1, 12, 12]}], "shape must be a list of 1 to 16 integers"),
    ("inputs", [{"name": "images", "shape": [True, 1, 12, 12]}], "shape must be a list"),
    ("inputs", [{"name": 3, "shape": [-1, 1, 12, 12]}], "each of its inputs must be"),
    ("inputs", [{"name": "images", "shape": [-1, 1, 12, 12]}, {"name": "images", "shape": [1]}], "a new string"),
    ("profile", ["images"], "profile must be an object"),
    ("profile", {"pixels": {"min": [1], "opt": [1], "max": [1]}}, "not one of its inputs"),
    ("profile", {"images": {"min": [9, 1, 12, 12], "opt": [4, 1, 12, 12], "max": [8, 1, 12, 12]}},
     "min <= opt <= max"),
    ("profile", {"images": {"min": [1, 1, 12], "opt": [1, 1, 12], "max": [1, 1, 12]}}, "of rank 4"),
    ("profile", {"images": {"min": [1, 1, 12, 12], "opt": "4x1x12x12", "max": [8, 1, 12, 12]}}, "opt must be"),
    ("plugins", "/opt/libmq_scan_trt.so", "plugins must be a list"),
    ("plugins", [3], "plugins must be a list"),
    ("plugins", ["/opt/a.so;/opt/b.so"], "cannot express"),
    ("plugins", ["/opt/x'; touch PWNED; '/lib.so"], "holds ';'"),
    ("plugins", ["/opt/a,b.so"], "cannot express"),
    ("plugins", ["/opt/a\nb.so"], "cannot express"),
    ("engine", 5, "must be a file path"),
    ("onnx", None, "must be a file path"),
])
def test_report_fields_are_validated(art, tmp_path, capsys, field, value, needle):
    rep = build_layout(str(tmp_path / "b"), art, **{field: value})
    assert_user_error(capsys, ["triton", rep, "-o", tmp_path / "repo"], needle)
    assert not (tmp_path / "repo").exists()


# ---- the README's shell commands ----------------------------------------------------------------------

FAKE = r'''#!/usr/bin/env python3
import json, os, subprocess, sys
prog = os.path.basename(sys.argv[0])
rec = {"prog": prog, "argv": sys.argv[1:], "cwd": os.getcwd(), "LD_PRELOAD": os.environ.get("LD_PRELOAD")}
if prog == "curl" and "@-" in sys.argv:
    rec["stdin"] = sys.stdin.read()
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(rec) + "\n")
if prog == "docker" and "-c" in sys.argv:          # the container: run its command as its shell would
    sys.exit(subprocess.call(["bash", "-c", sys.argv[sys.argv.index("-c") + 1]]))
'''


def run_readme_blocks(readme, cwd, fakes):
    """Every ```bash block of the README, run by bash in `cwd` with the fake programs first on PATH (the
    Jetson path /opt/tritonserver/bin/tritonserver is pointed at the fake); returns the recorded calls."""
    text = open(readme).read()
    blocks = [b.split("```", 1)[0] for b in text.split("```bash\n")[1:]]
    log = os.path.join(fakes, "log.jsonl")
    env = {"PATH": fakes + os.pathsep + "/usr/bin:/bin", "FAKE_LOG": log, "HOME": str(cwd), "PWD": str(cwd)}
    for block in blocks:
        block = block.replace("/opt/tritonserver/bin/tritonserver", "tritonserver")
        r = subprocess.run(["bash", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, (block, r.stderr)
    with open(log) as f:
        return [json.loads(line) for line in f]


@pytest.fixture
def fakes(tmp_path):
    d = tmp_path / "fakebin"
    d.mkdir()
    (d / "fake").write_text(FAKE.replace("/usr/bin/env python3", sys.executable))
    os.chmod(d / "fake", 0o755)
    for prog in ("docker", "tritonserver", "pip", "pip3", "curl", "mq-deploy"):
        os.symlink(d / "fake", d / prog)
    return str(d)


def test_readme_commands_carry_hostile_strings_as_one_argument(art, tmp_path, fakes):
    """A plugin path and a repository name full of shell syntax: every README command passes them as one
    argument each (docker's `bash -c '...'` quoted twice), and nothing of them runs."""
    work = tmp_path / "work"
    work.mkdir()
    rep = build_layout(str(tmp_path / "b"), art, plugins=[HOSTILE])
    repo_name = "r'; touch PWNED4; '$(touch PWNED5)`touch PWNED6` x"
    write_repository([rep, art["lm"]], str(work / repo_name), TritonConfig(backend=None))
    # a TensorRT Vim (with its Python preprocessing model: the container pip-installs numpy and pillow
    # through `bash -c '...'`) and an onnxruntime LM
    calls = run_readme_blocks(work / repo_name / "README.md", work, fakes)
    by = {}
    for c in calls:
        by.setdefault(c["prog"], []).append(c)
    print(json.dumps(by)[:4000])
    assert by["mq-deploy"][0]["argv"] == ["serve", repo_name, "--http-port", "8000", "--grpc-port", "8001"]
    assert [c["argv"] for c in by["pip"]] == [["install", "numpy", "pillow"]]       # inside the container
    docker = by["docker"][0]["argv"]
    assert docker[docker.index("-v") + 1] == f"{work}/{repo_name}:/models"
    assert docker[docker.index("-v", docker.index("-v") + 1) + 1] == f"{os.path.dirname(HOSTILE)}:" \
                                                                      f"{os.path.dirname(HOSTILE)}"
    servers = by["tritonserver"]
    assert len(servers) == 3      # docker's, Jetson's, LD_PRELOAD's
    for s in servers:
        assert f"--backend-config=tensorrt,plugins={HOSTILE}" in s["argv"] or s["LD_PRELOAD"] == HOSTILE, s
        assert any(a in (f"--model-repository={work}/{repo_name}", "--model-repository=/models") for a in s["argv"])
    assert [s["LD_PRELOAD"] for s in servers].count(HOSTILE) == 1
    bodies = [c.get("stdin") or c["argv"][c["argv"].index("-d") + 1] for c in by["curl"] if "-d" in c["argv"]]
    assert len(bodies) == 2 and all(json.loads(b)["inputs"] for b in bodies)      # vim (made by python3) and lm
    assert not [p for p in work.rglob("PWNED*")] and not list(tmp_path.rglob("PWNED*"))


def test_python_models_in_the_container_get_their_packages(art, tmp_path, fakes):
    """With Python-backend models the container runs `bash -c 'pip install ... && tritonserver ...'`: the
    inner command is quoted for the inner shell, then as a whole for the outer one."""
    work = tmp_path / "work"
    work.mkdir()
    repo_name = "v'; touch PWNED; '"
    write_repository([art["vim"], art["lm_step"]], str(work / repo_name), TritonConfig(backend="python"))
    calls = run_readme_blocks(work / repo_name / "README.md", work, fakes)
    pips = [c["argv"] for c in calls if c["prog"] in ("pip", "pip3")]
    assert pips and all(p == ["install", "numpy", "onnxruntime", "pillow", "tokenizers"] for p in pips), pips
    assert [c["argv"] for c in calls if c["prog"] == "tritonserver"][0] == ["--model-repository=/models"]
    assert not list(tmp_path.rglob("PWNED*"))


def test_values_no_command_can_express_are_refused(art, tmp_path, capsys):
    assert_user_error(capsys, ["triton", art["lm"], "-o", tmp_path / "a:b"], "holds ':'", "docker")
    assert_user_error(capsys, ["triton", art["lm"], "-o", tmp_path / "a\nb"], "holds '\\n'")
    rep = build_layout(str(tmp_path / "b"), art, plugins=["/opt/a:b/libmq_scan_trt.so"])
    assert_user_error(capsys, ["triton", rep, "-o", tmp_path / "r"], "plugin path", "holds ':'")
    assert not any(p.name.startswith(("a", "r")) for p in tmp_path.iterdir() if p.name != "b")


# ---- copies -----------------------------------------------------------------------------------------

def test_copies_keep_the_sources_permission_bits(art, tmp_path):
    """A private (0600) model stays private in the repository, as `cp` keeps it; an executable library
    stays executable; our own model code keeps its 0644 (all masked by the umask)."""
    from mq_deploy.ops.native import ort_library

    src = tmp_path / "src"
    src.mkdir()
    shutil.copyfile(art["vim"], src / "vim.onnx")
    os.chmod(src / "vim.onnx", 0o600)
    lib = ort_library()
    if lib:
        shutil.copyfile(lib, src / os.path.basename(lib))
        lib = str(src / os.path.basename(lib))
        os.chmod(lib, 0o750)
    rep = build_layout(str(tmp_path / "b"), art)
    os.chmod(tmp_path / "b" / "vim.plan", 0o600)
    old = os.umask(0o022)
    try:
        write_repository([str(src / "vim.onnx")], str(tmp_path / "py"), TritonConfig(backend="python", custom_op_lib=lib))
        write_repository([rep], str(tmp_path / "trt"))
    finally:
        os.umask(old)

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(tmp_path / "py" / "vim" / "1" / "model.onnx") == 0o600
    assert mode(tmp_path / "trt" / "vim" / "1" / "model.plan") == 0o600
    if lib:
        assert mode(tmp_path / "py" / "vim" / "1" / os.path.basename(lib)) == 0o750
    for f in ("model.py", "mq_ort_session.py"):
        assert mode(tmp_path / "py" / "vim" / "1" / f) == 0o644
    assert mode(tmp_path / "py" / "vim_preprocess" / "1" / "mq_picture.py") == 0o644


def test_the_preprocessing_model_carries_the_one_transform(art, tmp_path):
    """The Triton preprocessing model imports mq_picture.py, a byte-for-byte copy of data/picture.py."""
    import mq_deploy.data.picture as picture

    write_repository([art["vim"]], str(tmp_path / "r"), TritonConfig(backend="python"))
    with open(picture.__file__, "rb") as f:
        assert (tmp_path / "r" / "vim_preprocess" / "1" / "mq_picture.py").read_bytes() == f.read()
    assert "import mq_picture" in (tmp_path / "r" / "vim_preprocess" / "1" / "model.py").read_text()


def test_external_data_is_copied_under_its_own_name_and_confined(art, tmp_path, capsys):
    """An ONNX with an external-data file (exports past 2 GiB have one): the file goes into the model folder
    under the name the ONNX gives it, so ONNX Runtime loads the copy; a location outside the ONNX's folder
    (untrusted metadata) is refused."""
    import numpy as np
    import onnx

    from mq_deploy.backends.ort.runner import OrtRunner

    d = tmp_path / "ext"
    d.mkdir()
    m = onnx.load(art["vim"])
    onnx.save_model(m, str(d / "vim.onnx"), save_as_external_data=True, location="vim.onnx.data", size_threshold=256)
    assert (d / "vim.onnx.data").stat().st_size > 0
    write_repository([str(d / "vim.onnx")], str(tmp_path / "r"), TritonConfig(backend="python"))
    vdir = tmp_path / "r" / "vim" / "1"
    assert (vdir / "vim.onnx.data").read_bytes() == (d / "vim.onnx.data").read_bytes()
    x = np.random.default_rng(0).standard_normal((2, 1, 12, 12)).astype(np.float32)
    got = OrtRunner(str(vdir / "model.onnx"), custom_op_library=False).infer({"images": x})["logits"]
    assert np.array_equal(got, OrtRunner(art["vim"], custom_op_library=False).infer({"images": x})["logits"])

    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    for t in m.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL or len(t.raw_data) >= 256:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.add(key="location", value="../secret.bin")
            break
    onnx.save_model(m, str(d / "evil.onnx"))
    assert_user_error(capsys, ["triton", d / "evil.onnx", "-o", tmp_path / "r2"], "outside the ONNX file's folder")


@pytest.mark.parametrize("which,key,value", [("vim", "image_std", "0.5"), ("vim", "num_classes", 10 ** 12),
                                              ("vim", "img_size", -5), ("lm_step", "n_layer", 10 ** 9)])
def test_onnx_metadata_is_untrusted(art, tmp_path, capsys, which, key, value):
    """Metadata an edited file carries (a labels file of 10^12 lines, state dims of 10^9 layers) is one line."""
    import onnx

    m = onnx.load(art[which])
    for p in m.metadata_props:
        if p.key == "mq.config":
            cfg = json.loads(p.value)
            cfg[key] = value
            p.value = json.dumps(cfg)
    onnx.save_model(m, str(tmp_path / "edited.onnx"))
    # the one parser of ONNX metadata refuses it (checked first: a writer that trusted 10^12 classes would
    # spend minutes on labels.txt)
    from mq_deploy.backends.base import parse_metadata
    from mq_deploy.export.onnx_file import metadata

    with pytest.raises(MQUserError, match=key):
        parse_metadata(metadata(m), "edited.onnx")
    assert_user_error(capsys, ["triton", tmp_path / "edited.onnx", "-o", tmp_path / "r"], "edited.onnx", key)
    assert not (tmp_path / "r").exists()


# ---- flags and the server's preconditions -----------------------------------------------------------

def test_flags_beyond_tritons_fields_and_libraries_that_are_not(art, tmp_path, capsys):
    out = tmp_path / "r"
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--max-batch", str(2 ** 31)], "--max-batch",
                      "2147483647")
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--instances", str(2 ** 40)], "--instances")
    text = tmp_path / "notes.so"
    text.write_text("this is a text file\n")
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--custom-op-lib", text], "not a shared library")
    exe = tmp_path / "prog.so"
    exe.write_bytes(b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + (2).to_bytes(2, "little") + bytes(46))  # ET_EXEC
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--custom-op-lib", exe], "not a shared library")
    assert not out.exists()
    for bad in ({"max_batch": 2 ** 31}, {"max_sequences": -1}, {"sequence_idle_us": 2 ** 64},
                {"max_tokens_per_response": 0}, {"max_tokens_per_response": 4097}, {"response_interval_us": -1},
                {"response_interval_us": 1.5}, {"response_streams": 0}, {"response_streams": 2 ** 21}):
        with pytest.raises(MQUserError):
            TritonConfig(**bad)
    assert_user_error(capsys, ["triton", art["lm_step"], "-o", out, "--max-tokens-per-response", "0"],
                      "--max-tokens-per-response must be an integer in [1, 4096] (the most tokens a generation makes)")
    assert not out.exists()


def test_port_clashes_are_one_line_before_the_server_starts(art, tmp_path, capsys):
    repo = tmp_path / "r"
    write_repository([art["lm"]], str(repo), TritonConfig(backend="python"))
    assert_user_error(capsys, ["serve", repo, "--http-port", "18555", "--grpc-port", "18555"],
                      "--http-port and --grpc-port are both 18555")
    assert_user_error(capsys, ["serve", repo, "--metrics-port", "8000"], "--http-port and --metrics-port")
    assert_user_error(capsys, ["serve", repo, "--grpc-port", "70000"], "must lie in 1..65535")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert_user_error(capsys, ["serve", repo, "--http-port", busy], f"--http-port {busy}: cannot listen")
    assert_user_error(capsys, ["serve"], "give the model repository")


def test_python_model_imports(art, tmp_path):
    from mq_deploy.serve.server import python_model_imports

    write_repository([art["vim"], art["lm_step"]], str(tmp_path / "r"), TritonConfig(backend="onnxruntime"))
    assert python_model_imports(str(tmp_path / "r")) == {
        "vim_preprocess": {"numpy", "PIL"}, "lm_step_generate": {"numpy", "tokenizers"}}
    write_repository([art["vim"], art["lm_step"]], str(tmp_path / "p"), TritonConfig(backend="python"))
    got = python_model_imports(str(tmp_path / "p"))
    assert got["vim"] == {"numpy", "onnxruntime"}
    # inline, the generate model opens the step graph itself (mq_ort_session beside it); with bls (above) not
    assert got["lm_step_generate"] == {"numpy", "onnxruntime", "tokenizers"}


def _server_or_skip():
    from mq_deploy.serve.server import find_server

    try:
        find_server().close()
    except MQUserError as e:
        if os.environ.get("MQ_REQUIRE_TRITON") == "1":
            raise
        pytest.skip(str(e))


def test_serve_names_what_the_stubs_python_lacks(art, tmp_path, capsys):
    """A hand-written Python model that imports a module the stub's interpreter lacks: `serve` says which,
    for which model, and how to install it, before the server starts (once: a Triton log of failed loads)."""
    _server_or_skip()
    repo = tmp_path / "r"
    write_repository([art["lm"]], str(repo), TritonConfig(backend="python"))
    mine = repo / "mine" / "1"
    mine.mkdir(parents=True)
    (repo / "mine" / "config.pbtxt").write_text('name: "mine"\nbackend: "python"\nmax_batch_size: 0\n')
    (mine / "model.py").write_text("import numpy\nimport surely_not_installed_xyz.sub\nfrom . import helper\n")
    assert_user_error(capsys, ["serve", repo], "cannot import surely_not_installed_xyz, needed by mine",
                      "install it: ", "-m pip install --break-system-packages surely_not_installed_xyz")
    # a module `--setup` installs is named with `--setup` (PIL here is what `from PIL import Image` needs)
    from mq_deploy.serve.server import install_commands

    assert install_commands("/usr/bin/python3.11", ["PIL", "onnxruntime"]) == [
        "apt-get install -y python3-pil",
        f"/usr/bin/python3.11 -m pip install --break-system-packages onnxruntime=={__import__('onnxruntime').__version__}"]


def test_setup_is_idempotent():
    """Where everything is installed, `mq-deploy serve --setup` checks and changes nothing."""
    _server_or_skip()
    from mq_deploy.serve.install import setup

    lines = []
    res = setup(log=lines.append)
    print(lines[0])
    if res["done"]:
        res = setup(log=lines.append)
    assert res["done"] == [] and "everything already installed" in lines[-1]
    assert set(res["versions"]) == {"numpy", "PIL", "onnxruntime", "tokenizers"}
