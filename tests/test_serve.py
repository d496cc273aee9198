"""`mq-deploy triton`: the repository it writes, every config.pbtxt checked against Triton's own schema
(tritonclient's model_config_pb2), and the input it refuses. No server here: tests/test_serve_server.py."""

import json
import os

import pytest

from helpers import assert_user_error, tiny_exports, tiny_hybrid_steps

pytest.importorskip("onnxruntime")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
from google.protobuf import text_format  # noqa: E402  (tritonclient brings protobuf)

from mq_deploy.serve.repository import TritonConfig, write_repository  # noqa: E402


@pytest.fixture(scope="module")
def art():
    return tiny_exports()


def parse(path):
    """Triton's own parser of config.pbtxt: protobuf text format into ModelConfig (unknown fields,
    wrong enum symbols or types raise)."""
    with open(path) as f:
        return text_format.Parse(f.read(), model_config_pb2.ModelConfig())


def parse_repo(repo):
    cfgs = {}
    for name in sorted(os.listdir(repo)):
        p = os.path.join(repo, name, "config.pbtxt")
        if os.path.isfile(p):
            cfgs[name] = parse(p)
            assert cfgs[name].name == name
            assert os.path.isdir(os.path.join(repo, name, "1"))
    return cfgs


def stand_in_engine(plan, eng):
    """The engine file (a stand-in: no TensorRT here) and its report ENGINE.json as build_engine leaves them for
    a plan_build plan (the plan's fields, TensorRT's version, the inputs and profile); returns the report."""
    eng.write_bytes(b"not a real TensorRT plan")
    rep = {k: v for k, v in plan.items() if k not in ("model", "inputs", "profile")}
    rep.update({"tensorrt_version": "10.16.0", "inputs": [{"name": n, "shape": [d if isinstance(d, int) else -1
                                                                               for d in s]} for n, s in plan["inputs"]],
                "profile": {n: {"min": list(a), "opt": list(b), "max": list(c)}
                            for n, (a, b, c) in plan["profile"].items()}})
    eng.with_name(eng.name + ".json").write_text(json.dumps(rep))
    return rep


def fake_engine(tmp_path, art, which, profile, plugins=("/opt/mq/libmq_scan_trt.so",)):
    """An engine file and the build report `mq-deploy build --json` writes for it, laid out as `mq-deploy build
    DIR/m.onnx --saveEngine DIR/m.plan --json DIR/m.plan.json` leaves them (absolute paths, one folder). The
    engine bytes are not a real plan (TensorRT cannot run here): the repository writer only copies them;
    the shapes come from the report, outputs and metadata from the ONNX the report names."""
    import shutil

    import onnx

    eng = tmp_path / f"{which}.plan"
    eng.write_bytes(b"not a real TensorRT plan")
    onnx_copy = tmp_path / f"{which}.onnx"
    shutil.copyfile(art[which], onnx_copy)
    proto = onnx.load(art[which], load_external_data=False)
    init = {i.name for i in proto.graph.initializer}
    inputs = [{"name": i.name, "shape": [d.dim_value if d.HasField("dim_value") else -1
                                         for d in i.type.tensor_type.shape.dim]}
              for i in proto.graph.input if i.name not in init]
    rep = {"onnx": str(onnx_copy), "engine": str(eng), "tensorrt_version": "10.16.0", "inputs": inputs,
           "profile": profile, "plugins": list(plugins), "warnings": []}
    (tmp_path / f"{which}.plan.json").write_text(json.dumps(rep))
    return str(eng)


