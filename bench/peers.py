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
                                           factored online Hadamard; each int8 linear and the head one
                                           mq::QLinear / mq::DynamicQLinear (the native library runs them
                                           where the CPU has AVX-512 VNNI; "no mq::QLinear": ONNX Runtime's
                                           own int8 kernels through their function bodies, --systems only)
  mq-deploy ONNX W4A8, ORT + native ops    the same with int4 weights (MambaQuant W4A8) written as ONNX
                                           Runtime's com.microsoft.MatMulNBits (export --int4-format
                                           matmulnbits) and an int4 head (a scale per block of 32)
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
fastest attempt is kept and the others are listed). All rows are one pass, case by case: within a case the
peers and ours alternate (interleaved), in reverse order every other case, so a change of load during the
run cannot favour one side.

The llama.cpp build runs on every machine of a kind: built natively (-march=native, the repacked CPU
kernels on), it is probed once with a short prefill of each quantized GGUF; if that dies with SIGILL (ggml's
AMX kernel on machines that report AMX and fault on it) it is rebuilt with every other ISA extension and
without AMX (llama_setup). The JSON records the build (its GGML options and ISA), the probes, and per GGUF
what llama.cpp ran (buffer types, e.g. CPU_REPACK, and repacked layouts); for ONNX Runtime its version,
providers, our session options, the CPU flags its MLAS dispatch reads, and the op types of the graph it
optimized from each file (MatMulIntegerToFloat: its int8 GEMM; MatMulNBits: its packed int4 GEMM).

Roofline, measured in the same run (before the first row and after the last; the better of the two is
the limit): the read bandwidth (bench/membw.c, --threads threads streaming over a buffer of max(1 GiB, 16x
the last-level cache)) and ONNX Runtime's int8 GEMM peak (a 2048^3 QDQ MatMul, fused into
MatMulIntegerToFloat, with our session options). Each decode row gets the bytes of weights read per step
(every weight once; an embedding only looked up counts one row), the bandwidth its tokens/s implies and its
fraction of the limit; each prefill row the GEMM MACs per token and its fraction of the int8 peak.

    python bench/peers.py [--shape 130m|370m|mamba2-130m|granite-h-350m] [--json OUT] [--threads 2]
                          [--workdir build/peers] [--systems "A;B"] [--profile SYSTEM]

The first run downloads the llama-cpp-python sdist with pip and builds llama.cpp (about 10 minutes on
2 idle cores), converts the GGUF files, quantizes the W8A8 checkpoint and exports the ONNX graphs; all of
it is cached in --workdir. Needs: torch, transformers, tokenizers, onnxruntime, cmake, a C++ compiler.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time

import benchmeta
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
# the W8A8 artifact with the native library but without its int8 linears (MQ_ORT_QLINEAR=0: ONNX Runtime runs the
# mq::QLinear / mq::DynamicQLinear function bodies, its own int8 kernels): what those ops buy, in the same pass
NO_QLINEAR = "mq-deploy ONNX W8A8, ORT + native ops, no mq::QLinear"
SYSTEMS = ["transformers fp32", "llama.cpp F32", "llama.cpp Q8_0", "llama.cpp Q4_0", "mq-deploy PyTorch fp32",
           "mq-deploy ONNX FP32, ORT (Scan body)", "mq-deploy ONNX FP32, ORT + native ops",
           "mq-deploy ONNX W8A8, ORT (Scan body)", "mq-deploy ONNX W8A8, ORT + native ops",
           "mq-deploy ONNX W4A8, ORT + native ops", NO_QLINEAR]
# the rows a shape runs by default: Mamba1 all but NO_QLINEAR; the SSD families the peers and our ORT artifacts
# with the native ops (the function-body and W4A8 rows run with --systems)
DEFAULT_SYSTEMS = {"mamba": [s for s in SYSTEMS if s != NO_QLINEAR],
                   "mamba2": ["transformers fp32", "llama.cpp F32", "llama.cpp Q8_0", "llama.cpp Q4_0",
                              "mq-deploy ONNX FP32, ORT + native ops", "mq-deploy ONNX W8A8, ORT + native ops"]}
DEFAULT_SYSTEMS["granitemoehybrid"] = DEFAULT_SYSTEMS["mamba2"]


def shape_name(shape):
    return shape if "-" in shape else f"mamba-{shape}"


PRECISIONS = ("fp32", "w8a8", "w4a8")


def precision(system) -> str:
    """The ONNX artifact an ONNX system runs: fp32, w8a8 or w4a8."""
    return "w8a8" if "W8A8" in system else ("w4a8" if "W4A8" in system else "fp32")


def interleaved(systems) -> list:
    """The systems with the peers' and ours alternating (a peer, one of ours, a peer, ...; the longer list's
    rest at the end), so that rows measured next to each other belong to both sides."""
    peers = [s for s in systems if not s.startswith("mq-deploy")]
    ours = [s for s in systems if s.startswith("mq-deploy")]
    out = []
    for i in range(max(len(peers), len(ours))):
        out += peers[i:i + 1] + ours[i:i + 1]
    return out


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


