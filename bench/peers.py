"""CPU inference against the peers a user would pick: transformers, llama.cpp and our ONNX artifact.

All systems in one run, on the same random-init weights written by transformers' `save_pretrained`
(MambaForCausalLM at the mamba-130m or -370m shape, Mamba2ForCausalLM at mamba2-130m's,
GraniteMoeHybridForCausalLM at granite-4.0-h-350m's; a BPE tokenizer trained locally with `tokenizers` is
saved beside them), same thread count:

  transformers fp32                        the folder's own class (its PyTorch path; no CUDA kernels on CPU)
  llama.cpp F32 / Q8_0 / Q4_0              built from the llama-cpp-python sdist's vendor/llama.cpp with
                                           CMake (cached under --workdir), converted with its own
                                           convert_hf_to_gguf.py, timed with llama-bench (batch 1) and
                                           llama-batched-bench (decode at batch 8)
  mq-deploy PyTorch fp32                   our MambaLM loaded from the same folder
  mq-deploy ONNX FP32 / W8A8, ORT          the decode-step graph (last-position logits; each layer's conv,
    (Scan body | native)                   x_proj, dt_proj and scan one mq::SelectiveStateUpdate(Float)) on
                                           ONNX Runtime, with the function bodies (Scan) or the native
                                           custom-op library (the same ops natively); W8A8: MambaQuant
                                           recipe, int8 LM head (DynamicQuantizeLinear + MatMulInteger),
                                           factored online Hadamard
  Mamba2 / Granite-4.0-H shapes            transformers fp32, llama.cpp F32 / Q8_0 / Q4_0 and our FP32 / W8A8
                                           with the native ops (--systems adds the function-body rows): the
                                           full graph (mq::SSDScan(Float), chunked) for prefill, the step graph
                                           (one mq::SSDStateUpdate(Float) per Mamba2 layer; attention layers
                                           with their growing KV caches) for decode

Cases: prefill of 256 and 1024 tokens at batch 1 (logits of the last position, as llama-bench's
prompt test), decode of 128 tokens at batch 1 and 8 (after an 8-token prompt; ONNX: mq-deploy's OrtDecoder,
the states the step graph declares bound with IOBinding, outputs of step t the inputs of step t+1 without
copies). tokens/s counts every sequence of the batch. Each row runs in a fresh process whose peak RSS (ru_maxrss, from wait4) is
reported; ONNX rows import no torch. The load average is printed before and after each row, and a row
whose 1-minute load exceeded --max-load when it started is run again (up to --retries times; the
fastest attempt is kept and the others are listed).

    python bench/peers.py [--shape 130m|370m|mamba2-130m|granite-h-350m] [--json OUT] [--threads 2]
                          [--workdir build/peers] [--systems "A;B"] [--profile SYSTEM]

The first run downloads the llama-cpp-python sdist with pip and builds llama.cpp (about 10 minutes on
2 idle cores), converts the GGUF files, quantizes the W8A8 checkpoint and exports the ONNX graphs; all of
it is cached in --workdir. Needs: torch, transformers, tokenizers, onnxruntime, cmake, a C++ compiler.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

from benchmeta import RunMeta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

LLAMA_CPP_PYTHON = "0.3.36"
# family: which transformers class writes the checkpoint (make_checkpoint) and which systems run (SYSTEMS)
SHAPES = {"130m": dict(family="mamba", hidden_size=768, num_hidden_layers=24),
          "370m": dict(family="mamba", hidden_size=1024, num_hidden_layers=48),
          # state-spaces/mamba2-130m's shape (tied embedding, conv bias, no in/out_proj bias)
          "mamba2-130m": dict(family="mamba2", hidden_size=768, num_hidden_layers=24, state_size=128, head_dim=64,
                              n_groups=1, expand=2),
          # ibm-granite/granite-4.0-h-350m's config.json (dense: no experts; attention at layers 10, 13, 17, 27,
          # no position embedding, GQA 12/4 heads; muP scalars) but GPT-NeoX's vocabulary (50280) instead of its
          # 100352: llama.cpp's converter, given no tokenizer it recognises, writes its bundled GPT-NeoX vocabulary
          # and then refuses an embedding of another size
          "granite-h-350m": dict(family="granitemoehybrid", hidden_size=768, num_hidden_layers=32,
                                 layer_types=["attention" if i in (10, 13, 17, 27) else "mamba" for i in range(32)],
                                 num_attention_heads=12, num_key_value_heads=4, shared_intermediate_size=2048,
                                 intermediate_size=2048, num_local_experts=0, num_experts_per_tok=0,
                                 position_embedding_type="nope", mamba_n_heads=48, mamba_d_head=32,
                                 mamba_d_state=128, mamba_n_groups=1, mamba_expand=2, mamba_d_conv=4,
                                 mamba_conv_bias=True, mamba_proj_bias=False, embedding_multiplier=12.0,
                                 residual_multiplier=0.246, attention_multiplier=0.015625, logits_scaling=3.0,
                                 rms_norm_eps=1e-5, max_position_embeddings=32768)}
VOCAB = 50280
PROMPT = 8           # decode: tokens of the prompt before the timed steps
NEW = 128
CASES = [("prefill-256", 1), ("prefill-1024", 1), ("decode-128", 1), ("decode-128", 8)]
SYSTEMS = ["transformers fp32", "llama.cpp F32", "llama.cpp Q8_0", "llama.cpp Q4_0", "mq-deploy PyTorch fp32",
           "mq-deploy ONNX FP32, ORT (Scan body)", "mq-deploy ONNX FP32, ORT + native ops",
           "mq-deploy ONNX W8A8, ORT (Scan body)", "mq-deploy ONNX W8A8, ORT + native ops"]
# the rows a shape runs by default: Mamba1 all; the SSD families the peers and our ORT artifacts with the
# native ops (the function-body rows run with --systems)
DEFAULT_SYSTEMS = {"mamba": SYSTEMS,
                   "mamba2": ["transformers fp32", "llama.cpp F32", "llama.cpp Q8_0", "llama.cpp Q4_0",
                              "mq-deploy ONNX FP32, ORT + native ops", "mq-deploy ONNX W8A8, ORT + native ops"]}
DEFAULT_SYSTEMS["granitemoehybrid"] = DEFAULT_SYSTEMS["mamba2"]


def shape_name(shape):
    return shape if "-" in shape else f"mamba-{shape}"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def load():
    return tuple(round(v, 2) for v in os.getloadavg())


# ---- artifacts (cached in the work folder) ----------------------------------------------------------

def corpus() -> str:
    lic = "/usr/share/common-licenses"
    names = sorted(os.listdir(lic)) if os.path.isdir(lic) else []
    parts = []
    for n in names:
        if os.path.isfile(os.path.join(lic, n)):
            with open(os.path.join(lic, n), errors="replace") as f:
                parts.append(f.read())
    return "".join(parts) or "Let there be light: and there was light. " * 2000


def hf_model(shape):
    """The random-init transformers model of a shape (seeded)."""
    import torch
    import transformers

    torch.manual_seed(0)
    kw = {"vocab_size": VOCAB, **SHAPES[shape]}
    family = kw.pop("family")
    if family == "mamba":
        cfg = transformers.MambaConfig(state_size=16, expand=2, conv_kernel=4,
                                       tie_word_embeddings=True, **kw)
        return transformers.MambaForCausalLM(cfg)
    if family == "mamba2":
        cfg = transformers.Mamba2Config(num_heads=kw["expand"] * kw["hidden_size"] // kw["head_dim"],
                                        conv_kernel=4, use_bias=False, use_conv_bias=True, chunk_size=256,
                                        tie_word_embeddings=True, **kw)
        return transformers.Mamba2ForCausalLM(cfg)
    if family == "granitemoehybrid":
        cfg = transformers.GraniteMoeHybridConfig(tie_word_embeddings=True, **kw)
        return transformers.GraniteMoeHybridForCausalLM(cfg)
    raise ValueError(family)


def make_checkpoint(d, shape):
    """Random-init model (hf_model) written by save_pretrained, plus a locally trained BPE tokenizer."""
    if os.path.isfile(os.path.join(d, "config.json")):
        return
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    log(f"writing the random-init checkpoint to {d}")
    tmp = d + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    hf_model(shape).eval().save_pretrained(tmp)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([corpus()], trainers.BpeTrainer(vocab_size=4096, special_tokens=["<|endoftext|>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(tmp)
    os.replace(tmp, d)


def build_llama_cpp(work):
    """llama-bench, llama-batched-bench, llama-quantize from the llama-cpp-python sdist (cached)."""
    bins = os.path.join(work, "llama-build", "bin")
    targets = ["llama-bench", "llama-batched-bench", "llama-quantize"]
    src = os.path.join(work, f"llama_cpp_python-{LLAMA_CPP_PYTHON}", "vendor", "llama.cpp")
    if all(os.path.isfile(os.path.join(bins, t)) for t in targets):
        return bins, src
    sdist = os.path.join(work, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
    if not os.path.isfile(sdist):
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                        "--no-binary", ":all:", "-d", work], check=True)
    if not os.path.isdir(src):
        with tarfile.open(sdist) as t:
            t.extractall(work, filter="data")
    log("building llama.cpp (about 10 minutes on 2 idle cores)")
    b = os.path.join(work, "llama-build")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", src, "-B", b, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
                    "-DGGML_OPENMP=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                    "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF"], check=True)
    subprocess.run(["cmake", "--build", b, "--target", *targets, "-j", str(os.cpu_count() or 2)], check=True)
    return bins, src


def make_gguf(work, hf, bins, src):
    """F32 by the vendored converter, Q8_0 / Q4_0 by llama-quantize. The converter is given the weights
    and config without our tokenizer: it rejects an unknown BPE pre-tokenizer, and its Mamba path then
    uses its bundled GPT-NeoX vocabulary, which real Mamba checkpoints use."""
    out = {q: os.path.join(work, f"model-{q}.gguf") for q in ("F32", "Q8_0", "Q4_0")}
    if not os.path.isfile(out["F32"]):
        weights_only = os.path.join(work, "hf-weights-only")
        os.makedirs(weights_only, exist_ok=True)
        for n in os.listdir(hf):
            if n.endswith((".safetensors", ".json")) and "token" not in n and n != "config.json":
                dst = os.path.join(weights_only, n)
                if not os.path.exists(dst):
                    os.symlink(os.path.join(hf, n), dst)
        with open(os.path.join(hf, "config.json")) as f:
            cfg = json.load(f)
        # its Mamba2 path pads the vocabulary in the header to pad_vocab_size_multiple (default 16) but not the
        # embedding: ours (50280) is not padded, and 8 divides it
        if cfg.get("model_type") in ("mamba2", "granitemoehybrid") and "pad_vocab_size_multiple" not in cfg:
            cfg["pad_vocab_size_multiple"] = 8
        # transformers 5 writes Granite's layer_types as full_attention / linear_attention; the converter looks
        # for "attention" (and would otherwise convert every layer as Mamba2)
        if cfg.get("model_type") == "granitemoehybrid" and isinstance(cfg.get("layer_types"), list):
            names = {"full_attention": "attention", "linear_attention": "mamba"}
            cfg["layer_types"] = [names.get(t, t) for t in cfg["layer_types"]]
        with open(os.path.join(weights_only, "config.json"), "w") as f:
            json.dump(cfg, f)
        env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
        subprocess.run([sys.executable, os.path.join(src, "convert_hf_to_gguf.py"), weights_only, "--outtype", "f32",
                        "--outfile", out["F32"] + ".tmp"], check=True, env=env)
        os.replace(out["F32"] + ".tmp", out["F32"])
    for q in ("Q8_0", "Q4_0"):
        if not os.path.isfile(out[q]):
            subprocess.run([os.path.join(bins, "llama-quantize"), out["F32"], out[q] + ".tmp", q, "2"], check=True)
            os.replace(out[q] + ".tmp", out[q])
    return out


def external_data(path):
    """The model re-saved with its weights in a side file (NAME_ext.onnx + NAME_ext.data): ONNX Runtime
    then maps the weights instead of holding the protobuf and a parsed copy (peak RSS of the 130m W8A8
    session 489 -> 228 MiB)."""
    import onnx

    ext = path[:-len(".onnx")] + "_ext.onnx"
    if not os.path.isfile(ext):
        m = onnx.load(path)
        data = os.path.basename(ext)[:-len(".onnx")] + ".data"
        onnx.save(m, ext + ".tmp", save_as_external_data=True, all_tensors_to_one_file=True, location=data,
                  size_threshold=1024)
        os.replace(ext + ".tmp", ext)
    return ext


def onnx_sources(work, family="mamba"):
    """The cached graphs (inline weights) by (precision, case kind); the rows run their _ext copies
    (external_data). Mamba1: its decode-step graph serves prefill and decode ("_fused": step graphs with
    mq::SelectiveStateUpdate(Float); graphs cached before it are not reused). The SSD families: the full graph
    (mq::SSDScan, chunked) for prefill, the step graph (mq::SSDStateUpdate per layer) for decode."""
    out = {}
    for q in ("fp32", "w8a8"):
        step = os.path.join(work, f"{q}_step_fused.onnx")
        out[(q, "decode")] = step
        out[(q, "prefill")] = step if family == "mamba" else os.path.join(work, f"{q}_full.onnx")
    return out


def make_onnx(work, hf, threads, family="mamba"):
    """FP32 and W8A8 graphs (onnx_sources) with last-position logits (cached), weights as external data."""
    srcs = onnx_sources(work, family)
    out = {"fp32": srcs[("fp32", "decode")], "w8a8": srcs[("w8a8", "decode")]}
    full = {"fp32": srcs[("fp32", "prefill")], "w8a8": srcs[("w8a8", "prefill")]}
    if all(os.path.isfile(p) for p in (*out.values(), *full.values())):
        return {k: external_data(p) for k, p in srcs.items()}
    import numpy as np
    import torch

    from mq_deploy.calib.collect import text_forward_loop
    from mq_deploy.export.exporter import save_model_atomic
    from mq_deploy.export.graph import QuantSpec, build_model
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.fakequant import quantize_head
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

    torch.set_num_threads(threads)

    def save(model, spec, q):
        for path, step in ((out[q], True), (full[q], False)):
            if not os.path.isfile(path):
                log(f"exporting the {q} {'step' if step else 'full'} graph")
                save_model_atomic(build_model(model, spec, step=step, last_logits=True), path, overwrite=True)

    if not (os.path.isfile(out["fp32"]) and os.path.isfile(full["fp32"])):
        save(load_model(hf).model, None, "fp32")
    if not (os.path.isfile(out["w8a8"]) and os.path.isfile(full["w8a8"])):
        from transformers import AutoTokenizer

        log("quantizing (MambaQuant W8A8, 16 windows of 256 tokens)")
        ids = np.asarray(AutoTokenizer.from_pretrained(hf)(corpus())["input_ids"], dtype=np.int64)
        model = load_model(hf).model
        scales = apply_recipe(model, text_forward_loop(ids, 256, 16, batch=4), RecipeConfig("mambaquant"))
        quantize_head(model, "dynamic")
        save(model, QuantSpec(8, 8, scales["act_scales"], scales["weight_scales"], "mambaquant"), "w8a8")
    return {k: external_data(p) for k, p in srcs.items()}


# ---- workers: one row each, in a fresh process -------------------------------------------------------

def _timed(fn, runs):
    fn()                                     # warm-up
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _ids(batch, n, seed=0):
    import numpy as np

    return np.random.default_rng(seed).integers(0, VOCAB, (batch, n)).astype(np.int64)


def worker_torch(system, case, batch, hf, threads, runs):
    import torch

    torch.set_num_threads(threads)
    if system.startswith("transformers"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

        def prefill(ids):
            model(ids, logits_to_keep=1)

        def decode(ids, n):
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    else:
        from mq_deploy.models.loaders import load_model

        model = load_model(hf).model

        def prefill(ids):
            model._head(model.backbone(ids)[:, -1:])

        def decode(ids, n):
            logits, st = model(ids, return_state=True)
            for _ in range(n - 1):
                logits, st = model(logits[:, -1:].argmax(-1), return_state=True, state=st)

    with torch.no_grad():
        if case.startswith("prefill"):
            L = int(case.split("-")[1])
            ids = torch.from_numpy(_ids(batch, L))
            return batch * L / _timed(lambda: prefill(ids), runs)
        ids = torch.from_numpy(_ids(batch, PROMPT))
        t1 = _timed(lambda: decode(ids, 1), runs)
        tn = _timed(lambda: decode(ids, NEW + 1), max(1, runs // 2))
        return batch * NEW / (tn - t1)


def worker_onnx(system, case, batch, paths, threads, runs):
    """ORT only (no torch in this process), through mq-deploy's OrtRunner (spinning on, as a benchmark) and,
    for decode, its OrtDecoder: the states are whatever the step graph declares (state_layout), bound with
    IOBinding, the outputs of step t the inputs of step t+1 without copies. paths: {"prefill": ONNX file,
    "decode": step graph}. Native: the custom-op library of mq_deploy/_native/; else the function bodies."""
    from mq_deploy.backends.ort.runner import OrtRunner, empty_states

    if "native" in system:
        from mq_deploy.ops.native import ort_library, ort_library_path

        if ort_library() is None:
            raise SystemExit(f"{ort_library_path()} is not built: python -m mq_deploy.ops.native --build")
        lib = None           # OrtRunner's default: the built library
    else:
        lib = False
    kind = "prefill" if case.startswith("prefill") else "decode"
    runner = OrtRunner(paths[kind], custom_op_library=lib, threads=threads, spin=True)
    if kind == "prefill":
        L = int(case.split("-")[1])
        feeds = {"input_ids": _ids(batch, L)}
        if runner.artifact.graph == "step":
            feeds.update(empty_states(runner, batch))
        return batch * L / _timed(lambda: runner.session.run(["logits"], feeds), runs)

    ids = _ids(batch, PROMPT)
    dec = runner.decoder(batch)

    def decode():
        logits = dec.prefill(ids)
        for _ in range(NEW):
            logits = dec.step(logits.argmax(-1))

    t0 = _timed(lambda: dec.prefill(ids), runs)
    tn = _timed(decode, max(1, runs // 2))
    return batch * NEW / (tn - t0)


def profile_onnx(system, paths, threads, runs=3, prefill=1024, batches=(1, 8)):
    """ORT's per-node profile of one ONNX system, summed by op type (ms per run): a prefill of `prefill` tokens
    at batch 1 and one decode step (after an 8-token prompt) at each batch, with OrtRunner's session options."""
    import glob
    import tempfile

    import onnxruntime as ort

    from mq_deploy.backends.ort.runner import OrtRunner, default_library, empty_states, session_options, state_layout

    lib = default_library(None if "native" in system else False)

    def by_op(path, make_feeds):
        runner = OrtRunner(path, custom_op_library=lib if lib else False, threads=threads, spin=True)
        with tempfile.TemporaryDirectory() as d:
            so = session_options(threads, spin=True, custom_op_library=lib)
            so.enable_profiling = True
            so.profile_file_prefix = os.path.join(d, "p")
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            feeds = make_feeds(runner, sess)
            sess.run(None, feeds)                      # warm-up, then the profiled runs
            t = time.perf_counter()
            for _ in range(runs):
                sess.run(None, feeds)
            wall = (time.perf_counter() - t) / runs * 1e3
            sess.end_profiling()
            with open(glob.glob(os.path.join(d, "p*.json"))[0]) as f:
                events = json.load(f)
        out: dict = {}
        for e in events:
            if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
                op = e["args"].get("op_name", "?")
                out[op] = out.get(op, 0.0) + e["dur"] / 1e3 / runs
        ops = {k: round(v, 3) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}
        return {"wall_ms": round(wall, 3), "kernel_ms": round(sum(out.values()), 3), "ms_by_op": ops}

    def prefill_feeds(runner, sess):
        feeds = {"input_ids": _ids(1, prefill)}
        if runner.artifact.graph == "step":
            feeds.update(empty_states(runner, 1))
        return feeds

    def step_feeds(batch):
        def make(runner, sess):
            layout = state_layout(runner)
            res = dict(zip([o.name for o in sess.get_outputs()],
                           sess.run(None, {"input_ids": _ids(batch, PROMPT), **empty_states(runner, batch)})))
            return {"input_ids": res["logits"][:, -1].argmax(-1).reshape(batch, 1).astype("int64"),
                    **{name: res[out] for name, out, _ in layout}}
        return make

    prof = {f"prefill-{prefill} b1": by_op(paths["prefill"], prefill_feeds)}
    for b in batches:
        prof[f"decode step b{b}"] = by_op(paths["decode"], step_feeds(b))
    return prof


