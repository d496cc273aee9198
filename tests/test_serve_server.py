"""A real tritonserver (pytriton's, Python backend, CPU) serving a repository `mq-deploy triton --backend
python` wrote, on 127.0.0.1 with free ports, queried over HTTP and gRPC with tritonclient.

Every served output is compared with mq_deploy's ONNX Runtime runner on the same inputs for exact
equality (the server runs the same ONNX file in the same onnxruntime version with the same session
options; nothing in between may change a bit). Every client loop is bounded, every call has a timeout.

Skipped where no tritonserver, or no numpy/onnxruntime for its Python stub, is installed, unless
MQ_REQUIRE_TRITON=1 (CI sets it: there a missing server is a failure, not a skip).
"""

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from helpers import BATCH_RTOL, batch_error, small_vim, tiny_exports

pytest.importorskip("onnxruntime")
httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

from mq_deploy.errors import MQUserError  # noqa: E402
from mq_deploy.serve import server as triton  # noqa: E402

TIMEOUT = 60          # seconds, for any one client call


def _server_missing():
    try:
        inst = triton.find_server()
    except MQUserError as e:
        return str(e)
    try:
        if inst.stub_python:
            py = f"/usr/bin/python{inst.stub_python}"
            r = subprocess.run([py, "-c", "import numpy, onnxruntime, tokenizers, PIL"], capture_output=True, text=True)
            if r.returncode:
                return f"{py} (the Python-backend stub's interpreter) cannot import numpy, onnxruntime, " \
                       "tokenizers and PIL"
    finally:
        inst.close()
    return None


_missing = _server_missing()
if _missing:
    if os.environ.get("MQ_REQUIRE_TRITON") == "1":
        raise RuntimeError(f"MQ_REQUIRE_TRITON=1 but: {_missing}")
    pytest.skip(_missing, allow_module_level=True)


@pytest.fixture(scope="module")
def art():
    return tiny_exports()


@pytest.fixture(scope="module")
def ref(art):
    from mq_deploy.backends.ort.runner import OrtRunner

    # like for like: the served models run the scans' function bodies (no --custom-op-lib); the native
    # library has its own test below
    return {k: OrtRunner(art[k], custom_op_library=False) for k in ("vim", "lm", "lm_step")}


@pytest.fixture(scope="module")
def bpe_step(tmp_path_factory):
    """The decode-step export of an HF MambaForCausalLM (save_pretrained) with its own BPE tokenizer.json,
    which the export carries in its metadata."""
    import torch
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from mq_deploy.cli.main import main

    from helpers import train_bpe

    root = tmp_path_factory.mktemp("bpe")
    d = root / "hf"
    d.mkdir()
    tok = train_bpe(d / "tokenizer.json", vocab_size=300, text="In the beginning God created the heaven. " * 50
                    + "Naïve café — 日本語 🙂 " * 20)
    cfg = transformers.MambaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                   state_size=8, eos_token_id=0)
    torch.manual_seed(0)
    m = transformers.MambaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(d)
    assert main(["export", str(d), "-o", str(root / "bpe_step.onnx"), "--decode-step"]) == 0
    return str(root / "bpe_step.onnx")


def odd_pictures(folder, rng):
    """JPEGs and PNGs of the sizes and modes that trip a transform: exactly 224, off by one, landscape,
    portrait, grey, RGBA; in colours and stripes that differ from picture to picture."""
    from PIL import Image

    folder.mkdir()
    for k, (w, h, mode, ext) in enumerate([(224, 224, "RGB", "jpg"), (300, 200, "RGB", "jpg"), (225, 224, "RGB", "jpg"),
                                           (500, 375, "RGB", "jpg"), (200, 300, "RGB", "jpg"), (224, 224, "L", "png"),
                                           (320, 240, "RGBA", "png"), (256, 256, "RGB", "png")]):
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = (np.sin(xx / (3 + 2 * k)) * np.cos(yy / (4 + k)) + 1) * 80
        a = np.stack([stripes + rng.uniform(0, 95) for _ in range(4)], -1) + rng.integers(0, 30, (h, w, 4))
        a = a.clip(0, 255).astype(np.uint8)
        a = {"RGB": a[..., :3], "L": a[..., 0], "RGBA": a}[mode]
        Image.fromarray(a, mode).save(folder / f"{k}_{w}x{h}_{mode}.{ext}")
    return folder


@pytest.fixture(scope="module")
def vim224(tmp_path_factory):
    """A 224-px, 3-channel Vim (patch 16, ImageNet mean/std: hustvl's eval transform applies) in mq-deploy's
    format, its FP32 export, and a folder of odd-sized pictures: (checkpoint folder, ONNX, pictures). A
    random model puts every picture in one class (its head bias dominates); the bias is centred on these
    pictures so the class depends on the picture and a wrong crop shows as a different class."""
    import torch

    from mq_deploy.cli.main import main
    from mq_deploy.evaluate import vim_data
    from mq_deploy.models.io import save_model

    d = tmp_path_factory.mktemp("vim224")
    pics = odd_pictures(d / "pics", np.random.default_rng(11))
    m = small_vim(img=224, patch=16, chans=3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), d_model=32)
    x, _ = vim_data(type("Loaded", (), {"config": m.cfg})(), str(pics), "test", None, scoring=False)
    with torch.no_grad():
        m.head.weight.mul_(4.0)
        m.head.bias.sub_(m(x[:]).mean(0))
    folder = str(save_model(m, str(d / "fp")))
    assert main(["export", folder, "-o", str(d / "vim224.onnx")]) == 0
    return folder, str(d / "vim224.onnx"), pics