# ---- what the machine offers: CPU flags, the llama.cpp build that runs here, ORT's kernels ---------------

# the x86 flags that choose llama.cpp's and MLAS's kernels (from /proc/cpuinfo)
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512bw", "avx512dq",
             "avx512vl", "avx512_vbmi", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")
AVX512_BASE = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")     # ggml's GGML_AVX512 sets all five
# ggml's CMake switch per flag for a build without GGML_NATIVE (ggml/CMakeLists.txt, ggml-cpu/CMakeLists.txt)
GGML_ISA = {"sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C",
            "bmi2": "GGML_BMI2", "avx512_vbmi": "GGML_AVX512_VBMI", "avx512_vnni": "GGML_AVX512_VNNI",
            "avx512_bf16": "GGML_AVX512_BF16", "avx_vnni": "GGML_AVX_VNNI"}
LLAMA_TARGETS = ["llama-bench", "llama-batched-bench", "llama-quantize"]
# the build options a record names: the ISA, AMX, and the kernel choices
GGML_RECORDED = {*GGML_ISA.values(), "GGML_AVX512", "GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16", "GGML_NATIVE",
                 "GGML_CPU_REPACK", "GGML_OPENMP", "GGML_LLAMAFILE", "GGML_BLAS", "GGML_CPU_KLEIDIAI"}


def cpu_flags() -> list:
    """Which of the ISA extensions llama.cpp's CPU backend builds for this machine has (ISA_FLAGS)."""
    return benchmeta.cpu_flags(ISA_FLAGS)


def ggml_isa_options(flags) -> list:
    """-D options for a GGML_NATIVE=OFF build with every ISA extension of `flags` except AMX (ggml's AMX
    kernels are what die with SIGILL on some machines that report AMX; -march=native would turn them on)."""
    opts = [f"-D{GGML_ISA[f]}={'ON' if f in flags else 'OFF'}" for f in GGML_ISA]
    opts.append(f"-DGGML_AVX512={'ON' if all(f in flags for f in AVX512_BASE) else 'OFF'}")
    return opts + ["-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def native_macros() -> list:
    """The ISA macros `cc -march=native` defines here: what a GGML_NATIVE build compiles in."""
    try:
        out = subprocess.run(["cc", "-march=native", "-dM", "-E", "-x", "c", os.devnull], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return sorted({m for m in (line.split()[1] for line in out.splitlines() if line.startswith("#define "))
                   if m.startswith(("__AVX", "__AMX", "__FMA__", "__F16C__", "__BMI2__", "__SSE4_2__"))})


def llama_src(work):
    return os.path.join(work, f"llama_cpp_python-{LLAMA_CPP_PYTHON}", "vendor", "llama.cpp")


def build_llama_cpp(work, variant="native"):
    """llama-bench, llama-batched-bench, llama-quantize from the llama-cpp-python sdist (cached per variant):
    "native" (GGML_NATIVE: -march=native, every ISA extension this CPU reports, AMX included) or "no-amx" (the
    same extensions switched on one by one, AMX off; ggml_isa_options). The repacked CPU kernels
    (GGML_CPU_REPACK, on by default) stay in both. Returns (bin folder, source folder, build_record)."""
    b = os.path.join(work, "llama-build" if variant == "native" else f"llama-build-{variant}")
    bins, src = os.path.join(b, "bin"), llama_src(work)
    if all(os.path.isfile(os.path.join(bins, t)) for t in LLAMA_TARGETS):
        return bins, src, build_record(b, variant)
    sdist = os.path.join(work, f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz")
    if not os.path.isfile(sdist):
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-deps",
                        "--no-binary", ":all:", "-d", work], check=True)
    if not os.path.isdir(src):
        with tarfile.open(sdist) as t:
            t.extractall(work, filter="data")
    log(f"building llama.cpp ({variant}; about 10 minutes on 2 idle cores)")
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    flags = cpu_flags()
    isa = ["-DGGML_NATIVE=ON"] if variant == "native" else ["-DGGML_NATIVE=OFF", *ggml_isa_options(flags)]
    opts = ["-DCMAKE_BUILD_TYPE=Release", *isa, "-DGGML_CPU_REPACK=ON", "-DGGML_OPENMP=ON",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_CURL=OFF",
            "-DBUILD_SHARED_LIBS=OFF"]
    subprocess.run(["cmake", "-S", src, "-B", b, *gen, *opts], check=True)
    subprocess.run(["cmake", "--build", b, "--target", *LLAMA_TARGETS, "-j", str(os.cpu_count() or 2)], check=True)
    return bins, src, build_record(b, variant)


def build_record(build_dir, variant) -> dict:
    """What a llama.cpp build compiled in: its GGML_* options as CMake's cache holds them, and the ISA macros
    (a GGML_NATIVE build: what -march=native defines here; else the ISA options switched on)."""
    opts = {}
    try:
        with open(os.path.join(build_dir, "CMakeCache.txt")) as f:
            for line in f:
                m = re.match(r"(GGML_[A-Z0-9_]+):BOOL=(\S+)", line)
                if m and m.group(1) in GGML_RECORDED:
                    opts[m.group(1)] = m.group(2)
    except OSError:
        pass
    native = opts.get("GGML_NATIVE", "ON") == "ON"
    isa = native_macros() if native else sorted(k for k, v in opts.items() if v == "ON" and
                                                k in {*GGML_ISA.values(), "GGML_AVX512", "GGML_AMX_TILE",
                                                      "GGML_AMX_INT8", "GGML_AMX_BF16"})
    return {"variant": variant, "build_dir": os.path.basename(build_dir), "ggml_options": opts, "isa": isa}


def llama_kernels(bins, gguf, threads):
    """Run a 32-token prefill of one GGUF (llama-bench -v) and read what llama.cpp did: exit status (a signal
    by name: SIGILL is the AMX fault), the buffer types its weights went to (CPU_REPACK: repacked kernels; AMX),
    the repacked layouts per tensor count, the weights' types, and llama-bench's own fields."""
    cmd = [os.path.join(bins, "llama-bench"), "-m", gguf, "-t", str(threads), "-r", "1", "-o", "jsonl", "-p", "32",
           "-n", "0", "-v"]
    p = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=600)
    return parse_llama_kernels(p.returncode, p.stdout, p.stderr)