def shared_object(path, needed=()):
    """A file with the header of an x86-64 ELF shared object (ET_DYN) and, as a NEEDED entry names its
    dependencies, their NUL-terminated names."""
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8) + (3).to_bytes(2, "little") + (62).to_bytes(2, "little")
    path.write_bytes(header + bytes(44) + b"".join(n.encode() + b"\0" for n in needed))
    return path


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_every_config_parses_against_tritons_schema(art, tmp_path, backend):
    repo = tmp_path / "repo"
    res = write_repository([art["vim"], art["lm"], art["lm_step"]], str(repo),
                           TritonConfig(backend=backend, max_batch=8, instances=2))
    cfgs = parse_repo(repo)
    assert set(cfgs) == {"vim", "vim_preprocess", "vim_image", "lm", "lm_step", "lm_step_generate"}
    assert {m["name"] for m in res["models"]} == set(cfgs)
    M = model_config_pb2

    vim = cfgs["vim"]
    assert vim.backend == backend and vim.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in vim.input] == [("images", M.TYPE_FP32, [1, 12, 12])]
    assert vim.output[0].label_filename == "labels.txt" and list(vim.output[0].dims) == [7]
    assert vim.HasField("dynamic_batching") and vim.instance_group[0].count == 2
    assert open(repo / "vim" / "labels.txt").read().split() == [str(i) for i in range(7)]
    assert list(cfgs["lm"].input[0].dims) == [-1] and list(cfgs["lm"].output[0].dims) == [-1, 256]

    step = cfgs["lm_step"]
    assert [i.name for i in step.input] == ["input_ids"]
    assert [o.name for o in step.output] == ["logits"]
    seq = step.sequence_batching
    assert seq.max_sequence_idle_microseconds > 0 and seq.HasField("oldest")
    if backend == "python":
        # batched decode: the oldest strategy hands one execute() up to --max-batch sequences' steps, which the
        # model stacks itself; a prefill and single-token steps (ragged) may share it
        assert step.max_batch_size == 8 and seq.oldest.max_candidate_sequences == 64
        assert list(step.input[0].dims) == [-1] and step.input[0].allow_ragged_batch
        assert list(step.output[0].dims) == [-1, 256]
        assert os.path.isfile(repo / "lm_step" / "1" / "mq_batch.py")
    elif backend == "onnxruntime":
        # Triton stacks batched implicit states along dimension 0: the batch-first copy (serve.batch_first),
        # state dims without the batch
        assert step.max_batch_size == 8 and list(step.input[0].dims) == [-1]
    else:
        # the engine takes the export's states, whose batch is dimension 1: one sequence per request
        assert step.max_batch_size == 0 and list(step.input[0].dims) == [1, -1]
    if backend == "onnxruntime":
        # implicit state: the server feeds each sequence's *_out back as the next input; zeros at START
        states = {s.input_name: s for s in seq.state}
        assert {k: v.output_name for k, v in states.items()} == {"conv_state": "conv_state_out",
                                                                 "ssm_state": "ssm_state_out"}
        assert list(states["conv_state"].dims) == [2, 64, 3] and list(states["ssm_state"].dims) == [2, 64, 16]
        assert all(len(s.initial_state) == 1 and s.initial_state[0].zero_data for s in seq.state)
        assert not seq.control_input      # ORT passes every request input to the graph, which has no START
        assert step.default_model_filename == "model.onnx"
        assert os.path.isfile(repo / "lm_step" / "1" / "model.onnx")
    else:
        kinds = {c.name: c.control[0].kind for c in seq.control_input}
        S = M.ModelSequenceBatching.Control
        assert kinds == {"START": S.CONTROL_SEQUENCE_START, "END": S.CONTROL_SEQUENCE_END,
                         "READY": S.CONTROL_SEQUENCE_READY, "CORRID": S.CONTROL_SEQUENCE_CORRID}
        assert not seq.state
        assert os.path.isfile(repo / "lm_step" / "1" / "model.py")

    gen = cfgs["lm_step_generate"]
    assert gen.backend == "python" and gen.model_transaction_policy.decoupled
    assert gen.parameters["max_generations"].string_value == "64"
    gp = {k: v.string_value for k, v in gen.parameters.items()}
    if backend == "python":
        # inline: it opens lm_step's graph itself (one instance: all generations' steps batch in one process)
        assert gen.instance_group[0].count == 1 and gp["step_inline"] == "1" and gp["onnx_file"] == "model.onnx"
        assert json.loads(gp["states"]) == [["conv_state", "conv_state_out"], ["ssm_state", "ssm_state_out"]]
        assert gp["states"] == step.parameters["states"].string_value
        assert all(os.path.isfile(repo / "lm_step_generate" / "1" / f) for f in ("mq_batch.py", "mq_ort_session.py"))
    else:
        assert gen.instance_group[0].count == 2 and "step_inline" not in gp and "states" not in gp
        assert not os.path.exists(repo / "lm_step_generate" / "1" / "mq_ort_session.py")
        assert os.path.isfile(repo / "lm_step_generate" / "1" / "mq_batch.py")     # its outbox
    # a response holds the tokens made since the stream's last one: at most 64, waiting at most 10 ms
    assert gp["max_tokens_per_response"] == "64" and gp["response_interval_us"] == "10000"
    assert gp["response_streams"] == "16"     # past 16 streams waiting, the interval grows with them
    assert [list(o.dims) for o in gen.output if o.name == "token_id"] == [[-1]]
    assert {i.name for i in gen.input} == {"text", "prompt_ids", "max_new_tokens"}
    ens = cfgs["vim_image"]
    assert ens.platform == "ensemble"
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["vim_preprocess", "vim"]
    readme = (repo / "README.md").read_text()
    assert "tritonserver --model-repository" in readme and "nvcr.io/nvidia/tritonserver" in readme
    assert "Jetson" in readme and "mq-deploy serve" in readme