@pytest.fixture(scope="module")
def family_steps(tmp_path_factory):
    """W8A8 decode-step exports of a Mamba2 and a Nemotron-H hybrid (Mamba2 + attention + MLP: SSM states and
    a KV cache per attention layer; nh8_step: the same hybrid with int8 caches, --kv-cache int8; nhs8_step: with
    int8 SSM states, --state-dtype int8), from folders transformers wrote: {"m2_step": path, ...}."""
    import torch
    transformers = pytest.importorskip("transformers")
    from mq_deploy.cli.main import main

    root = tmp_path_factory.mktemp("families")
    text = root / "text.txt"
    text.write_bytes(b"In the beginning God created the heaven and the earth. And God said, Let there be light. " * 60)
    torch.manual_seed(0)
    models = {
        "m2_step": transformers.Mamba2ForCausalLM(transformers.Mamba2Config(
            vocab_size=256, hidden_size=32, num_heads=4, head_dim=16, state_size=8, num_hidden_layers=2,
            n_groups=2, chunk_size=8)),
        "nh_step": transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
            vocab_size=256, hidden_size=32, hybrid_override_pattern="M*-M", num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, intermediate_size=64, mamba_num_heads=4, mamba_head_dim=16,
            ssm_state_size=8, n_groups=2, chunk_size=8))}
    out = {}
    for name, m in models.items():
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        m.save_pretrained(root / name)
        for kv in ("fp32", "int8") if name == "nh_step" else ("fp32",):
            key = name if kv == "fp32" else "nh8_step"
            q = str(root / f"{key}_q")
            assert main(["quantize", str(root / name), "-o", q, "--calib", str(text), "--calib-samples", "2",
                         "--seq-len", "64", "--kv-cache", kv]) == 0
            out[key] = str(root / f"{key}.onnx")
            assert main(["export", q, "-o", out[key], "--decode-step"]) == 0
            if key == "nh_step":        # nhs8_step: its SSM states stored as int8 (--state-dtype int8)
                out["nhs8_step"] = str(root / "nhs8_step.onnx")
                assert main(["export", q, "-o", out["nhs8_step"], "--decode-step", "--state-dtype", "int8"]) == 0
    return out


@pytest.fixture(scope="module")
def served(art, bpe_step, vim224, family_steps, tmp_path_factory):
    from mq_deploy.serve.repository import TritonConfig, write_repository

    d = tmp_path_factory.mktemp("served")
    repo = str(d / "repo")
    write_repository([art["vim"], art["lm"], art["lm_step"], bpe_step, vim224[1], family_steps["m2_step"],
                      family_steps["nh_step"], family_steps["nh8_step"], family_steps["nhs8_step"]], repo,
                     TritonConfig(backend="python", max_batch=8, instances=1, max_sequences=16))
    srv = triton.TritonServer(repo, log_path=str(d / "tritonserver.log"), metrics_port=triton.free_port("127.0.0.1"))
    t0 = time.monotonic()
    srv.start()
    print(f"tritonserver ready in {time.monotonic() - t0:.1f} s on {srv.http_url} / {srv.grpc_url}")
    clients = []
    srv.http = lambda: clients.append(httpclient.InferenceServerClient(srv.http_url, network_timeout=TIMEOUT,
                                                                       connection_timeout=TIMEOUT)) or clients[-1]
    srv.grpc = lambda: clients.append(grpcclient.InferenceServerClient(srv.grpc_url)) or clients[-1]
    yield srv
    for c in clients:
        c.close()
    t0 = time.monotonic()
    rc = srv.stop()
    print(f"tritonserver stopped in {time.monotonic() - t0:.1f} s, exit status {rc}")
    assert rc == 0, srv.log_text()      # a clean shutdown: SIGINT, models unloaded, exit 0


def infer(client, model, **arrays):
    mod = httpclient if isinstance(client, httpclient.InferenceServerClient) else grpcclient
    inputs = []
    for name, a in arrays.items():
        i = mod.InferInput(name, list(a.shape), {np.float32: "FP32", np.int64: "INT64", np.float64: "FP64",
                                                 np.int32: "INT32"}[a.dtype.type])
        i.set_data_from_numpy(a)
        inputs.append(i)
    kw = {} if mod is httpclient else {"client_timeout": TIMEOUT}
    return client, mod, inputs, kw


def call(client, model, outputs=("logits",), seq=None, **arrays):
    client, mod, inputs, kw = infer(client, model, **arrays)
    if seq is not None:
        kw.update(sequence_id=seq[0], sequence_start=seq[1], sequence_end=seq[2])
    r = client.infer(model, inputs, **kw)
    return {o: r.as_numpy(o) for o in outputs}