def parse_llama_kernels(returncode, stdout, stderr) -> dict:
    """llama_kernels' record from `llama-bench -v -o jsonl`'s exit status, stdout and stderr."""
    import signal

    out = {"returncode": returncode}
    if returncode < 0:
        out["signal"] = signal.Signals(-returncode).name
    buffers, repacked, types = {}, {}, {}
    for line in stderr.splitlines():
        m = re.search(r"load_tensors:\s+(\S+) model buffer size =\s+([\d.]+) MiB", line)
        if m:
            buffers[m.group(1)] = float(m.group(2))
        m = re.search(r"repack tensor \S+ with (\S+)", line)
        if m:
            repacked[m.group(1)] = repacked.get(m.group(1), 0) + 1
        m = re.match(r"llama_model_loader: - type\s+(\S+):\s+(\d+) tensors", line)
        if m:
            types[m.group(1)] = int(m.group(2))
    out.update(buffers_mib=buffers, repacked=repacked, tensor_types=types)
    for line in stdout.splitlines():
        if line.strip().startswith("{"):
            d = json.loads(line)
            out.update({k: d.get(k) for k in ("build_commit", "cpu_info", "backends", "repack", "model_type",
                                              "model_size")})
    if returncode != 0:
        out["stderr_tail"] = stderr[-1500:]
    return out


def llama_setup(work, shared, hf, threads):
    """The llama.cpp build this machine runs, the GGUF files, and the record of both (llama.json in the work
    folder). Probe once: a 32-token prefill of each quantized GGUF with the native build; if one dies with
    SIGILL (ggml's AMX kernel on a machine that reports AMX but faults on it), rebuild without AMX and
    probe again. The record (cached, redone when the CPU flags change) names the build used and what each
    GGUF ran (llama_kernels)."""
    rec_path = os.path.join(work, "llama.json")
    flags = cpu_flags()
    if os.path.isfile(rec_path):
        with open(rec_path) as f:
            rec = json.load(f)
        ggufs = [os.path.join(work, f"model-{q}.gguf") for q in ("F32", "Q8_0", "Q4_0")]
        if rec.get("cpu_flags") == flags and os.path.isdir(os.path.join(work, rec["bins"])) \
                and all(map(os.path.isfile, ggufs)):
            return rec
    bins, src, build = build_llama_cpp(shared)
    gguf = make_gguf(work, hf, bins, src)
    probes = {"native": {q: llama_kernels(bins, gguf[q], threads) for q in ("Q8_0", "Q4_0")}}
    sigill = [q for q, r in probes["native"].items() if r.get("signal") == "SIGILL"]
    if sigill:
        log(f"llama.cpp's native build died with SIGILL on {', '.join(sigill)}: rebuilding without AMX")
        bins, src, build = build_llama_cpp(shared, "no-amx")
        probes["no-amx"] = {q: llama_kernels(bins, gguf[q], threads) for q in ("Q8_0", "Q4_0")}
    final = probes["no-amx" if sigill else "native"]
    bad = {q: r for q, r in final.items() if r["returncode"] != 0}
    if bad:
        raise SystemExit(f"llama.cpp ({build['variant']} build) fails on this machine: "
                         + "; ".join(f"{q}: exit {r['returncode']} {r.get('signal', '')}" for q, r in bad.items()))
    f32 = llama_kernels(bins, gguf["F32"], threads)
    rec = {"cpu_flags": flags, "bins": os.path.relpath(bins, work), "build": build, "probes": probes,
           "rebuilt_without_amx": bool(sigill), "kernels": {**final, "F32": f32},
           "weights_bytes_per_token": {q: gguf_weight_bytes(p, src) for q, p in gguf.items()}}
    with open(rec_path + ".tmp", "w") as f:
        json.dump(rec, f, indent=1)
    os.replace(rec_path + ".tmp", rec_path)
    return rec