def test_onnxruntime_op_library(art, tmp_path):
    lib = shared_object(tmp_path / "libmq_scan_ort.so", needed=["libmq_scan_cpu.so"])
    (tmp_path / "libmq_scan_cpu.so").write_bytes(b"\x7fELF cpu")
    (tmp_path / "libother.so").write_bytes(b"\x7fELF other")
    write_repository([art["lm"]], str(tmp_path / "r1"), TritonConfig(custom_op_lib=str(lib)))
    cfg = parse(tmp_path / "r1" / "lm" / "config.pbtxt")
    assert list(cfg.model_operations.op_library_filename) == [str(lib)]
    write_repository([art["lm"]], str(tmp_path / "r2"), TritonConfig(backend="python", custom_op_lib=str(lib)))
    cfg = parse(tmp_path / "r2" / "lm" / "config.pbtxt")
    assert cfg.parameters["custom_op_library"].string_value == "libmq_scan_ort.so"
    assert (tmp_path / "r2" / "lm" / "1" / "libmq_scan_ort.so").read_bytes() == lib.read_bytes()
    # its dependency travels with it (RUNPATH $ORIGIN), nothing else from that folder
    assert (tmp_path / "r2" / "lm" / "1" / "libmq_scan_cpu.so").read_bytes() == b"\x7fELF cpu"
    assert not (tmp_path / "r2" / "lm" / "1" / "libother.so").exists()


def test_threads_reach_every_onnx_runtime_session(art, tmp_path, capsys):
    """--threads: the Python-backend models' sessions (the inline generate model's too) and Triton's ORT backend
    (intra_op_thread_count) get it; a TensorRT repository is refused in one line; the default leaves ONNX
    Runtime's own."""
    write_repository([art["lm_step"]], str(tmp_path / "p"), TritonConfig(backend="python", threads=1))
    cfgs = parse_repo(tmp_path / "p")
    assert {n: c.parameters["intra_op_threads"].string_value for n, c in cfgs.items()} == \
        {"lm_step": "1", "lm_step_generate": "1"}
    write_repository([art["lm_step"]], str(tmp_path / "o"), TritonConfig(threads=2))
    assert parse(tmp_path / "o" / "lm_step" / "config.pbtxt").parameters["intra_op_thread_count"].string_value == "2"
    write_repository([art["lm"]], str(tmp_path / "d"), TritonConfig())
    assert "intra_op_thread_count" not in parse(tmp_path / "d" / "lm" / "config.pbtxt").parameters
    eng = fake_engine(tmp_path, art, "vim", {"images": {"min": [1, 1, 12, 12], "opt": [8, 1, 12, 12],
                                                        "max": [32, 1, 12, 12]}})
    assert_user_error(capsys, ["triton", eng, "-o", tmp_path / "t", "--threads", "2"],
                      "--threads sets ONNX Runtime's intra-op threads")
    assert not (tmp_path / "t").exists()