def assert_exact(got, want, what):
    err = float(np.abs(got.astype(np.float64) - want).max()) if got.shape == want.shape else float("nan")
    print(f"{what}: max |served - OrtRunner| = {err}")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got, want), what


def test_http_and_grpc_outputs_equal_the_ort_runner(served, ref):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 1, 12, 12)).astype(np.float32)
    ids = rng.integers(0, 256, (2, 17)).astype(np.int64)
    want_vim = ref["vim"].infer({"images": x})["logits"]
    want_lm = ref["lm"].infer({"input_ids": ids})["logits"]
    for client in (served.http(), served.grpc()):
        kind = type(client).__module__.split(".")[1]
        assert_exact(call(client, "vim", images=x)["logits"], want_vim, f"vim over {kind}")
        assert_exact(call(client, "lm", input_ids=ids)["logits"], want_lm, f"lm over {kind}")


def test_eight_concurrent_clients(served, ref):
    rng = np.random.default_rng(2)
    work = [[rng.standard_normal((1 + (c + k) % 2, 1, 12, 12)).astype(np.float32) for k in range(6)] for c in range(8)]
    want = [[ref["vim"].infer({"images": x})["logits"] for x in w] for w in work]
    ids = [rng.integers(0, 256, (1, 9)).astype(np.int64) for _ in range(8)]
    want_lm = [ref["lm"].infer({"input_ids": i})["logits"] for i in ids]

    def client_loop(c):
        client = served.http() if c % 2 else served.grpc()
        got = [call(client, "vim", images=x)["logits"] for x in work[c]]     # 6 requests, bounded
        return got, call(client, "lm", input_ids=ids[c])["logits"]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client_loop, range(8), timeout=TIMEOUT * 4))
    for c, (got, got_lm) in enumerate(results):
        for k, (g, w) in enumerate(zip(got, want[c])):
            assert_exact(g, w, f"client {c} request {k}")
        assert_exact(got_lm, want_lm[c], f"client {c} lm")


def assert_close(got, want, what):
    """A step that may have run batched with other sequences: within BATCH_RTOL of the sequence alone."""
    err = batch_error(got, want)
    print(f"{what}: max |served - OrtRunner| / max |OrtRunner| = {err:.3g} (tolerance {BATCH_RTOL})")
    assert got.dtype == want.dtype and err <= BATCH_RTOL, what


def reference_steps(step_runner, prompt, n):
    """Logits of a prefill and n greedy decode steps, computed by the ORT runner with explicit states."""
    from mq_deploy.backends.ort.runner import empty_states, state_layout
    from mq_deploy.runtime.apps import generate

    layout = state_layout(step_runner)
    feeds = {"input_ids": np.asarray([prompt], np.int64), **empty_states(step_runner, 1)}
    out = []
    for _ in range(n + 1):
        r = step_runner.infer(feeds)
        out.append(r["logits"])
        tok = int(r["logits"][0, -1].astype(np.float64).argmax())
        feeds = {"input_ids": np.asarray([[tok]], np.int64), **{name: r[o] for name, o, _ in layout}}
    assert [int(o[0, -1].astype(np.float64).argmax()) for o in out[:n]] == generate(step_runner, prompt, n)
    return out


def test_interleaved_sequences_keep_separate_states(served, ref):
    prompts = [list(b"And God said"), list(b"In the beginning"), list(b"Let there be"), list(b"and the earth")]
    n = 6
    want = [reference_steps(ref["lm_step"], p, n) for p in prompts]
    clients = [served.http(), served.grpc(), served.http(), served.grpc()]
    seqs = [1001, 1002, 1003, 1004]
    got = [[] for _ in prompts]
    feeds = [np.asarray([p], np.int64) for p in prompts]
    for step in range(n + 1):          # round robin: every sequence advances one step per round
        for s, client in enumerate(clients):
            logits = call(client, "lm_step", input_ids=feeds[s], seq=(seqs[s], step == 0, step == n))["logits"]
            got[s].append(logits)
            feeds[s] = np.asarray([[int(logits[0, -1].astype(np.float64).argmax())]], np.int64)
    for s in range(len(prompts)):
        for k in range(n + 1):
            assert_exact(got[s][k], want[s][k], f"sequence {seqs[s]} step {k}")

    # the same sequences again, from 4 threads at once: still separate
    def run(s):
        out, feed = [], np.asarray([prompts[s]], np.int64)
        client = served.grpc()
        for step in range(n + 1):
            logits = call(client, "lm_step", input_ids=feed, seq=(2000 + s, step == 0, step == n))["logits"]
            out.append(logits)
            feed = np.asarray([[int(logits[0, -1].astype(np.float64).argmax())]], np.int64)
        return out

    with ThreadPoolExecutor(4) as pool:      # their steps may share an ORT call: within the batch tolerance
        for s, out in enumerate(pool.map(run, range(4), timeout=TIMEOUT * 4)):
            for k in range(n + 1):
                assert_close(out[k], want[s][k], f"threaded sequence {s} step {k}")


def generate_metrics(srv, model):
    """(steps, step-graph calls) of an inline generate model so far (server.generate_counters)."""
    return triton.generate_counters(f"127.0.0.1:{srv.metrics_port}", model, TIMEOUT)