def gguf_weight_bytes(path, src) -> int:
    """Bytes of weights one decode step reads from a GGUF: every tensor once, except the token embedding where
    the file has a separate output (head) tensor (a lookup reads one row of it)."""
    sys.path.insert(0, os.path.join(src, "gguf-py"))
    from gguf import GGUFReader

    tensors = {t.name: t for t in GGUFReader(path).tensors}
    total = 0
    for name, t in tensors.items():
        n = int(t.n_bytes)
        if name == "token_embd.weight" and "output.weight" in tensors:
            n = n // int(t.shape[-1])          # one row
        total += n
    return total


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
    (external_data). Mamba1: its decode-step graph serves prefill and decode ("_qlinear": step graphs with
    mq::SelectiveStateUpdate(Float), mq::QLinear and mq::DynamicQLinear; graphs cached before them are not
    reused). The SSD families: the full graph
    (mq::SSDScan, chunked) for prefill, the step graph (mq::SSDStateUpdate per layer) for decode."""
    out = {}
    for q in PRECISIONS:
        step = os.path.join(work, f"{q}_step_qlinear.onnx")
        out[(q, "decode")] = step
        out[(q, "prefill")] = step if family == "mamba" else os.path.join(work, f"{q}_full.onnx")
    return out


def make_onnx(work, hf, threads, family="mamba", precisions=("fp32", "w8a8")):
    """The graphs of `precisions` (onnx_sources) with last-position logits (cached), weights as external data.
    W8A8: MambaQuant, int8 head (DynamicQuantizeLinear + MatMulInteger). W4A8: MambaQuant with int4 weights,
    written for ONNX Runtime (--int4-format matmulnbits: com.microsoft.MatMulNBits), and the head int4 too
    (a scale per block of 32, MatMulNBits; llama.cpp's Q4_0 keeps its tied head in Q6_K)."""
    srcs = {k: v for k, v in onnx_sources(work, family).items() if k[0] in precisions}
    out = {q: srcs[(q, "decode")] for q in precisions}
    full = {q: srcs[(q, "prefill")] for q in precisions}
    if all(os.path.isfile(p) for p in (*out.values(), *full.values())):
        return {k: external_data(p) for k, p in srcs.items()}
    import numpy as np
    import torch

    from mq_deploy.calib.collect import text_forward_loop
    from mq_deploy.export.exporter import quant_spec, save_model_atomic
    from mq_deploy.export.graph import build_model
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.fakequant import QuantConfig, quantize_head
    from mq_deploy.quant.qcheckpoint import save_quantized
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

    torch.set_num_threads(threads)

    def save(model, spec, q, **kw):
        for path, step in ((out[q], True), (full[q], False)):
            if not os.path.isfile(path):
                log(f"exporting the {q} {'step' if step else 'full'} graph")
                save_model_atomic(build_model(model, spec, step=step, last_logits=True, **kw), path, overwrite=True)

    if "fp32" in precisions and not (os.path.isfile(out["fp32"]) and os.path.isfile(full["fp32"])):
        save(load_model(hf).model, None, "fp32")
    for q, wbits in (("w8a8", 8), ("w4a8", 4)):
        if q not in precisions or (os.path.isfile(out[q]) and os.path.isfile(full[q])):
            continue
        # the quantized checkpoint is kept (a `mq-deploy quantize` folder), so a change of the exporter costs
        # an export, not another calibration; the graphs come from it as `mq-deploy export` makes them
        ckpt = os.path.join(work, f"{q}_checkpoint")
        if not os.path.isdir(ckpt):
            from transformers import AutoTokenizer

            log(f"quantizing (MambaQuant W{wbits}A8, 16 windows of 256 tokens)")
            ids = np.asarray(AutoTokenizer.from_pretrained(hf)(corpus())["input_ids"], dtype=np.int64)
            model = load_model(hf).model
            recipe = RecipeConfig("mambaquant", QuantConfig(wbits, 8))
            scales = apply_recipe(model, text_forward_loop(ids, 256, 16, batch=4), recipe)
            save_quantized(model, ckpt, recipe, scales, {"source": "corpus()", "samples": 16, "seq_len": 256}, {},
                           hf, overwrite=True)
        loaded = load_model(ckpt)
        quantize_head(loaded.model, "dynamic", bits=wbits)
        save(loaded.model, quant_spec(loaded), q, **({"int4_format": "matmulnbits"} if wbits == 4 else {}))
    return {k: external_data(p) for k, p in srcs.items()}


def onnx_weight_bytes(path) -> int:
    """Bytes of weights one decode step of an ONNX file reads: every initializer once, except a table only read
    by Gather as its data (the embedding: a lookup reads one row)."""
    import onnx

    m = onnx.load(path, load_external_data=False)
    readers: dict = {}
    for n in m.graph.node:
        for k, i in enumerate(n.input):
            readers.setdefault(i, []).append((n.op_type, k))
    total = 0
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        n = int(ext["length"]) if "length" in ext else len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
        if readers.get(t.name) and all(op == "Gather" and k == 0 for op, k in readers[t.name]) and len(t.dims) == 2:
            n //= int(t.dims[0])
        total += n
    return total


def checkpoint_counts(hf) -> dict:
    """From the transformers checkpoint: bytes of its tensors (float32: what transformers and our PyTorch read
    per decode step, the tied embedding once, as the head) and GEMM MACs per token of the layers' linears
    (every 2-D weight but the embedding) and of the head (vocab x d_model)."""
    from safetensors import safe_open

    total, layer_macs, head_macs = 0, 0, 0
    for name in sorted(os.listdir(hf)):
        if not name.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(hf, name), "np") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                numel = 1
                for d in shape:
                    numel *= d
                total += 4 * numel
                if len(shape) == 2 and ("embed" in k or "lm_head" in k):
                    head_macs = max(head_macs, numel)
                elif len(shape) == 2 and k.endswith(".weight"):       # not A_log [d_inner, d_state]
                    layer_macs += numel
    return {"weights_bytes_fp32": total, "layer_macs_per_token": layer_macs, "head_macs": head_macs}