def test_tensorrt_plan_configs_from_the_build_report(art, tmp_path):
    vim = fake_engine(tmp_path, art, "vim", {"images": {"min": [1, 1, 12, 12], "opt": [8, 1, 12, 12],
                                                        "max": [32, 1, 12, 12]}})
    step = fake_engine(tmp_path, art, "lm_step", {
        "input_ids": {"min": [1, 1], "opt": [1, 1], "max": [1, 512]},
        "conv_state": {"min": [2, 1, 64, 3], "opt": [2, 1, 64, 3], "max": [2, 1, 64, 3]},
        "ssm_state": {"min": [2, 1, 64, 16], "opt": [2, 1, 64, 16], "max": [2, 1, 64, 16]}})
    repo = tmp_path / "repo"
    write_repository([vim, step], str(repo), TritonConfig(max_batch=64))
    cfgs = parse_repo(repo)
    v = cfgs["vim"]
    assert v.platform == "tensorrt_plan" and v.default_model_filename == "model.plan"
    assert v.max_batch_size == 32            # capped by the profile's max batch
    assert list(v.input[0].dims) == [1, 12, 12] and v.HasField("dynamic_batching")
    assert v.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(v.instance_group[0].profile) == ["0"]
    assert (repo / "vim" / "1" / "model.plan").read_bytes() == b"not a real TensorRT plan"
    s = cfgs["lm_step"]
    assert s.max_batch_size == 0 and list(s.input[0].dims) == [1, -1]
    assert {x.input_name for x in s.sequence_batching.state} == {"conv_state", "ssm_state"}
    readme = (repo / "README.md").read_text()
    assert "--backend-config=tensorrt,plugins=/opt/mq/libmq_scan_trt.so" in readme and "LD_PRELOAD" in readme
    # the report itself is an artifact too
    write_repository([str(tmp_path / "vim.plan.json")], str(tmp_path / "repo2"), TritonConfig(name="cls"))
    assert parse(tmp_path / "repo2" / "cls" / "config.pbtxt").platform == "tensorrt_plan"


def test_labels_file(art, tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"class {i}" for i in range(7)) + "\n")
    write_repository([art["vim"]], str(tmp_path / "r"), TritonConfig(labels=str(labels), backend="python"))
    assert (tmp_path / "r" / "vim" / "labels.txt").read_text().splitlines()[3] == "class 3"
    labels.write_text("a\nb\n")
    with pytest.raises(Exception, match="2 labels"):
        write_repository([art["vim"]], str(tmp_path / "r2"), TritonConfig(labels=str(labels)))
    assert not (tmp_path / "r2").exists()


def test_existing_repository_refused_and_overwrite_only_ours(art, tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("user data")
    assert_user_error(capsys, ["triton", art["vim"], "-o", repo], "already exists", "--overwrite")
    assert_user_error(capsys, ["triton", art["vim"], "-o", repo, "--overwrite"], "not written by mq-deploy")
    assert (repo / "keep.txt").read_text() == "user data"
    ours = tmp_path / "ours"
    from mq_deploy.cli.main import main

    assert main(["triton", art["vim"], "-o", str(ours), "--backend", "python"]) == 0
    assert "vim_image" in capsys.readouterr().out
    assert_user_error(capsys, ["triton", art["lm"], "-o", ours], "already exists")
    assert main(["triton", art["lm"], "-o", str(ours), "--overwrite"]) == 0
    assert sorted(p for p in os.listdir(ours) if not p.startswith(".")) == ["README.md", "lm"]


def test_bad_input_is_one_clear_line(art, tmp_path, capsys):
    out = tmp_path / "r"
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"garbage")
    assert_user_error(capsys, ["triton", bogus, "-o", out], "not a readable ONNX")
    assert_user_error(capsys, ["triton", tmp_path / "missing.onnx", "-o", out], "no such file")
    assert_user_error(capsys, ["triton", art["lm_q"], "-o", out], "is a folder", "mq-deploy export")
    assert_user_error(capsys, ["triton", art["vim"], art["lm"], "-o", out, "--name", "x"], "--name names one model")
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--name", "bad name"], "--name")
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--max-batch", "-1"], "--max-batch")
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--instances", "0"], "--instances")
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--backend", "tensorrt"], "mq-deploy build")
    assert_user_error(capsys, ["triton", art["vim"], "-o", out, "--custom-op-lib", tmp_path / "nope.so"],
                      "--custom-op-lib")
    assert_user_error(capsys, ["triton", art["vim"], art["vim"], "-o", out], "also used by")
    assert_user_error(capsys, ["triton", art["lm_step"], "-o", out, "--generate-step", "inline"],
                      "--generate-step inline", "--backend python", "--generate-step bls")
    eng = tmp_path / "e.plan"
    eng.write_bytes(b"x")
    assert_user_error(capsys, ["triton", eng, "-o", out], "build report")
    assert not out.exists()
    # never a repository that holds one of its inputs
    assert_user_error(capsys, ["triton", art["vim"], "-o", os.path.dirname(art["vim"]), "--overwrite"],
                      "holds the input")
    assert_user_error(capsys, ["serve", tmp_path], "not a Triton model repository")