def step_stats(client, model):
    """(requests, executions) of a model so far, from Triton's statistics: fewer executions than requests means
    execute() got several sequences' requests at once."""
    st = client.get_inference_statistics(model)["model_stats"][0]
    return int(st["inference_count"]), int(st["execution_count"])


@pytest.mark.parametrize("model", ["lm_step", "nh8_step", "nhs8_step"])
def test_batched_decode_with_interleaved_starts_and_ends(served, family_steps, model):
    """Sequences of different prompt lengths start at different rounds, run different numbers of steps, one stops
    mid-batch without END (dropped out), the others end with END; each round every live sequence sends its step
    at once, from its own client. Every step's logits are within the batch tolerance of the sequence alone, and
    the step model ran fewer executions than requests (the rounds were batched). For the hybrid (int8 KV caches)
    only sequences with equally long caches share an ORT call: equal prompts here, the others alone."""
    from mq_deploy.backends.ort.runner import OrtRunner

    path = tiny_exports()["lm_step"] if model == "lm_step" else family_steps[model]
    runner = OrtRunner(path, custom_op_library=False)
    prompts = [b"And God said", b"In the beginning", b"Let", b"And God said", b"light and", b"In the beginning",
               b"the earth", b"And God said"]
    n = 7
    want = [reference_steps(runner, list(p), n) for p in prompts]
    # tokens fed to each step: the reference's greedy choices, so a served step is compared on the same input
    toks = [[int(w[0, -1].astype(np.float64).argmax()) for w in ws] for ws in want]
    begin = [0, 0, 1, 1, 2, 3, 3, 4]
    last = [n, n - 2, n, 3, n, n - 1, n, n - 3]        # the last step each sends; sequence 3 then vanishes
    vanish = 3
    seq_ids = [5000 + 100 * (model != "lm_step") + s for s in range(len(prompts))]
    clients = [served.grpc() for _ in prompts]
    stats = served.http()
    before = step_stats(stats, model)
    sent = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        for rnd in range(max(b + n for b in begin) + 1):
            jobs = []
            for s in range(len(prompts)):
                k = rnd - begin[s]
                if 0 <= k <= last[s]:
                    ids = np.asarray([list(prompts[s])], np.int64) if k == 0 else np.asarray([[toks[s][k - 1]]],
                                                                                            np.int64)
                    end = k == last[s] and s != vanish
                    jobs.append((s, k, pool.submit(call, clients[s], model, input_ids=ids,
                                                   seq=(seq_ids[s], k == 0, end))))
            for s, k, fut in jobs:
                assert_close(fut.result(timeout=TIMEOUT)["logits"], want[s][k], f"{model} sequence {s} step {k}")
                sent += 1
    after = step_stats(stats, model)
    requests, executions = after[0] - before[0], after[1] - before[1]
    print(f"{model}: {requests} step requests in {executions} executions")
    assert requests == sent and executions < requests
    # the vanished sequence held no one up; its state is still there, and its END frees it (a sequence that never
    # ends holds its slot until max_sequence_idle_microseconds, and a server stopped before waits for it)
    k = last[vanish] + 1
    got = call(clients[vanish], model, input_ids=np.asarray([[toks[vanish][k - 1]]], np.int64),
               seq=(seq_ids[vanish], False, True))
    assert_exact(got["logits"], want[vanish][k], f"{model} sequence {vanish} back after the others went on")