def ort_kernels(paths: dict, threads) -> dict:
    """What ONNX Runtime runs: its version and providers, the session options of our rows, the CPU flags its
    MLAS dispatch reads, and, per ONNX file, the op types of the graph ORT optimized from it (with the native
    library registered): MatMulIntegerToFloat (the int8 GEMM), MatMulNBits (the packed int4 one), ..."""
    import collections
    import tempfile

    import onnx
    import onnxruntime as ort

    from mq_deploy.backends.ort.runner import EXACT_INT8_CONFIG, default_library, session_options

    flags = cpu_flags()
    mlas = {"avx2": "avx2" in flags, "avx512_core": all(f in flags for f in AVX512_BASE),
            "avx512_vnni": "avx512_vnni" in flags, "avx_vnni": "avx_vnni" in flags, "amx_int8": "amx_int8" in flags}
    out = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
           "session_config": {**EXACT_INT8_CONFIG, "session.intra_op.allow_spinning": "1"},
           "intra_op_threads": threads, "mlas_cpu_flags": mlas, "optimized_ops": {}}
    lib = default_library(None)
    for key, path in paths.items():
        with tempfile.TemporaryDirectory() as d:
            so = session_options(threads, spin=True, custom_op_library=lib,
                                 optimized_model_path=os.path.join(d, "opt.onnx"))
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "opt.data")
            so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
            ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
            m = onnx.load(os.path.join(d, "opt.onnx"), load_external_data=False)
        ops = collections.Counter(f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in m.graph.node)
        out["optimized_ops"][key] = dict(sorted(ops.items(), key=lambda kv: -kv[1]))
    return out


# ---- the roofline: the machine's read bandwidth and int8 GEMM peak, measured in the same run ---------------

def membw_binary(shared):
    """bench/membw.c compiled into the shared work folder (again when the source changes)."""
    src = os.path.join(ROOT, "bench", "membw.c")
    with open(src, "rb") as f:
        tag = hashlib.sha1(f.read()).hexdigest()[:12]
    exe = os.path.join(shared, f"membw-{tag}")
    if not os.path.isfile(exe):
        subprocess.run(["cc", "-O3", "-march=native", "-pthread", "-o", exe + ".tmp", src], check=True)
        os.replace(exe + ".tmp", exe)
    return exe