def test_serve_refuses_backends_this_server_lacks(art, tmp_path, capsys):
    """pytriton's tritonserver has the Python backend only: an onnxruntime / tensorrt repository is
    refused before the server starts, with the fix."""
    from mq_deploy.errors import MQUserError
    from mq_deploy.serve.server import find_server

    try:
        find_server().close()
    except MQUserError as e:
        pytest.skip(str(e))
    write_repository([art["vim"]], str(tmp_path / "ort"), TritonConfig(backend="onnxruntime"))
    assert_user_error(capsys, ["serve", tmp_path / "ort"], "needs Triton's onnxruntime backend", "--backend python")


def test_the_package_imports_lean():
    import subprocess
    import sys

    code = ("import sys, mq_deploy.serve.repository, mq_deploy.serve.server, mq_deploy.serve.cli; "
            "bad = [m for m in ('torch', 'onnxruntime', 'tritonclient', 'onnx') if m in sys.modules]; "
            "sys.exit(1 if bad else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.fixture(scope="module", params=["fp32", "int8"])
def hybrid_step(tmp_path_factory, request):
    """A W8A8 decode-step export of a Nemotron-H hybrid (Mamba2 + attention with a KV cache + MLP) written by
    transformers, its KV caches float32 or int8 (--kv-cache): (step ONNX, its quantized checkpoint)."""
    pytest.importorskip("transformers")
    return tiny_hybrid_steps(tmp_path_factory.mktemp("hybrid"), "M*-M*", (request.param,))[request.param]


def test_hybrid_kv_caches_as_tritons_implicit_state(hybrid_step, tmp_path, capsys):
    """--backend onnxruntime: the KV caches are variable-size implicit states (schema-checked); the model file is
    the kv_sentinel copy. Triton's start (each variable dimension 1, zeros: core's SequenceStates::Initialize)
    and its feedback of every *_out are run here in ONNX Runtime on that copy: the logits equal the export's
    own decode, bit for bit, and the copy is refused where a cache slot would be misread."""
    import numpy as np

    from mq_deploy.backends.ort.runner import OrtRunner, empty_states
    from mq_deploy.runtime.apps import generate

    from helpers import ort_session

    step, q = hybrid_step
    repo = tmp_path / "repo"
    write_repository([step], str(repo), TritonConfig(backend="onnxruntime"))
    cfg = parse_repo(repo)["step"]
    states = {s.input_name: s for s in cfg.sequence_batching.state}
    assert list(states["past_key_1"].dims) == [1, 2, -1, 8] and states["past_key_1"].output_name == "present_key_1"
    assert list(states["past_key_1"].initial_state[0].dims) == [1, 2, 1, 8]
    assert list(states["ssm_state"].dims)[1] == 1 and -1 not in states["ssm_state"].dims
    assert set(states) == {"conv_state", "ssm_state", "past_key_1", "past_value_1", "past_key_4", "past_value_4"}
    copy = str(repo / "step" / "1" / "model.onnx")

    # Triton, emulated: zeros of the initial_state dims at START, then each output state fed back
    sess = ort_session(copy)
    prompt, n = list(b"And God said"), 8
    dtypes = {"TYPE_FP32": np.float32, "TYPE_INT8": np.int8}
    type_of = {name: model_config_pb2.DataType.Name(s.data_type) for name, s in states.items()}
    with open(os.path.join(q, "config.json")) as f:
        kv_cache = json.load(f)["quant"].get("kv_cache", "fp32")
    assert type_of["past_key_1"] == {"fp32": "TYPE_FP32", "int8": "TYPE_INT8"}[kv_cache]
    assert type_of["ssm_state"] == "TYPE_FP32"
    feeds = {name: np.zeros(list(s.initial_state[0].dims), dtypes[type_of[name]]) for name, s in states.items()}
    served, ids = [], prompt
    for _ in range(n):
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": np.asarray([ids]), **feeds})))
        tok = int(outs["logits"][0, -1].astype(np.float64).argmax())
        served.append(tok)
        feeds = {name: outs[s.output_name] for name, s in states.items()}
        ids = [tok]
    assert feeds["past_key_4"].shape[2] == 1 + len(prompt) + n - 1
    want = generate(OrtRunner(step, custom_op_library=False), prompt, n)
    print("served:", served, "\nexport:", want)
    assert served == want
    # the copy run through OrtRunner starts its caches at the one slot, and generates the same
    runner = OrtRunner(copy, custom_op_library=False)
    assert empty_states(runner, 1)["past_key_1"].shape == (1, 2, 1, 8)
    assert generate(runner, prompt, n) == want
    # the copy is not an export: verify and triton refuse it in one line
    assert_user_error(capsys, ["verify", copy, "--reference", q], "Triton repository's copy")
    assert_user_error(capsys, ["triton", copy, "-o", str(tmp_path / "again")], "Triton repository's copy")
    # TensorRT engines are built from the export, without the slot: refused with the way out
    shapes = {"min": [1, 1], "opt": [1, 1], "max": [1, 64]}
    eng = fake_engine(tmp_path, {"nh": step}, "nh", {"input_ids": shapes})
    assert_user_error(capsys, ["triton", eng, "-o", str(tmp_path / "trt")], "KV caches grow",
                      "--kv-slot", "--backend onnxruntime or python")


def test_tensorrt_engine_with_the_kv_slot_as_implicit_state(hybrid_step, tmp_path, capsys):
    """`mq-deploy build STEP.onnx --kv-slot`: TensorRT parses the copy whose KV caches carry Triton's start slot
    (what plan_build hands Polygraphy; no TensorRT here, so the engine file is a stand-in), the caches' profile
    follows input_ids', and `triton --backend tensorrt` serves the engine with the caches as variable-size
    implicit state (schema-checked). The graph TensorRT parses is run here in ONNX Runtime as Triton feeds it:
    its tokens equal the export's own decode."""
    import shutil

    import numpy as np

    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.backends.trt.build import EngineBuildConfig, plan_build
    from mq_deploy.runtime.apps import generate

    from helpers import ort_lib_marker, ort_session

    step, q = hybrid_step
    step = str(shutil.copyfile(step, tmp_path / "nh.onnx"))      # engine, ONNX and report in one folder
    eng = tmp_path / "nh.plan"
    plan = plan_build(step, eng, EngineBuildConfig(kv_slot=True, min_shapes="input_ids:1x1",
                                                   opt_shapes="input_ids:1x16", max_shapes="input_ids:1x64"))
    assert plan["kv_cache"] == "sentinel"
    assert plan["profile"]["past_key_1"] == ((1, 2, 1, 8), (1, 2, 17, 8), (1, 2, 65, 8))
    assert plan["profile"]["ssm_state"][0] == plan["profile"]["ssm_state"][2]       # batch 1: fixed
    rep = stand_in_engine(plan, eng)
    repo = tmp_path / "repo"
    write_repository([str(eng)], str(repo), TritonConfig(backend="tensorrt"))
    cfg = parse_repo(repo)["nh"]
    assert cfg.platform == "tensorrt_plan"
    states = {s.input_name: s for s in cfg.sequence_batching.state}
    assert list(states["past_key_1"].dims) == [1, 2, -1, 8] and list(states["past_key_1"].initial_state[0].dims) == [1, 2, 1, 8]
    assert list(states["ssm_state"].dims)[1] == 1
    # Triton, emulated on the graph TensorRT parses: its mq::SSDScan has no body left (the plugin's op), so
    # ONNX Runtime runs it with our native op library in the plugin's place
    import onnxruntime as ort

    lib, mark = ort_lib_marker()
    if mark.args[0]:                 # not built, and not required (MQ_REQUIRE_NATIVE)
        pytest.skip(f"{lib} is not built")
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    sess = ort_session(plan["model"], so)
    dtypes = {"TYPE_FP32": np.float32, "TYPE_INT8": np.int8}
    feeds = {n: np.zeros(list(s.initial_state[0].dims), dtypes[model_config_pb2.DataType.Name(s.data_type)])
             for n, s in states.items()}
    prompt, n, served, ids = list(b"And God said"), 6, [], list(b"And God said")
    for _ in range(n):
        outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input_ids": np.asarray([ids]), **feeds})))
        served.append(int(outs["logits"][0, -1].astype(np.float64).argmax()))
        feeds = {name: outs[s.output_name] for name, s in states.items()}
        ids = [served[-1]]
    assert served == generate(OrtRunner(step, custom_op_library=False), prompt, n)
    # refused in one line: the flag where it has no meaning, and a report whose profile misses the slot
    assert_user_error(capsys, ["build", step, "--kv-slot", "--backend", "onnxruntime"], "--kv-slot is for TensorRT")
    assert_user_error(capsys, ["build", step, "--kv-slot", "--saveEngine", str(tmp_path / "x.plan")],
                      "give input_ids' shapes")
    rep["profile"]["past_key_1"]["min"][2] = 0
    (tmp_path / "nh.plan.json").write_text(json.dumps(rep))
    assert_user_error(capsys, ["triton", str(eng), "-o", str(tmp_path / "r2"), "--backend", "tensorrt"],
                      "must start its length at 1")
    rep["kv_cache"] = "yes"
    (tmp_path / "nh.plan.json").write_text(json.dumps(rep))
    assert_user_error(capsys, ["triton", str(eng), "-o", str(tmp_path / "r3"), "--backend", "tensorrt"],
                      "kv_cache must be")


def test_kv_slot_needs_a_kv_cache(art, tmp_path, capsys):
    assert_user_error(capsys, ["build", art["lm_step"], "--kv-slot", "--maxShapes", "input_ids:1x8",
                               "--saveEngine", str(tmp_path / "x.plan")], "has no KV cache")
    assert_user_error(capsys, ["build", art["lm"], "--kv-slot", "--maxShapes", "input_ids:1x8",
                               "--saveEngine", str(tmp_path / "y.plan")], "not a decode-step export")


def _triton_batched(sess, states, prompt, lens):
    """Triton's batching of implicit state, emulated on a batch-first graph: each sequence's zero initial states
    (the config's dims) stacked along dimension 0, one call per round for all live sequences, each *_out split
    back and fed to the next round; sequence k leaves after lens[k] tokens. Returns ({k: tokens}, [(k, ids, its
    batch-first states before the step, its logits row)] per step)."""
    import numpy as np

    zeros = {name: np.zeros([1] + list(s.initial_state[0].dims), np.float32) for name, s in states.items()}
    live = {k: dict(zeros) for k in lens}
    feed, out, steps = {k: prompt for k in lens}, {k: [] for k in lens}, []
    while live:
        order = sorted(live)
        batch = {name: np.concatenate([live[k][name] for k in order]) for name in states}
        res = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {"input_ids": np.asarray([feed[k] for k in order], np.int64), **batch})))
        for j, k in enumerate(order):
            steps.append((k, feed[k], live[k], res["logits"][j, -1]))
            out[k].append(int(res["logits"][j, -1].astype(np.float64).argmax()))
            live[k] = {name: res[s.output_name][j:j + 1] for name, s in states.items()}
            feed[k] = [out[k][-1]]
            if len(out[k]) == lens[k]:
                del live[k]
    return out, steps