def test_the_generate_model_serves_many_streams_at_once(served, ref):
    """24 streams at once from 24 clients (8 prompts, 16..40 tokens): each equals `generate` greedy, and the
    generate model, which runs the step graph itself (inline), ran them in fewer step-graph calls than steps
    (the generations overlapped and were batched; its Prometheus counters). Then 32
    long streams against max_generations 16: 16 run at once and 16 wait, the next ones are refused at once with
    one line; cancelled, they wind down and the server serves as before."""
    from mq_deploy.runtime.apps import generate

    prompts = [b"And God said", b"In the beginning", b"Let there be", b"and the earth", b"light", b"And it came",
               b"The LORD is", b"Blessed are"]
    lens = [16 + 8 * (k % 4) for k in range(24)]
    want = {(p, m): generate(ref["lm_step"], list(p), m) for p in prompts for m in set(lens)}
    before = generate_metrics(served, "lm_step_generate")

    sizes = []

    def stream(k, n=None):
        client = grpcclient.InferenceServerClient(served.grpc_url)
        try:
            return stream_generate(client, "lm_step_generate",
                                   gen_inputs(text=prompts[k % len(prompts)], n=n or lens[k]), sizes=sizes)
        finally:
            client.close()

    with ThreadPoolExecutor(24) as pool:
        got = list(pool.map(stream, range(24), timeout=TIMEOUT * 4))
    for k, g in enumerate(got):
        assert g == want[(prompts[k % len(prompts)], lens[k])], f"stream {k}"
    # a response holds the tokens its stream made since the last one (10 ms by default), at most 64
    print(f"24 streams, {sum(lens)} tokens in {len(sizes)} responses: {sorted(collections.Counter(sizes).items())}")
    assert max(sizes) <= 64 and len(sizes) < sum(lens)
    deadline = time.monotonic() + TIMEOUT
    while True:         # the generate model sends its counts once its sender idles
        after = generate_metrics(served, "lm_step_generate")
        steps, calls = after[0] - before[0], after[1] - before[1]
        if steps >= sum(lens) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    print(f"24 streams: {steps} steps in {calls} step-graph calls of the inline generate model")
    assert steps == sum(lens) and calls < steps / 2

    # the bound: 32 long streams, of which 16 run (max_generations) and 16 wait for a thread; 4 more are refused
    # at once, in one line; then all are cancelled, and the server still serves
    clients, queues = [], []
    try:
        for k in range(32):
            c = grpcclient.InferenceServerClient(served.grpc_url)
            q = queue.Queue()
            c.start_stream(callback=lambda result, error, q=q: q.put((result, error)))
            c.async_stream_infer("lm_step_generate", gen_inputs(text=prompts[k % len(prompts)], n=4000))
            clients.append(c)
            queues.append(q)
        deadline = time.monotonic() + TIMEOUT
        while sum(not q.empty() for q in queues) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        started = sum(not q.empty() for q in queues)
        firsts = [q.queue[0] for q in queues if not q.empty()]      # (result, error): what each started stream got
        errors = [str(e).splitlines()[0] for _, e in firsts if e is not None]
        assert started == 16, f"{started} of 32 generations run at once, max_generations is 16; errors: {errors}"
        refused = []
        for _ in range(4):
            with pytest.raises(InferenceServerException) as e:
                stream_generate(served.grpc(), "lm_step_generate", gen_inputs(text=b"And", n=4))
            refused.append(str(e.value))
        print("refused:", refused[0])
        assert all("16 generations are running and 16 waiting (max_generations); retry later" in r and "\n" not in r
                   for r in refused)
    finally:
        for c in clients:
            c.stop_stream(cancel_requests=True)
            c.close()
    deadline, got = time.monotonic() + TIMEOUT, None
    while time.monotonic() < deadline:      # the cancelled generations wind down, freeing their threads
        try:
            got = stream_generate(served.grpc(), "lm_step_generate", gen_inputs(text=b"And God", n=8))
            break
        except InferenceServerException as e:
            assert "retry later" in str(e)
            time.sleep(0.2)
    assert got == generate(ref["lm_step"], list(b"And God"), 8)


def test_generate_with_bls_steps_on_the_step_model(art, ref, tmp_path):
    """--generate-step bls (the way for a step model on another backend): each step a BLS request to the step
    model, whose sequence batcher batches the generations' steps; 12 concurrent streams each equal `generate`,
    in fewer step-model executions than step requests, each response one token (--max-tokens-per-response 1,
    --response-interval-us 0); the server stops cleanly."""
    from mq_deploy.runtime.apps import generate
    from mq_deploy.serve.repository import TritonConfig, write_repository

    repo = str(tmp_path / "repo")
    write_repository([art["lm_step"]], repo, TritonConfig(backend="python", max_batch=8, generate_step="bls",
                                                          max_tokens_per_response=1, response_interval_us=0))
    with open(os.path.join(repo, "lm_step_generate", "config.pbtxt")) as f:
        assert "step_inline" not in f.read()
    prompts = [b"And God said", b"In the beginning", b"Let there be", b"light"]
    lens = [10 + 4 * (k % 3) for k in range(12)]
    srv = triton.TritonServer(repo, log_path=str(tmp_path / "tritonserver.log"))
    srv.start()
    try:
        stats = httpclient.InferenceServerClient(srv.http_url, network_timeout=TIMEOUT)
        before = step_stats(stats, "lm_step")

        sizes = []

        def stream(k):
            client = grpcclient.InferenceServerClient(srv.grpc_url)
            try:
                return stream_generate(client, "lm_step_generate", gen_inputs(text=prompts[k % 4], n=lens[k]),
                                       sizes=sizes)
            finally:
                client.close()

        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(stream, range(12), timeout=TIMEOUT * 4))
        after = step_stats(stats, "lm_step")
        stats.close()
    finally:
        rc = srv.stop()
    for k, g in enumerate(got):
        assert g == generate(ref["lm_step"], list(prompts[k % 4]), lens[k]), f"stream {k}"
    requests, executions = after[0] - before[0], after[1] - before[1]
    print(f"12 streams over BLS: {requests} step requests in {executions} executions of the step model")
    assert requests == sum(lens) and executions < requests
    assert len(sizes) == sum(lens) and set(sizes) == {1}
    assert rc == 0, srv.log_text()


