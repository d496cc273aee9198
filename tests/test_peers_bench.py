"""bench/peers.py's parts that decide what a run measures and records, without running the timed rows: the
alternating order, the llama.cpp build without AMX, what a llama-bench run says it ran, the roofline's two
limits (the read bandwidth helper reads every byte; the GEMM peak is ORT's int8 kernel) and the per-row
columns, and the bytes of weights a decode step of an ONNX file reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import peers  # noqa: E402

# stderr of `llama-bench -v` on a Q4_0 Mamba2 GGUF (llama.cpp of llama-cpp-python 0.3.36, AVX2), cut to the lines
# the parser reads and a few around them
LLAMA_BENCH_STDERR = """\
llama_model_loader: - type  f32:  169 tensors
llama_model_loader: - type q4_0:   48 tensors
llama_model_loader: - type q6_K:    1 tensors
done_getting_tensors: tensor 'token_embd.weight' (q6_K) (and 170 others) cannot be used with preferred buffer type CPU_REPACK, using CPU instead
load_tensors:   CPU_Mapped model buffer size =    78.95 MiB
load_tensors:   CPU_REPACK model buffer size =    48.33 MiB
...repack: repack tensor blk.0.ssm_in.weight with q4_0_8x8
.repack: repack tensor blk.0.ssm_out.weight with q4_0_8x8
repack: repack tensor blk.1.ssm_in.weight with q4_0_8x8
"""
LLAMA_BENCH_STDOUT = ('{"build_commit": "0c1e570", "cpu_info": "AMD EPYC", "backends": "CPU", "model_type": '
                      '"mamba2 0.1B Q4_0", "model_size": 83446512, "repack": true, "avg_ts": 33.5}\n')


def test_rows_alternate_between_the_peers_and_ours():
    order = peers.interleaved(peers.SYSTEMS)
    assert sorted(order) == sorted(peers.SYSTEMS)
    sides = [s.startswith("mq-deploy") for s in order]
    n = 2 * min(sides.count(True), sides.count(False))
    assert sides[:n] == [False, True] * (n // 2)       # a peer, one of ours, ...; the longer side's rest at the end


def test_the_build_without_amx_keeps_every_other_extension():
    flags = ["sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"]
    opts = dict(o[2:].split("=") for o in peers.ggml_isa_options(flags))
    assert opts["GGML_AMX_TILE"] == opts["GGML_AMX_INT8"] == opts["GGML_AMX_BF16"] == "OFF"
    for on in ("GGML_AVX2", "GGML_FMA", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX512_BF16", "GGML_AVX_VNNI"):
        assert opts[on] == "ON", on
    assert opts["GGML_AVX512_VBMI"] == "OFF"           # not in the flags
    # AVX-512 F alone is not enough: ggml's GGML_AVX512 also compiles for CD, BW, DQ and VL
    assert dict(o[2:].split("=") for o in peers.ggml_isa_options(["avx2", "avx512f"]))["GGML_AVX512"] == "OFF"


def test_what_a_llama_bench_run_ran():
    rec = peers.parse_llama_kernels(0, LLAMA_BENCH_STDOUT, LLAMA_BENCH_STDERR)
    assert rec["buffers_mib"] == {"CPU_Mapped": 78.95, "CPU_REPACK": 48.33}
    assert rec["repacked"] == {"q4_0_8x8": 3}
    assert rec["tensor_types"] == {"f32": 169, "q4_0": 48, "q6_K": 1}
    assert rec["repack"] is True and rec["model_size"] == 83446512 and "signal" not in rec
    died = peers.parse_llama_kernels(-4, "", "tinygemm_kernel_amx ...")
    assert died["signal"] == "SIGILL" and died["stderr_tail"].startswith("tinygemm")


def test_read_bandwidth_helper_reads_every_byte(tmp_path):
    exe = peers.membw_binary(str(tmp_path))
    out = json.loads(subprocess.run([exe, "2", "64", "2"], capture_output=True, text=True, check=True).stdout)
    n = (64 << 20) // 8
    # the buffer holds 0, 1, ..., n-1; each of the 2 timed passes and the untimed one sums all of it
    assert out["checksum"] == (3 * n * (n - 1) // 2) % 2 ** 64
    assert out["threads"] == 2 and out["gbps_best"] >= out["gbps_median"] > 0
    assert peers.membw_binary(str(tmp_path)) == exe    # compiled once per source


def test_gemm_peak_is_orts_int8_kernel():
    pytest.importorskip("onnxruntime")
    g = peers.gemm_peak(1, runs=1, n=256)
    assert "MatMulIntegerToFloat" in g["ops"] and "MatMul" not in g["ops"], g["ops"]
    assert g["gmacs_best"] > 0


def test_roofline_columns():
    counts = {"layer_macs_per_token": 1000, "head_macs": 512, "weights_bytes": {"A": 2_000_000}}
    limits = {"read_gbps": 10.0, "int8_gemm_gmacs": 100.0}
    d = peers.roofline_columns({"system": "A", "case": "decode-128", "batch": 8, "tokens_per_s": 400.0}, counts, limits)
    # one read of the weights per step serves the 8 sequences: 50 steps/s x 2 MB = 0.1 GB/s
    assert d == {"weights_mib_per_token": round(2_000_000 / 2 ** 20, 2), "read_gbps": 0.1, "read_fraction": 0.01}
    p = peers.roofline_columns({"system": "A", "case": "prefill-256", "batch": 1, "tokens_per_s": 1e6}, counts, limits)
    assert p == {"macs_per_token": 1002, "gmacs": 1.0, "int8_peak_fraction": 0.01}     # head: last position only
    assert peers.roofline_columns({"system": "B", "case": "decode-128", "batch": 1, "tokens_per_s": 1.0}, counts,
                                  limits) == {}


def test_onnx_weight_bytes_counts_an_embedding_lookup_as_one_row(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    emb = np.zeros((50, 16), np.float32)
    w = np.zeros((16, 8), np.int8)
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["h"], axis=0), helper.make_node("Cast", ["w"], ["wf"], to=1),
             helper.make_node("MatMul", ["h", "wf"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 8])],
                          [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w, "w")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    inline, ext = str(tmp_path / "m.onnx"), str(tmp_path / "m_ext.onnx")
    onnx.save(m, inline)
    onnx.save(m, ext, save_as_external_data=True, location="m_ext.data", size_threshold=0)
    for path in (inline, ext):
        assert peers.onnx_weight_bytes(path) == 16 * 4 + 16 * 8         # one row of the table, all of w


def test_a_sigill_on_the_native_build_rebuilds_it_without_amx(tmp_path, monkeypatch):
    """llama_setup probes the native build once per GGUF; a SIGILL (the AMX fault) rebuilds without AMX, probes
    that build, and the record says so; the record is cached until the CPU flags change."""
    built, probed = [], []

    def build(shared, variant="native"):
        built.append(variant)
        bins = tmp_path / f"llama-build-{variant}" / "bin"
        bins.mkdir(parents=True, exist_ok=True)
        return str(bins), "src", {"variant": variant}

    def gguf(work, hf, bins, src):
        out = {}
        for q in ("F32", "Q8_0", "Q4_0"):
            out[q] = str(tmp_path / f"model-{q}.gguf")
            open(out[q], "w").close()
        return out

    def kernels(bins, path, threads):
        probed.append((os.path.basename(os.path.dirname(bins)), os.path.basename(path)))
        amx_faults = "amx_int8" in peers.cpu_flags()
        if amx_faults and os.path.basename(os.path.dirname(bins)) == "llama-build-native" and "Q8_0" in path:
            return peers.parse_llama_kernels(-4, "", "tinygemm_kernel_amx")
        return peers.parse_llama_kernels(0, LLAMA_BENCH_STDOUT, LLAMA_BENCH_STDERR)

    monkeypatch.setattr(peers, "build_llama_cpp", build)
    monkeypatch.setattr(peers, "make_gguf", gguf)
    monkeypatch.setattr(peers, "llama_kernels", kernels)
    monkeypatch.setattr(peers, "gguf_weight_bytes", lambda path, src: 1)
    monkeypatch.setattr(peers, "cpu_flags", lambda: ["avx2", "amx_int8"])
    rec = peers.llama_setup(str(tmp_path), str(tmp_path), "hf", 2)
    assert built == ["native", "no-amx"] and rec["rebuilt_without_amx"] and rec["build"]["variant"] == "no-amx"
    assert rec["probes"]["native"]["Q8_0"]["signal"] == "SIGILL" and rec["probes"]["no-amx"]["Q8_0"]["returncode"] == 0
    assert rec["bins"] == os.path.join("llama-build-no-amx", "bin")
    assert ("llama-build-no-amx", "model-F32.gguf") in probed
    assert peers.llama_setup(str(tmp_path), str(tmp_path), "hf", 2) == rec and built == ["native", "no-amx"]  # cached
    monkeypatch.setattr(peers, "cpu_flags", lambda: ["avx2"])     # another machine, no AMX: probed again, native
    rec = peers.llama_setup(str(tmp_path), str(tmp_path), "hf", 2)
    assert built[2:] == ["native"] and not rec["rebuilt_without_amx"] and rec["build"]["variant"] == "native"