def test_onnxruntime_backend_batches_ssm_states_batch_first(art, tmp_path, capsys):
    """--backend onnxruntime, a pure SSM step graph: max_batch_size > 0 and the model file is serve.batch_first's
    copy (states [batch, layers, ...], schema-checked dims without the batch). Triton's batching of implicit
    state, emulated in ONNX Runtime on that copy (_triton_batched: three sequences, one leaving after four
    tokens): every sequence's tokens equal `generate` of the export alone, and its logits are within
    BATCH_RTOL of the export's own steps. The copy is refused where the export is meant."""
    import numpy as np

    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate

    from helpers import BATCH_RTOL, batch_error, ort_session

    repo = tmp_path / "repo"
    write_repository([art["lm_step"]], str(repo), TritonConfig(backend="onnxruntime", max_batch=8))
    cfg = parse_repo(repo)["lm_step"]
    assert cfg.max_batch_size == 8 and list(cfg.input[0].dims) == [-1] and not cfg.input[0].allow_ragged_batch
    states = {s.input_name: s for s in cfg.sequence_batching.state}
    assert list(states["conv_state"].dims) == [2, 64, 3] and list(states["ssm_state"].dims) == [2, 64, 16]
    assert list(states["ssm_state"].initial_state[0].dims) == [2, 64, 16]
    copy = str(repo / "lm_step" / "1" / "model.onnx")
    export = OrtRunner(art["lm_step"], custom_op_library=False)
    prompt, lens = list(b"And God"), {0: 8, 1: 4, 2: 8}      # equal lengths: Triton batches equal shapes
    out, steps = _triton_batched(ort_session(copy), states, prompt, lens)
    worst = 0.0
    for _, ids, fed, logits in steps:
        alone = export.infer({"input_ids": np.asarray([ids], np.int64),
                              **{name: np.ascontiguousarray(np.swapaxes(fed[name], 0, 1)) for name in states}})
        worst = max(worst, batch_error(logits, alone["logits"][0, -1]))
    with capsys.disabled():
        print(f"\nbatch-first copy, 3 sequences: max |batched - alone| / max |logits| = {worst:.3g} "
              f"(tolerance {BATCH_RTOL})")
    assert worst <= BATCH_RTOL
    for k in lens:
        assert out[k] == generate(export, prompt, lens[k]), k
    assert_user_error(capsys, ["generate", copy, "--prompt", "And"], "Triton repository's copy", "batch-first")
    assert_user_error(capsys, ["triton", copy, "-o", str(tmp_path / "again")], "Triton repository's copy")
    # batching off: the export itself, one sequence per request
    write_repository([art["lm_step"]], str(tmp_path / "off"), TritonConfig(backend="onnxruntime", max_batch=0))
    assert parse_repo(tmp_path / "off")["lm_step"].max_batch_size == 0