@pytest.mark.parametrize("model", ["m2_step", "nh_step", "nh8_step", "nhs8_step"])
def test_mamba2_and_hybrid_step_graphs_served(served, family_steps, model):
    """A Mamba2 and a hybrid (SSM states float32 or int8 plus growing KV caches, float32 or int8) decode step served: interleaved sequences
    each equal to the ORT runner's own steps, and streamed generation equal to `generate`."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate, generate_text

    runner = OrtRunner(family_steps[model], custom_op_library=False)
    prompts = [list(b"And God said"), list(b"Let there"), list(b"In the beginning")]
    n = 5
    want = [reference_steps(runner, p, n) for p in prompts]
    client = served.grpc()
    feeds = [np.asarray([p], np.int64) for p in prompts]
    for step in range(n + 1):
        for s in range(len(prompts)):
            logits = call(client, model, input_ids=feeds[s], seq=(3000 + s, step == 0, step == n))["logits"]
            assert_exact(logits, want[s][step], f"{model} sequence {s} step {step}")
            feeds[s] = np.asarray([[int(logits[0, -1].astype(np.float64).argmax())]], np.int64)
    got = stream_generate(served.grpc(), f"{model}_generate", gen_inputs(text=b"And God said", n=12))
    assert got == generate(runner, list(b"And God said"), 12)
    # random weights emit bytes >= 0x80 that no character holds alone: each response's text is still whole
    # UTF-8 (a lone byte made the curl client's JSON invalid), and all of it is generate's text
    texts = []
    got = stream_generate(served.grpc(), f"{model}_generate", gen_inputs(text=b"And God said", n=40), texts=texts)
    want = generate_text(runner, prompt="And God said", max_new_tokens=40)
    assert got == want["new_ids"] and max(got) >= 0x80
    assert "".join(t.decode("utf-8") for t in texts) == want["text"]


def stream_generate(client, model, inputs, limit=4096, texts=None, sizes=None):
    """Token ids of one streamed generation (and, into `texts`, each response's text; into `sizes`, how many
    tokens each response held)."""
    q = queue.Queue()
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        toks = []
        for _ in range(limit + 2):
            result, error = q.get(timeout=TIMEOUT)
            if error is not None:
                raise error
            if result.get_response().parameters["triton_final_response"].bool_param:
                return toks
            new = [int(t) for t in result.as_numpy("token_id")]
            assert new, "a response without a token"
            toks += new
            if sizes is not None:
                sizes.append(len(new))
            if texts is not None:
                texts.append(result.as_numpy("text")[0])
        raise AssertionError("no final response")
    finally:
        client.stop_stream()


def gen_inputs(text=None, ids=None, n=None):
    out = []
    if text is not None:
        t = grpcclient.InferInput("text", [1], "BYTES")
        t.set_data_from_numpy(np.array([text], object))
        out.append(t)
    if ids is not None:
        t = grpcclient.InferInput("prompt_ids", [len(ids)], "INT64")
        t.set_data_from_numpy(np.asarray(ids, np.int64))
        out.append(t)
    if n is not None:
        t = grpcclient.InferInput("max_new_tokens", [1], "INT32")
        t.set_data_from_numpy(np.array([n], np.int32))
        out.append(t)
    return out


def test_streamed_generation_equals_greedy_generate(served, ref):
    from mq_deploy.runtime.apps import generate

    prompt = b"And God said"
    want = generate(ref["lm_step"], list(prompt), 24)
    got = stream_generate(served.grpc(), "lm_step_generate", gen_inputs(text=prompt, n=24))
    print("served:", got, "\ngreedy:", want)
    assert got == want
    ids = [5, 200, 17, 3]
    assert stream_generate(served.grpc(), "lm_step_generate", gen_inputs(ids=ids, n=10)) == \
        generate(ref["lm_step"], ids, 10)


def test_generation_with_the_artifacts_own_bpe_tokenizer(served, bpe_step):
    """Text in, text out through the tokenizer.json the export carries; equal to `mq-deploy generate`
    (generate_text: same ids, same text pieces, same stop at EOS)."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate_text

    prompt = "In the beginning — café 🙂"
    want = generate_text(OrtRunner(bpe_step, custom_op_library=False), prompt=prompt, max_new_tokens=40)
    texts = []
    got = stream_generate(served.grpc(), "bpe_step_generate", gen_inputs(text=prompt.encode(), n=40), texts=texts)
    print("served:", got, repr(b"".join(texts).decode()), "\nwant:  ", want["new_ids"], repr(want["text"]))
    assert got == want["new_ids"]
    assert b"".join(texts).decode("utf-8") == want["text"]


def test_image_bytes_through_the_ensemble(served, ref, tmp_path):
    from PIL import Image

    from mq_deploy.runtime.apps import classify, load_images

    rng = np.random.default_rng(3)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8), "L").save(tmp_path / f"{i}.png")
    images, _, names = load_images(str(tmp_path), 1, 12)
    cfg = ref["vim"].meta["mq.config"]
    want = classify(ref["vim"], images, cfg["image_mean"], cfg["image_std"])     # what `mq-deploy run` computes
    client = served.http()
    raw = np.array([[open(tmp_path / n, "rb").read()] for n in names], object)
    i = httpclient.InferInput("image", list(raw.shape), "BYTES")
    i.set_data_from_numpy(raw)
    got = client.infer("vim_image", [i]).as_numpy("logits")
    assert_exact(got, want, "PNG bytes -> vim_preprocess -> vim")
    bad = httpclient.InferInput("image", [1, 1], "BYTES")
    bad.set_data_from_numpy(np.array([[b"not an image"]], object))
    with pytest.raises(InferenceServerException, match="cannot read the image"):
        client.infer("vim_image", [bad])