def llc_bytes() -> int:
    """The largest CPU cache's size (sysfs), 32 MiB when unknown."""
    best = 0
    for p in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(p) as f:
                s = f.read().strip()
            best = max(best, int(s[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[s[-1]] if s[-1] in "KMG"
                       else int(s))
        except (OSError, ValueError, KeyError):
            pass
    return best or 32 << 20


GEMM_N = 2048        # the int8 GEMM peak: a [N, N] x [N, N] problem (8.6 G MACs)


def gemm_peak(threads, runs=5, n=GEMM_N) -> dict:
    """ONNX Runtime's int8 GEMM on a large square problem as our graphs write a W8A8 linear (QuantizeLinear ->
    DequantizeLinear -> MatMul <- DequantizeLinear(int8 weight, per channel, explicit zero points)), in a session
    with our rows' options: ORT fuses it into MatMulIntegerToFloat. G int8 MACs/s of the fastest run, and the
    op ORT ran (checked: the peak is of its int8 kernel, not of a float fallback)."""
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from mq_deploy.backends.ort.runner import session_options

    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (n, n)).astype(np.int8)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"), numpy_helper.from_array(np.array(0.05, np.float32), "xs"),
             numpy_helper.from_array(np.array(0, np.int8), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], axis=1),
             helper.make_node("MatMul", ["xd", "wd"], ["y"])]
    g = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    with tempfile.TemporaryDirectory() as d:
        so = session_options(threads, spin=True, optimized_model_path=os.path.join(d, "opt.onnx"))
        sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ops = sorted({nd.op_type for nd in onnx.load(os.path.join(d, "opt.onnx")).graph.node})
    x = (rng.integers(-127, 128, (n, n)) * 0.05).astype(np.float32)
    sess.run(None, {"x": x})
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        ts.append(time.perf_counter() - t)
    return {"n": n, "runs": runs, "ops": ops, "gmacs_best": round(n ** 3 / min(ts) / 1e9, 2),
            "gmacs_median": round(n ** 3 / statistics.median(ts) / 1e9, 2)}


def measure_roofline(shared, threads) -> dict:
    """The two limits, each in a fresh process: the read bandwidth (bench/membw.c: `threads` threads streaming
    over max(1 GiB, 16 x the largest cache)) and the int8 GEMM peak (gemm_peak)."""
    mib = max(1024, 16 * llc_bytes() >> 20)
    before = load()
    p = subprocess.run([membw_binary(shared), str(threads), str(mib), "5"], capture_output=True, text=True, check=True)
    bw = json.loads(p.stdout.strip().splitlines()[-1])
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--worker-gemm"],
                       capture_output=True, text=True, check=True)
    gemm = json.loads(p.stdout.strip().splitlines()[-1])
    return {"read": bw, "int8_gemm": gemm, "load_before": before, "load_after": load()}


def roofline_columns(row, counts, limits) -> dict:
    """A row's roofline: decode, bytes of weights read per decoded token (counts["weights_bytes"][system]), the
    read bandwidth that implies (one read of the weights per step serves the whole batch) and its fraction of
    the measured limit; prefill, GEMM MACs per token (the layers' linears and the head's last position) and the
    rate and fraction of the int8 GEMM peak that implies."""
    tps = row["tokens_per_s"]
    if row["case"].startswith("prefill"):
        L = int(row["case"].split("-")[1])
        macs = counts["layer_macs_per_token"] + counts["head_macs"] / L
        g = macs * tps / 1e9
        return {"macs_per_token": round(macs), "gmacs": round(g, 2),
                "int8_peak_fraction": round(g / limits["int8_gemm_gmacs"], 4)}
    wb = counts["weights_bytes"].get(row["system"])
    if wb is None:
        return {}
    gbps = wb * tps / row["batch"] / 1e9
    return {"weights_mib_per_token": round(wb / 2 ** 20, 2), "read_gbps": round(gbps, 3),
            "read_fraction": round(gbps / limits["read_gbps"], 4)}


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
    if system == NO_QLINEAR:
        os.environ["MQ_ORT_QLINEAR"] = "0"        # read when the library registers its ops (the session below)
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
    if system == NO_QLINEAR:
        os.environ["MQ_ORT_QLINEAR"] = "0"

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