# ---- llama.cpp rows ----------------------------------------------------------------------------------

def llama_cmd(bins, gguf, case, batch, threads, runs):
    if case.startswith("prefill"):
        L = case.split("-")[1]
        return [os.path.join(bins, "llama-bench"), "-m", gguf, "-t", str(threads), "-r", str(runs), "-o", "jsonl",
                "-p", L, "-n", "0"]
    if batch == 1:
        return [os.path.join(bins, "llama-bench"), "-m", gguf, "-t", str(threads), "-r", str(runs), "-o", "jsonl",
                "-p", "0", "-n", str(NEW)]
    return [os.path.join(bins, "llama-batched-bench"), "-m", gguf, "-t", str(threads), "-c", "4096", "-b", "2048",
            "-ub", "512", "-npp", str(PROMPT), "-ntg", str(NEW), "-npl", str(batch), "--output-format", "jsonl"]


def parse_llama(out: str, case, batch):
    for line in out.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        d = json.loads(line)
        if "avg_ts" in d:
            return float(d["avg_ts"])
        if "speed_tg" in d:   # llama-batched-bench: text generation t/s over all sequences
            return float(d["speed_tg"])
    raise RuntimeError(f"no result in llama.cpp output for {case} batch {batch}:\n{out[-2000:]}")