def test_224px_pictures_served_run_and_eval_agree(served, vim224):
    """JPEGs and PNGs of several sizes (exactly 224, off by one, landscape, portrait, grey, RGBA) through the
    Triton ensemble (bytes -> vim224_preprocess, which carries data/picture.py -> vim224), `mq-deploy run`
    (load_images + classify) and `mq-deploy eval` (vim_data + the PyTorch model): the served logits equal
    run's bit for bit, eval reads the same tensor as run, and all three pick the same classes."""
    import torch

    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.data.images import to_tensor
    from mq_deploy.evaluate import vim_data
    from mq_deploy.models.loaders import load_model
    from mq_deploy.runtime.apps import classify, classify_path, load_images

    ckpt, onnx_path, folder = vim224
    runner = OrtRunner(onnx_path, custom_op_library=False)     # the served model runs the function bodies too
    cfg = runner.meta["mq.config"]
    images, _, names = load_images(str(folder), 3, 224)
    want = classify(runner, images, cfg["image_mean"], cfg["image_std"])
    run_pred = classify_path(onnx_path, str(folder), custom_op_library=False)["predictions"]
    assert run_pred == [int(p) for p in want.argmax(1)]

    raw = np.array([[open(folder / n, "rb").read()] for n in names], object)
    inp = httpclient.InferInput("image", list(raw.shape), "BYTES")
    inp.set_data_from_numpy(raw)
    got = served.http().infer("vim224_image", [inp]).as_numpy("logits")
    assert_exact(got, want, "224-px pictures: served ensemble vs `mq-deploy run`")

    loaded = load_model(ckpt)
    x, _ = vim_data(loaded, str(folder), "test", None, scoring=False)
    x = x[:]
    assert torch.equal(x, to_tensor(images[:], cfg["image_mean"], cfg["image_std"]))
    with torch.no_grad():
        eval_logits = loaded.model(x).numpy()
    top2 = np.sort(want, 1)[:, -2:]
    print("served = run predictions:", run_pred, "eval (PyTorch):", [int(p) for p in eval_logits.argmax(1)],
          "smallest top-1 margin:", float((top2[:, 1] - top2[:, 0]).min()),
          "max |PyTorch - ORT| logit:", float(np.abs(eval_logits - want).max()))
    assert [int(p) for p in eval_logits.argmax(1)] == run_pred
    assert len(set(run_pred)) > 2        # the pictures land in several classes