def prepare(a, family, systems, work, shared, hf):
    """Everything the rows need, made (or found cached) in this child process: the checkpoint, llama.cpp's
    build, probe and GGUF files (llama_setup), the ONNX graphs, and counts.json: the weights each system reads
    per decode step and the model's GEMM MACs per token (roofline_columns), and what ORT runs (ort_kernels)."""
    make_checkpoint(hf, a.shape)
    counts = checkpoint_counts(hf)
    weights = {s: counts["weights_bytes_fp32"] for s in systems if not s.startswith(("llama.cpp", "mq-deploy ONNX"))}
    if any(s.startswith("llama.cpp") for s in systems):
        rec = llama_setup(work, shared, hf, a.threads)
        weights.update({s: rec["weights_bytes_per_token"][s.split()[-1]] for s in systems if s.startswith("llama.cpp")})
    kernels = None
    onnx_systems = [s for s in systems if "ONNX" in s]
    if onnx_systems:
        precisions = tuple(q for q in PRECISIONS if any(precision(s) == q for s in onnx_systems))
        paths = make_onnx(work, hf, a.threads, family, precisions)
        weights.update({s: onnx_weight_bytes(paths[(precision(s), "decode")]) for s in onnx_systems})
        files: dict = {}              # one ORT session per distinct file (Mamba1's step graph serves both kinds)
        for (q, k), p in sorted(paths.items()):
            files.setdefault(p, []).append((q, k))
        kernels = ort_kernels({f"{ks[0][0]} {'/'.join(k for _, k in ks)}": p for p, ks in files.items()}, a.threads)
    counts["weights_bytes"] = weights
    counts["onnxruntime"] = kernels
    with open(os.path.join(work, "counts.json"), "w") as f:
        json.dump(counts, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="130m")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed runs per row (median; llama-bench -r)")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "build", "peers"),
                    help="cache of the checkpoint, llama.cpp build, GGUF and ONNX files")
    ap.add_argument("--systems", help="semicolon-separated subset of: " + "; ".join(SYSTEMS))
    ap.add_argument("--max-load", type=float, default=None,
                    help="run a row again when the 1-minute load average exceeded this at its start "
                         "(default: 1.5 x threads)")
    ap.add_argument("--retries", type=int, default=2)
    ap.add_argument("--profile", metavar="SYSTEM",
                    help="instead of the table: ORT's time per op type of one ONNX system (prefill 1024 at batch 1, "
                         "a decode step at batch 1 and 8), printed, and written to --json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-gemm", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.worker:
        w = json.loads(a.worker)
        fn = worker_onnx if "ONNX" in w["system"] else worker_torch
        print(json.dumps({"tokens_per_s": fn(w["system"], w["case"], w["batch"], w["path"], a.threads, a.runs)}))
        return 0
    if a.worker_gemm:
        print(json.dumps(gemm_peak(a.threads)))
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
    if a.prepare:
        prepare(a, family, systems, work, shared, hf)
        return 0
    # the artifacts are made in a child: this process stays small, since a row's process is forked from
    # it and its peak RSS (ru_maxrss) counts the time before exec
    subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare", "--shape", a.shape, "--threads",
                    str(a.threads), "--workdir", a.workdir] + (["--systems", a.systems] if a.systems else []),
                   check=True)
    with open(os.path.join(work, "counts.json")) as f:
        counts = json.load(f)
    llama = None
    if any(s.startswith("llama.cpp") for s in systems):
        with open(os.path.join(work, "llama.json")) as f:
            llama = json.load(f)
    bins = os.path.join(work, llama["bins"]) if llama else None
    gguf = {q: os.path.join(work, f"model-{q}.gguf") for q in ("F32", "Q8_0", "Q4_0")} if llama else None
    onnx = {k: p[:-len(".onnx")] + "_ext.onnx" for k, p in onnx_sources(work, family).items()}   # make_onnx's

    from importlib.metadata import version

    ort_version = version("onnxruntime")
    if a.profile:
        q = precision(a.profile)
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
          f"llama.cpp of llama-cpp-python {LLAMA_CPP_PYTHON}"
          + (f" ({llama['build']['variant']} build)" if llama else "")
          + f"; median of {a.runs} runs; rows with load > {max_load} at start are repeated (up to {a.retries} more)")
    roof = {"start": measure_roofline(shared, a.threads)}

    def limits():
        ms = list(roof.values())
        return {"read_gbps": max(m["read"]["gbps_best"] for m in ms),
                "int8_gemm_gmacs": max(m["int8_gemm"]["gmacs_best"] for m in ms)}

    lim = limits()
    print(f"roofline: read {lim['read_gbps']:.1f} GB/s ({a.threads} threads), int8 GEMM "
          f"{lim['int8_gemm_gmacs']:.0f} G MAC/s (ORT {', '.join(roof['start']['int8_gemm']['ops'])})")
    print(f"{'system':40s} {'case':13s} {'batch':>5s} {'tok/s':>8s} {'RSS MiB':>8s} {'roofline':>22s}  load")
    # what the rows ran: the model's shape, which ONNX graph served each kind of case, the kernels, the order
    fields = {"family": family, "config": {k: v for k, v in SHAPES[a.shape].items() if k != "family"},
              "onnx_graphs": {k: "step" if onnx[("fp32", k)] == onnx[("fp32", "decode")] else "full"
                              for k in ("prefill", "decode")},
              "order": "case by case; within a case the peers and ours alternate, in reverse order every other case",
              "kernels": {"cpu_flags": cpu_flags(), "llama_cpp": llama, "onnxruntime": counts["onnxruntime"]},
              "counts": {k: counts[k] for k in ("layer_macs_per_token", "head_macs", "weights_bytes")}}

    def document(complete):
        lim = limits()
        for r in rows:
            r.update(roofline_columns(r, counts, lim))
        return {"shape": a.shape, "threads": a.threads, "onnxruntime": ort_version,
                "llama_cpp_python": LLAMA_CPP_PYTHON, "complete": complete, "rows": rows, **fields,
                "roofline": {**roof, "limits": lim}, "run": meta.finish() if complete else meta.info}

    rows = []
    order = interleaved(systems)
    for ci, (case, batch) in enumerate(CASES):
        for system in (order if ci % 2 == 0 else order[::-1]):
            if system.startswith("llama.cpp"):
                cmd = llama_cmd(bins, gguf[system.split()[-1]], case, batch, a.threads, a.runs)

                def parse(out, case=case, batch=batch):
                    return parse_llama(out, case, batch)
            else:
                path = {k: onnx[(precision(system), k)] for k in ("prefill", "decode")} if "ONNX" in system else hf
                cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(a.threads), "--runs", str(a.runs),
                       "--worker", json.dumps({"system": system, "case": case, "batch": batch, "path": path})]

                def parse(out):
                    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]
            tries = []
            for attempt in range(a.retries + 1):
                tps, rss, before, after = run_in_child(cmd, parse)
                tries.append(dict(tokens_per_s=tps, peak_rss_mib=rss, load_before=before, load_after=after))
                col = roofline_columns(dict(system=system, case=case, batch=batch, tokens_per_s=tps), counts, lim)
                rl = (f"{col['read_gbps']:.1f} GB/s {col['read_fraction'] * 100:3.0f} %" if "read_gbps" in col else
                      f"{col['gmacs']:.1f} GMAC/s {col['int8_peak_fraction'] * 100:3.0f} %" if "gmacs" in col else "")
                print(f"{system:40s} {case:13s} {batch:5d} {tps:8.1f} {rss:8.0f} {rl:>22s}  {before[0]:.2f} -> "
                      f"{after[0]:.2f}" + ("" if attempt == 0 else f"   (attempt {attempt + 1})"), flush=True)
                if before[0] <= max_load:
                    break
            best = max(tries, key=lambda t: t["tokens_per_s"])
            rows.append(dict(system=system, case=case, batch=batch, tokens_per_s=round(best["tokens_per_s"], 2),
                             peak_rss_mib=round(best["peak_rss_mib"], 1), load_before=best["load_before"],
                             load_after=best["load_after"],
                             attempts=[round(t["tokens_per_s"], 2) for t in tries]))
            if a.json:   # after every row: a long run interrupted keeps what it measured
                from mq_deploy.fileio import write_json

                write_json(a.json, document(False), overwrite=True)
    roof["end"] = measure_roofline(shared, a.threads)
    doc = document(True)
    summary(rows, doc["roofline"]["limits"])
    if a.json:
        from mq_deploy.fileio import write_json

        write_json(a.json, doc, overwrite=True)
        print(f"wrote {a.json}")
    return 0