# ---- the table ---------------------------------------------------------------------------------------

def run_in_child(cmd, parse):
    """(tokens/s, peak RSS MiB of this process alone, load before, load after) of one fresh process."""
    before = load()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # read both pipes fully, then reap with wait4 to get this child's own peak RSS
    import threading

    bufs = {}

    def drain(name, f):
        bufs[name] = f.read().decode(errors="replace")

    ts = [threading.Thread(target=drain, args=(n, f)) for n, f in (("out", p.stdout), ("err", p.stderr))]
    for t in ts:
        t.start()
    _, status, ru = os.wait4(p.pid, 0)
    for t in ts:
        t.join()
    p.returncode = os.waitstatus_to_exitcode(status)
    after = load()
    if p.returncode != 0:
        raise RuntimeError(f"{os.path.basename(cmd[0])} {' '.join(cmd[1:6])} ... failed ({p.returncode}):\n"
                           f"{bufs['err'][-3000:]}")
    return parse(bufs["out"]), ru.ru_maxrss / 1024.0, before, after


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="130m")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (median; llama-bench -r)")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "build", "peers"),
                    help="cache of the checkpoint, llama.cpp build, GGUF and ONNX files")
    ap.add_argument("--systems", help="comma-separated subset of: " + "; ".join(SYSTEMS))
    ap.add_argument("--max-load", type=float, default=None,
                    help="run a row again when the 1-minute load average exceeded this at its start "
                         "(default: 1.5 x threads)")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--profile", metavar="SYSTEM",
                    help="instead of the table: ORT's time per op type of one ONNX system (prefill 1024 at batch 1, "
                         "a decode step at batch 1 and 8), printed, and written to --json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        w = json.loads(a.worker)
        fn = worker_onnx if "ONNX" in w["system"] else worker_torch
        print(json.dumps({"tokens_per_s": fn(w["system"], w["case"], w["batch"], w["path"], a.threads, a.runs)}))
        return 0

    meta = RunMeta()
    max_load = a.max_load if a.max_load is not None else 1.5 * a.threads
    family = SHAPES[a.shape]["family"]
    if a.profile:
        a.systems = a.profile
    systems = DEFAULT_SYSTEMS[family] if not a.systems else [s.strip() for s in a.systems.split(";")]
    if a.profile and "ONNX" not in a.profile:
        raise SystemExit(f"--profile: {a.profile!r} is not an ONNX system")
    for s in systems:
        if s not in SYSTEMS:
            raise SystemExit(f"--systems: unknown system {s!r}; known: {'; '.join(SYSTEMS)}")
    work = os.path.join(os.path.abspath(a.workdir), a.shape)
    os.makedirs(work, exist_ok=True)
    shared = os.path.abspath(a.workdir)      # llama.cpp's build serves every shape
    hf = os.path.join(work, "hf")
    want_llama = any(s.startswith("llama.cpp") for s in systems)
    want_onnx = any("ONNX" in s for s in systems)
    if a.prepare:
        make_checkpoint(hf, a.shape)
        if want_llama:
            make_gguf(work, hf, *build_llama_cpp(shared))
        if want_onnx:
            make_onnx(work, hf, a.threads, family)
        return 0
    # the artifacts are made in a child: this process stays small, since a row's process is forked from
    # it and its peak RSS (ru_maxrss) counts the time before exec
    subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", "--shape", a.shape, "--threads",
                    str(a.threads), "--workdir", a.workdir] + (["--systems", a.systems] if a.systems else []),
                   check=True)
    bins = os.path.join(shared, "llama-build", "bin")
    gguf = {q: os.path.join(work, f"model-{q}.gguf") for q in ("F32", "Q8_0", "Q4_0")} if want_llama else None
    onnx = {k: p[:-len(".onnx")] + "_ext.onnx" for k, p in onnx_sources(work, family).items()}   # make_onnx's

    from importlib.metadata import version

    ort_version = version("onnxruntime")
    if a.profile:
        q = "w8a8" if "W8A8" in a.profile else "fp32"
        prof = profile_onnx(a.profile, {k: onnx[(q, k)] for k in ("prefill", "decode")}, a.threads, a.runs)
        for case, p in prof.items():
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(p["ms_by_op"].items())[:8])
            print(f"{a.profile}, {case}: {p['wall_ms']:.2f} ms per run ({p['kernel_ms']:.2f} ms in kernels): {top}")
        if a.json:
            from mq_deploy.fileio import write_json

            write_json(a.json, {"shape": a.shape, "threads": a.threads, "onnxruntime": ort_version,
                                "system": a.profile, "profile": prof, "run": meta.finish()}, overwrite=True)
            print(f"wrote {a.json}")
        return 0
    print(f"{shape_name(a.shape)} shape, random init (vocab {SHAPES[a.shape].get('vocab_size', VOCAB)}); {a.threads} threads; onnxruntime "
          f"{ort_version}, torch {version('torch')}, transformers {version('transformers')}, "
          f"llama.cpp of llama-cpp-python {LLAMA_CPP_PYTHON}; median of {a.runs} runs; rows with load > "
          f"{max_load} at start are repeated (up to {a.retries} more)")
    print(f"{'system':40s} {'case':13s} {'batch':>5s} {'tok/s':>8s} {'RSS MiB':>8s}  load before -> after")
    # what the rows ran: the model's shape, and which ONNX graph served each kind of case
    fields = {"family": family, "config": {k: v for k, v in SHAPES[a.shape].items() if k != "family"},
              "onnx_graphs": {k: "step" if onnx[("fp32", k)] == onnx[("fp32", "decode")] else "full"
                              for k in ("prefill", "decode")}}
    rows = []
    for system in systems:
        for case, batch in CASES:
            if system.startswith("llama.cpp"):
                cmd = llama_cmd(bins, gguf[system.split()[-1]], case, batch, a.threads, a.runs)

                def parse(out, case=case, batch=batch):
                    return parse_llama(out, case, batch)
            else:
                q = "w8a8" if "W8A8" in system else "fp32"
                path = {k: onnx[(q, k)] for k in ("prefill", "decode")} if "ONNX" in system else hf
                cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(a.threads), "--runs", str(a.runs),
                       "--worker", json.dumps({"system": system, "case": case, "batch": batch, "path": path})]

                def parse(out):
                    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]
            tries = []
            for attempt in range(a.retries + 1):
                tps, rss, before, after = run_in_child(cmd, parse)
                tries.append(dict(tokens_per_s=tps, peak_rss_mib=rss, load_before=before, load_after=after))
                print(f"{system:40s} {case:13s} {batch:5d} {tps:8.1f} {rss:8.0f}  {before[0]:.2f} -> {after[0]:.2f}"
                      + ("" if attempt == 0 else f"   (attempt {attempt + 1})"), flush=True)
                if before[0] <= max_load:
                    break
            best = max(tries, key=lambda t: t["tokens_per_s"])
            rows.append(dict(system=system, case=case, batch=batch, tokens_per_s=round(best["tokens_per_s"], 2),
                             peak_rss_mib=round(best["peak_rss_mib"], 1), load_before=best["load_before"],
                             load_after=best["load_after"],
                             attempts=[round(t["tokens_per_s"], 2) for t in tries]))
            if a.json:   # after every row: a long run interrupted keeps what it measured
                from mq_deploy.fileio import write_json

                write_json(a.json, {"shape": a.shape, "threads": a.threads, "onnxruntime": ort_version,
                                    "llama_cpp_python": LLAMA_CPP_PYTHON, "complete": False, "rows": rows, **fields,
                                    "run": meta.info},
                           overwrite=True)
    summary(rows)
    if a.json:
        from mq_deploy.fileio import write_json

        write_json(a.json, {"shape": a.shape, "threads": a.threads, "onnxruntime": ort_version,
                            "llama_cpp_python": LLAMA_CPP_PYTHON, "complete": True, "rows": rows, **fields,
                            "run": meta.finish()}, overwrite=True)
        print(f"wrote {a.json}")
    return 0


