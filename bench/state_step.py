"""What storing the decode states in fp16 or int8 costs per decode step, on the LM samples' W8A8 step graphs in
ONNX Runtime with our native ops: float32 states, float16 states, int8 states converted by graph nodes around the
fused step ops (what `export --state-dtype int8` wrote before those ops took int8 states), and int8 states read
and written inside the fused ops (mq::SelectiveStateUpdateInt8State / mq::SSDStateUpdateInt8State, this tree).

    python bench/state_step.py [--samples mamba-byte-lm,mamba2-byte-lm,hybrid-byte-lm] [--batches 1,16,64]
                               [--threads 2] [--calls 300] [--rounds 5] [--workdir DIR] [--json OUT]
                               [--op-shapes mamba-130m,mamba2-130m --op-batches 1,8]

Each sample is quantized (MambaQuant W8A8, 8 calibration windows) and exported four times with build_model, the
exporter's graph builder (int8_state_in_op=False gives the converting graph). A case is one variant at one batch
size: a call per step, each fed the states the last call stored, after 30 warm-up calls; its time is the median
call of the best of --rounds rounds, the variants alternating round by round so that a change of load favours
none. Printed beside each: its ratio to the float32-state graph's, and the load; the JSON keeps every figure.

--op-shapes: also one fused step node alone at a published model's layer shape (random weights and states, the
inputs of tests/test_state_update.py and tests/test_native_ssd.py, which reach the edges), int8 op with float32
states against the int8-state op, at --op-batches: where the samples' tiny layers hide what converting a large
state costs. Time: the median call of the best of --rounds rounds of --calls calls, alternating.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from benchmeta import RunMeta, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = (("fp32", "float32", True), ("fp16", "float16", True), ("int8, converted by graph nodes", "int8", False),
            ("int8, inside the fused ops", "int8", True))


def _export(qdir, dtype, in_op, path):
    """A step graph of the quantized checkpoint qdir storing its states as dtype, written to path (one file)."""
    from mq_deploy.export.exporter import quant_spec, set_state_dtype
    from mq_deploy.export.graph import build_model
    from mq_deploy.quant.qcheckpoint import load

    loaded = load(qdir)
    spec = quant_spec(loaded)
    if dtype != "float32":
        set_state_dtype(loaded, dtype, spec)
    proto = build_model(loaded.model, spec, step=True, int8_state_in_op=in_op)
    proto.ir_version = 10
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return sorted({n.op_type for n in proto.graph.node if n.domain == "mq"}), len(proto.graph.node)


def _session(path, threads, lib):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.register_custom_ops_library(lib)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _steps(sess, cfg, b, calls, seed):
    """Median seconds per decode call of `calls` calls at batch b, each fed the last call's states."""
    from mq_deploy.families import zero_states

    names = [i.name for i in sess.get_inputs()][1:]
    feeds = zero_states(cfg, b)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.vocab_size, (b, 1)).astype(np.int64)
    times = []
    for k in range(30 + calls):
        t = time.perf_counter()
        out = sess.run(None, {"input_ids": ids, **feeds})
        if k >= 30:
            times.append(time.perf_counter() - t)
        feeds = dict(zip(names, out[1:]))
        ids = out[0][:, -1].argmax(-1).reshape(b, 1).astype(np.int64)
    return statistics.median(times)


# layer shapes of the published checkpoints: Mamba1 (Di, d_state, dt_rank, d_conv), Mamba2 (heads, head_dim,
# groups, d_state, d_conv)
OP_SHAPES = {"mamba-130m": ("mamba1", (1536, 16, 48, 4)), "mamba-2.8b": ("mamba1", (5120, 16, 160, 4)),
             "mamba2-130m": ("mamba2", (24, 64, 1, 128, 4)), "mamba2-2.7b": ("mamba2", (80, 64, 1, 128, 4))}