def summary(rows, limits=None):
    """The markdown table (tok/s, peak RSS), the roofline per row and the goal ratios of the int8 artifact with
    native ops."""
    by = {(r["system"], r["case"], r["batch"]): r for r in rows}
    cols = [(c, b) for c, b in CASES]
    print()
    print("| system | " + " | ".join(f"{c} b{b} tok/s" for c, b in cols) + " | peak RSS MiB |")
    print("|---|" + "---|" * (len(cols) + 1))
    for s in dict.fromkeys(r["system"] for r in rows):
        cells = [f"{by[(s, c, b)]['tokens_per_s']:.1f}" if (s, c, b) in by else "–" for c, b in cols]
        rss = [by[(s, c, b)]["peak_rss_mib"] for c, b in cols if (s, c, b) in by]
        print(f"| {s} | " + " | ".join(cells) + f" | {min(rss):.0f}–{max(rss):.0f} |")
    if limits:
        print(f"\nroofline (read {limits['read_gbps']:.1f} GB/s, int8 GEMM {limits['int8_gemm_gmacs']:.0f} G MAC/s): "
              "decode: MiB of weights per token, GB/s, % of the read limit; prefill: G MAC/s, % of the int8 peak")
        for s in dict.fromkeys(r["system"] for r in rows):
            parts = []
            for c, b in cols:
                r = by.get((s, c, b), {})
                if "read_gbps" in r:
                    parts.append(f"{c} b{b} {r['weights_mib_per_token']:.0f} MiB {r['read_gbps']:.1f} GB/s "
                                 f"{r['read_fraction'] * 100:.0f} %")
                elif "gmacs" in r:
                    parts.append(f"{c} {r['gmacs']:.1f} GMAC/s {r['int8_peak_fraction'] * 100:.0f} %")
            print(f"  {s}: " + "; ".join(parts))
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
    w4, q4 = "mq-deploy ONNX W4A8, ORT + native ops", "llama.cpp Q4_0"
    for c, b in cols:
        if (w4, c, b) in by and (q4, c, b) in by:
            print(f"W4A8 native, {c} b{b}: vs llama.cpp Q4_0 "
                  f"{by[(w4, c, b)]['tokens_per_s'] / by[(q4, c, b)]['tokens_per_s']:.2f}x")
    if any(r["system"] == ours for r in rows) and any(r["system"] == q8 for r in rows):
        o = max(r["peak_rss_mib"] for r in rows if r["system"] == ours)
        q = max(r["peak_rss_mib"] for r in rows if r["system"] == q8)
        print(f"peak RSS: W8A8 native {o:.0f} MiB vs llama.cpp Q8_0 {q:.0f} MiB ({o / q:.2f}x)")


if __name__ == "__main__":
    sys.exit(main())