def test_bad_requests_get_triton_errors_and_the_server_keeps_serving(served, ref):
    h, g = served.http(), served.grpc()
    cases = [
        (lambda c: call(c, "vim", images=np.zeros((1, 1, 5, 5), np.float32)), r"(?i)shape"),
        (lambda c: call(c, "vim", images=np.zeros((1, 1, 12, 12), np.float64)), r"(?i)FP64|data.?type"),
        (lambda c: call(c, "no_such_model", images=np.zeros((1, 1, 12, 12), np.float32)), r"no_such_model"),
        (lambda c: call(c, "lm_step", input_ids=np.zeros((1, 1), np.int64), seq=(777, False, False)),
         r"START"),
        (lambda c: call(c, "lm_step", input_ids=np.full((1, 2), 999, np.int64), seq=(778, True, True)),
         r"input_ids must lie in \[0, 256\)"),
        (lambda c: call(c, "lm", input_ids=np.zeros((1, 3), np.int32)), r"(?i)INT32|data.?type"),
    ]
    for client in (h, g):
        for fn, pattern in cases:
            with pytest.raises(InferenceServerException, match=pattern) as e:
                fn(client)
            print(type(client).__module__, "->", str(e.value).splitlines()[0])
    with pytest.raises(InferenceServerException, match="max_new_tokens must lie"):
        stream_generate(g, "lm_step_generate", gen_inputs(text=b"x", n=-1))
    with pytest.raises(InferenceServerException, match="give text or prompt_ids"):
        stream_generate(g, "lm_step_generate", gen_inputs(text=b"x", ids=[1], n=2))

    # a client that goes away mid-stream: cancel after 3 tokens of a long generation
    q = queue.Queue()
    c = grpcclient.InferenceServerClient(served.grpc_url)
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    c.async_stream_infer("lm_step_generate", gen_inputs(text=b"And God said", n=4000))
    for _ in range(3):
        result, error = q.get(timeout=TIMEOUT)
        assert error is None
    c.stop_stream(cancel_requests=True)
    c.close()

    # ... and a client process killed mid-stream (the connection drops without a goodbye)
    code = ("import numpy as np, tritonclient.grpc as g, time, sys\n"
            f"c = g.InferenceServerClient('{served.grpc_url}')\n"
            "c.start_stream(callback=lambda result, error: print('token', flush=True))\n"
            "t = g.InferInput('text', [1], 'BYTES'); t.set_data_from_numpy(np.array([b'In the'], object))\n"
            "n = g.InferInput('max_new_tokens', [1], 'INT32'); n.set_data_from_numpy(np.array([4000], np.int32))\n"
            "c.async_stream_infer('lm_step_generate', [t, n])\n"
            "time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            assert p.stdout.readline().strip() == "token"
    finally:
        p.kill()
        p.wait(10)

    # the server still serves, and correctly
    assert h.is_server_ready() and h.is_model_ready("lm_step_generate")
    from mq_deploy.runtime.apps import generate

    assert stream_generate(g, "lm_step_generate", gen_inputs(text=b"And God", n=8)) == \
        generate(ref["lm_step"], list(b"And God"), 8)
    x = np.random.default_rng(4).standard_normal((1, 1, 12, 12)).astype(np.float32)
    assert_exact(call(h, "vim", images=x)["logits"], ref["vim"].infer({"images": x})["logits"], "vim after errors")


def test_mq_deploy_serve_command_and_the_native_scan_library(art, tmp_path):
    """`mq-deploy triton ... --custom-op-lib` then `mq-deploy serve REPO --http-port --grpc-port`: the
    Python-backend models register the native mq::SelectiveScan library (when pip install built it),
    served outputs equal OrtRunner's with that library, and the server exits 0 on SIGTERM."""
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.cli.main import main
    from mq_deploy.ops.native import ort_library

    lib = ort_library()
    repo = tmp_path / "repo"
    argv = ["triton", art["vim"], art["lm"], "-o", str(repo), "--backend", "python"]
    assert main(argv + (["--custom-op-lib", lib] if lib else [])) == 0
    http_port, grpc_port = triton.free_port(), triton.free_port()
    p = subprocess.Popen([sys.executable, "-m", "mq_deploy", "serve", str(repo), "--http-port", str(http_port),
                          "--grpc-port", str(grpc_port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=TIMEOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            try:
                if client.is_server_ready():
                    break
            except Exception:
                time.sleep(0.3)
        assert p.poll() is None and client.is_model_ready("vim")
        rng = np.random.default_rng(5)
        x = rng.standard_normal((2, 1, 12, 12)).astype(np.float32)
        ids = rng.integers(0, 256, (1, 33)).astype(np.int64)
        what = "native scan library" if lib else "function bodies (no native library built)"
        assert_exact(call(client, "vim", images=x)["logits"],
                     OrtRunner(art["vim"], custom_op_library=lib or False).infer({"images": x})["logits"],
                     f"vim, {what}")
        assert_exact(call(client, "lm", input_ids=ids)["logits"],
                     OrtRunner(art["lm"], custom_op_library=lib or False).infer({"input_ids": ids})["logits"],
                     f"lm, {what}")
        client.close()
        p.send_signal(signal.SIGTERM)      # passed on to tritonserver as its graceful shutdown
        assert p.wait(60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(10)
    if not lib:
        pytest.skip("served and checked with function bodies; the native library part needs libmq_scan_ort.so")


def test_the_repository_readme_curl_commands_work(served):
    """The README `mq-deploy triton` writes gives one curl call per model; each runs as written."""
    import shutil

    if not shutil.which("curl"):
        pytest.skip("no curl")
    with open(os.path.join(served.repo, "README.md")) as f:
        cmds = [line.strip() for line in f if "curl " in line]
    assert len(cmds) >= 4
    for cmd in cmds:
        cmd = cmd.replace("localhost:8000", served.http_url)
        r = subprocess.run(["bash", "-c", cmd + " --max-time 60"], capture_output=True, text=True, timeout=90)
        print(cmd[:100], "->", r.stdout[:160])
        assert r.returncode == 0 and "error" not in r.stdout, (cmd, r.stdout, r.stderr)
        assert r.stdout.strip() in ("200",) or '"outputs"' in r.stdout or r.stdout.startswith("data: ")
        for line in r.stdout.splitlines():      # each streamed event is valid JSON
            if line.startswith("data: "):
                json.loads(line[len("data: "):])


def test_the_generate_models_readme_example_runs(served, ref):
    """The Python example in NAME_generate's README, run as written against this server, prints the tokens of
    `generate` (however many each response held)."""
    from mq_deploy.runtime.apps import generate

    with open(os.path.join(served.repo, "lm_step_generate", "README.md")) as f:
        text = f.read()
    code = text[text.index("import queue"):]
    code = code[:code.index("```")].replace("localhost:8001", served.grpc_url)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [int(t) for t in r.stdout.split()] == generate(ref["lm_step"], list(b"And God said"), 40)


def test_the_served_configs_parse_against_tritons_schema(served):
    """The repository this server loaded, BPE generate model (tokenizer.json, eos_id) included."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    names = sorted(n for n in os.listdir(served.repo) if os.path.isfile(os.path.join(served.repo, n, "config.pbtxt")))
    assert "bpe_step_generate" in names and "vim224_image" in names and len(names) == 19, names
    for n in names:
        with open(os.path.join(served.repo, n, "config.pbtxt")) as f:
            cfg = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
        assert cfg.name == n
    with open(os.path.join(served.repo, "bpe_step_generate", "config.pbtxt")) as f:
        gen = text_format.Parse(f.read(), model_config_pb2.ModelConfig())
    assert gen.parameters["tokenizer"].string_value == "tokenizers" and gen.parameters["eos_id"].string_value == "0"
    assert os.path.isfile(os.path.join(served.repo, "bpe_step_generate", "1", "tokenizer.json"))