def _op_cases(shape, b, lib, threads):
    """{variant: (session, feeds)} of one fused node at a layer shape: float32 states, int8 states."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_state_update_int8 import _int8_model, _int8_states, _ssd_int8_model

    from mq_deploy.models import state_codec

    def session(model):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.register_custom_ops_library(lib)
        return ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else model, so,
                                    providers=["CPUExecutionProvider"])

    family, dims = OP_SHAPES[shape]
    if family == "mamba1":
        from test_state_update import _update_inputs, _update_model

        Di, N, R, K = dims
        f, attrs = _update_inputs(b, 1, Di, N, R, K, False, True, seed=1)
        conv_q, ssm_q, ssm_s = _int8_states(f, attrs, seed=2)
        cs = torch.tensor(attrs["conv_scale"], dtype=torch.float32)
        plain = dict(f, conv_state=conv_q.float() * cs, ssm_state=ssm_q.float() * ssm_s.float().unsqueeze(-1))
        mine = dict(f, conv_state=conv_q, ssm_state=ssm_q, ssm_state_scale=ssm_s)
        fp = session(_update_model(True, {k: list(v.shape) for k, v in plain.items()}, attrs))
        i8 = session(_int8_model({k: list(v.shape) for k, v in mine.items()}, attrs))
        return {"float32 states": (fp, {k: v.numpy() for k, v in plain.items()}),
                "int8 states": (i8, {k: v.numpy() for k, v in mine.items()})}
    from test_native_ssd import update_case, update_model

    H, P, G, N, K = dims
    f, attrs, _, _ = update_case(b, 1, H, P, G, N, K=K, quant=True, per_channel=True, seed=1)
    cs = np.float32(attrs["conv_scale"])
    conv_q = np.clip(np.rint(f["conv_state"] / cs), -128, 127).astype(np.int8)
    q, s = state_codec.rows_int8(torch.from_numpy(f["ssm_state"]))
    plain = dict(f, conv_state=conv_q.astype(np.float32) * cs,
                 ssm_state=(q.float() * s.float().unsqueeze(-1)).numpy())
    fp = session(update_model(H, P, G, N, K, 3, 1, True, attrs, body=False))
    i8 = session(_ssd_int8_model(H, P, G, N, K, 3, 1, attrs, body=False))
    return {"float32 states": (fp, plain),
            "int8 states": (i8, dict(f, conv_state=conv_q, ssm_state=q.numpy(), ssm_state_scale=s.numpy()))}


def _op_time(sess, feeds, calls):
    """Median seconds per call after 20 warm-up calls (bench/ort.py's latency after its own one)."""
    from ort import latency

    for _ in range(19):
        sess.run(None, feeds)
    return latency(sess, feeds, calls)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", default="mamba-byte-lm,mamba2-byte-lm,hybrid-byte-lm")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--op-shapes", default="", help=f"one fused node alone at these layer shapes ({', '.join(OP_SHAPES)})")
    ap.add_argument("--op-batches", default="1,8")
    ap.add_argument("--workdir", help="keep the quantized checkpoints and step graphs here")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()
    meta = RunMeta()

    from mq_deploy.cli.main import main as cli
    from mq_deploy.families import state_inputs
    from mq_deploy.ops.native import ort_library, ort_library_path
    from mq_deploy.quant.qcheckpoint import load

    lib = ort_library()
    if lib is None:
        raise SystemExit(f"{ort_library_path()} is not built: python -m mq_deploy.ops.native --build")
    work = args.workdir or tempfile.mkdtemp(prefix="mq-bench-state-step-")
    os.makedirs(work, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for sample in [s for s in args.samples.split(",") if s]:
        qdir = os.path.join(work, sample + "-w8a8")
        if not os.path.isdir(qdir):
            if cli(["quantize", os.path.join(ROOT, "samples", sample), "-o", qdir, "--calib-samples", "8",
                    "--seq-len", "256"]) != 0:
                raise SystemExit(f"quantizing {sample} failed")
        cfg = load(qdir).model.cfg
        graphs = {}
        for name, dtype, in_op in VARIANTS:
            path = os.path.join(work, f"{sample}-{dtype}-{'op' if in_op else 'nodes'}.onnx")
            ops, nodes = _export(qdir, dtype, in_op, path)
            graphs[name] = (path, ops, nodes)
        cfgs = {dtype: dataclasses.replace(cfg, state_dtype=dtype) for dtype in ("float32", "float16", "int8")}
        sessions = {name: _session(path, args.threads, lib) for name, (path, _, _) in graphs.items()}
        ssm_layers = len(next(si for si in state_inputs(cfg) if si.name == "ssm_state").layers)
        row = {"sample": sample, "layers": cfg.n_layer, "ssm_layers": ssm_layers, "cases": []}
        for b in batches:
            best = {name: float("inf") for name, _, _ in VARIANTS}
            loads = []
            for r in range(args.rounds):
                for name, dtype, _ in VARIANTS:
                    best[name] = min(best[name], _steps(sessions[name], cfgs[dtype], b, args.calls, seed=r))
                loads.append(os.getloadavg()[0])
            base = best[VARIANTS[0][0]]
            for name, dtype, in_op in VARIANTS:
                case = {"variant": name, "state_dtype": dtype, "in_op": in_op, "batch": b,
                        "step_ms": round(best[name] * 1e3, 4), "tokens_per_s": round(b / best[name], 1),
                        "vs_fp32": round(best[name] / base, 3), "graph_nodes": graphs[name][2],
                        "mq_ops": graphs[name][1], "load": round(max(loads), 2)}
                row["cases"].append(case)
                print(f"{sample:15s} b={b:3d} {name:32s} {case['step_ms']:8.3f} ms/step  {case['tokens_per_s']:9.1f} "
                      f"tok/s  {case['vs_fp32']:.2f}x fp32's time  [{case['graph_nodes']} nodes; load {max(loads):.1f}]")
        results.append(row)
    ops = []
    for shape in [s for s in args.op_shapes.split(",") if s]:
        if shape not in OP_SHAPES:
            raise SystemExit(f"--op-shapes: unknown {shape!r}; known: {', '.join(OP_SHAPES)}")
        for b in (int(x) for x in args.op_batches.split(",")):
            cases = _op_cases(shape, b, lib, args.threads)
            best = {name: float("inf") for name in cases}
            loads = []
            for _ in range(args.rounds):
                for name, (sess, feeds) in cases.items():
                    best[name] = min(best[name], _op_time(sess, feeds, args.calls))
                loads.append(os.getloadavg()[0])
            base = best["float32 states"]
            for name in cases:
                ops.append({"shape": shape, "family": OP_SHAPES[shape][0], "batch": b, "variant": name,
                            "us": round(best[name] * 1e6, 2), "vs_fp32": round(best[name] / base, 3),
                            "load": round(max(loads), 2)})
                print(f"{shape:12s} b={b:2d} one fused node, {name:15s} {best[name] * 1e6:9.1f} us  "
                      f"{best[name] / base:.2f}x  [load {max(loads):.1f}]")
    if args.json:
        write(args.json, {"threads": args.threads, "calls": args.calls, "rounds": args.rounds, "samples": results,
                          "ops": ops}, meta)


if __name__ == "__main__":
    main()
