"""ONNX Runtime latency: the int8 (QDQ + mq::SelectiveScan) graph vs the FP32 graph of the same sample.

Side by side in one run, same machine, same threads: LM at batch 1 and 8 (L = 256), Vim at batch 32.
Two equal-footing pairs: both graphs with their scans as ONNX function bodies (a Scan), and both with
the native custom-op library (mq::SelectiveScan for int8, mq::SelectiveScanFloat for FP32; default: the
one `pip install` builds into mq_deploy/_native/, or --custom-op-lib). The int8 graph with native ops
is also timed with the dense online Hadamard (one [Di, Di] MatMul) in place of the factored one.
With --profile, ORT's per-node profile is summed by op type (top-level nodes; a Scan counts its body)
to show where the time goes.

    python bench/ort.py [--threads 2] [--runs 10] [--profile] [--custom-op-lib SO] [--json OUT]
"""

from __future__ import annotations

import argparse
import bisect
import glob
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from benchmeta import RunMeta, write

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def session(path, threads, profile_dir=None, custom_op_lib=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, os.path.basename(path))
    if custom_op_lib:
        so.register_custom_ops_library(custom_op_lib)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def latency(sess, feeds, runs):
    sess.run(None, feeds)                                  # warm-up (allocations, kernel selection)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def profile_by_op(path, feeds, threads, custom_op_lib=None, runs=3):
    with tempfile.TemporaryDirectory() as d:
        sess = session(path, threads, d, custom_op_lib)
        for _ in range(runs):
            sess.run(None, feeds)
        sess.end_profiling()
        events = json.load(open(glob.glob(os.path.join(d, "*.json"))[0]))
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    # a Scan's time includes its body's nodes, which are reported too: count only top-level nodes
    scans = sorted((e["ts"], e["ts"] + e["dur"]) for e in nodes if e["args"].get("op_name") == "Scan")
    starts = [a for a, _ in scans]
    by_op: dict = {}
    for e in nodes:
        op = e["args"].get("op_name", "?")
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if op != "Scan" and i >= 0 and e["ts"] + e["dur"] <= scans[i][1]:
            continue
        by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3 / runs
    return dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--profile", action="store_true", help="print ORT's time per op type of each graph")
    ap.add_argument("--custom-op-lib", help="native custom-op library (default: mq_deploy/_native's)")
    ap.add_argument("--workdir", help="keep the quantized checkpoints and ONNX files here")
    ap.add_argument("--json", metavar="OUT", help="write the figures and the run's load here")
    args = ap.parse_args()
    meta = RunMeta()

    import onnxruntime as ort
    import torch

    from mq_deploy.cli.main import main as cli
    from mq_deploy.export.exporter import export, quant_spec, save_model_atomic
    from mq_deploy.export.graph import build_model
    from mq_deploy.models.loaders import load_model
    from mq_deploy.ops.native import ort_library, ort_library_path

    lib = args.custom_op_lib or ort_library()
    if lib is None:
        raise SystemExit(f"{ort_library_path()} is not built: python -m mq_deploy.ops.native --build")

    torch.set_num_threads(args.threads)
    work = args.workdir or tempfile.mkdtemp(prefix="mq-bench-ort-")
    os.makedirs(work, exist_ok=True)
    cases = [("lm", os.path.join(ROOT, "samples", "mamba-byte-lm"), [("batch 1, L 256", (1, 256)),
                                                                      ("batch 8, L 256", (8, 256))]),
             ("vim", os.path.join(ROOT, "samples", "vim-fashion-mnist"), [("batch 32", (32,))])]
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, median of {args.runs} runs; native: {lib}; "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"{'model':5s} {'shape':16s} | {'body: fp32':>10s} {'int8':>7s} {'ratio':>6s} | {'native: fp32':>12s} "
          f"{'int8':>7s} {'ratio':>6s} | {'int8 dense H':>12s} | load")
    rng = np.random.default_rng(0)
    rows = []
    for kind, sample, shapes in cases:
        q = os.path.join(work, f"{kind}_w8")
        if not os.path.isdir(q):
            cli(["quantize", sample, "-o", q, "--recipe", "mambaquant"])
        paths = {}
        for tag, src in (("fp32", sample), ("int8", q)):
            paths[tag] = os.path.join(work, f"{kind}_{tag}.onnx")
            export(src, paths[tag], overwrite=True)
        loaded = load_model(q)
        paths["int8_dense"] = os.path.join(work, f"{kind}_int8_denseH.onnx")
        save_model_atomic(build_model(loaded.model, quant_spec(loaded), rotation="dense"), paths["int8_dense"],
                          overwrite=True)
        del loaded
        sess = {"fp32": session(paths["fp32"], args.threads), "int8": session(paths["int8"], args.threads),
                "fp32 native": session(paths["fp32"], args.threads, custom_op_lib=lib),
                "int8 native": session(paths["int8"], args.threads, custom_op_lib=lib),
                "int8 native dense": session(paths["int8_dense"], args.threads, custom_op_lib=lib)}
        for label, shape in shapes:
            if kind == "lm":
                feeds = {"input_ids": rng.integers(0, 256, shape).astype(np.int64)}
            else:
                feeds = {"images": rng.standard_normal((shape[0], 1, 28, 28)).astype(np.float32)}
            t = {k: latency(s, feeds, args.runs) * 1e3 for k, s in sess.items()}
            print(f"{kind:5s} {label:16s} | {t['fp32']:10.1f} {t['int8']:7.1f} {t['fp32'] / t['int8']:5.2f}x | "
                  f"{t['fp32 native']:12.1f} {t['int8 native']:7.1f} {t['fp32 native'] / t['int8 native']:5.2f}x | "
                  f"{t['int8 native dense']:12.1f} | {os.getloadavg()[0]:.2f}", flush=True)
            row = {"model": kind, "case": label, "shape": list(shape), "ms": t, "load": round(os.getloadavg()[0], 2)}
            if args.profile:
                row["profile_ms_by_op"] = {}
                for tag, native_lib in (("fp32", None), ("int8", None), ("fp32 native", lib), ("int8 native", lib)):
                    ops = profile_by_op(paths[tag.split()[0]], feeds, args.threads, native_lib)
                    row["profile_ms_by_op"][tag] = ops
                    total = sum(ops.values())
                    top = ", ".join(f"{k} {v:.1f} ({v / total * 100:.0f}%)" for k, v in list(ops.items())[:6])
                    print(f"      {tag} ms by op: {top}")
            rows.append(row)
    if args.json:
        write(args.json, {"onnxruntime": ort.__version__, "threads": args.threads, "runs": args.runs,
                          "statistic": "median", "rows": rows}, meta)


if __name__ == "__main__":
    main()