def summary(rows):
    """The markdown table (tok/s, peak RSS) and the goal ratios of the int8 artifact with native ops."""
    by = {(r["system"], r["case"], r["batch"]): r for r in rows}
    cols = [(c, b) for c, b in CASES]
    print()
    print("| system | " + " | ".join(f"{c} b{b} tok/s" for c, b in cols) + " | peak RSS MiB |")
    print("|---|" + "---|" * (len(cols) + 1))
    for s in dict.fromkeys(r["system"] for r in rows):
        cells = [f"{by[(s, c, b)]['tokens_per_s']:.1f}" if (s, c, b) in by else "–" for c, b in cols]
        rss = [by[(s, c, b)]["peak_rss_mib"] for c, b in cols if (s, c, b) in by]
        print(f"| {s} | " + " | ".join(cells) + f" | {min(rss):.0f}–{max(rss):.0f} |")
    ours, q8 = "mq-deploy ONNX W8A8, ORT + native ops", "llama.cpp Q8_0"
    ref = {"transformers": "transformers fp32", "fp32 native": "mq-deploy ONNX FP32, ORT + native ops"}
    print()
    for c, b in cols:
        if (ours, c, b) not in by:
            continue
        t = by[(ours, c, b)]["tokens_per_s"]
        parts = [f"{k} {t / by[(v, c, b)]['tokens_per_s']:.2f}x" for k, v in
                 (("vs transformers", ref["transformers"]), ("vs llama.cpp Q8_0", q8),
                  ("vs our FP32 native (equal footing)", ref["fp32 native"])) if (v, c, b) in by]
        print(f"W8A8 native, {c} b{b}: " + ", ".join(parts))
    if any(r["system"] == ours for r in rows) and any(r["system"] == q8 for r in rows):
        o = max(r["peak_rss_mib"] for r in rows if r["system"] == ours)
        q = max(r["peak_rss_mib"] for r in rows if r["system"] == q8)
        print(f"peak RSS: W8A8 native {o:.0f} MiB vs llama.cpp Q8_0 {q:.0f} MiB ({o / q:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