def test_tensorrt_engine_with_batch_first_states(art, tmp_path, capsys):
    """`mq-deploy build STEP.onnx --batch-states`: TensorRT parses the batch-first copy (what plan_build hands
    Polygraphy; no TensorRT here, so the engine file is a stand-in), the states' batch follows input_ids' in the
    profile, and `triton --backend tensorrt` gives max_batch_size min(--max-batch, that batch) with state dims
    without the batch (schema-checked). The graph TensorRT parses is run here in ONNX Runtime, our native op in
    the plugin's place, as Triton batches it: every sequence's tokens equal the export's own decode. Refused
    in one line: the flag on ONNX Runtime, with --kv-slot, and a report whose states' profile misses batch 1."""
    import shutil

    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.backends.trt.build import EngineBuildConfig, plan_build
    from mq_deploy.runtime.apps import generate

    from helpers import ort_lib_marker, ort_session

    step = str(shutil.copyfile(art["lm_step"], tmp_path / "lm.onnx"))     # engine, ONNX and report in one folder
    eng = tmp_path / "lm.plan"
    plan = plan_build(step, eng, EngineBuildConfig(batch_states=True, min_shapes="input_ids:1x1",
                                                   opt_shapes="input_ids:4x1", max_shapes="input_ids:8x16"))
    assert plan["state_layout"] == "batch_first"
    assert plan["profile"]["ssm_state"] == ((1, 2, 64, 16), (4, 2, 64, 16), (8, 2, 64, 16))
    rep = stand_in_engine(plan, eng)
    repo = tmp_path / "repo"
    write_repository([str(eng)], str(repo), TritonConfig(backend="tensorrt", max_batch=64))
    cfg = parse_repo(repo)["lm"]
    assert cfg.platform == "tensorrt_plan" and cfg.max_batch_size == 8
    states = {s.input_name: s for s in cfg.sequence_batching.state}
    assert list(states["ssm_state"].dims) == [2, 64, 16] and list(states["conv_state"].dims) == [2, 64, 3]
    assert_user_error(capsys, ["build", step, "--batch-states", "--backend", "onnxruntime"],
                      "--batch-states is for TensorRT")
    with pytest.raises(Exception, match="exclude each other"):
        EngineBuildConfig(batch_states=True, kv_slot=True)
    bad = dict(rep, profile={**rep["profile"], "ssm_state": {"min": [2, 2, 64, 16], "opt": [4, 2, 64, 16],
                                                             "max": [8, 2, 64, 16]}})
    (tmp_path / "lm.plan.json").write_text(json.dumps(bad))
    assert_user_error(capsys, ["triton", str(eng), "-o", str(tmp_path / "r2"), "--backend", "tensorrt"],
                      "--batch-states", "from 1")
    # Triton's batching, emulated on the graph TensorRT parses (its mq:: nodes have no bodies: the native op)
    import onnxruntime as ort

    lib, mark = ort_lib_marker()
    if mark.args[0]:
        pytest.skip(f"{lib} is not built")
    so = ort.SessionOptions()
    so.register_custom_ops_library(lib)
    prompt, lens = list(b"And God"), {0: 6, 1: 3, 2: 6}
    out, _ = _triton_batched(ort_session(plan["model"], so), states, prompt, lens)
    export = OrtRunner(step, custom_op_library=False)
    for k in lens:
        assert out[k] == generate(export, prompt, lens[k]), k
