"""ONNX Runtime (CPU) time of mq::SelectiveScan graphs: function body vs the custom-op library, side by side.

    python bench/ort_custom_op.py [--lib mq_deploy/_native/libmq_scan_ort.so] [--threads N] [--repeats 5]
                                  [--checkpoint /tmp/lm_w8 --seq 256 --batch 1] [--json OUT]

Each model runs in two sessions with the same options and inputs: one without the library (ORT inlines
the model-local function: DequantizeLinear + ONNX Scan, a subgraph per time step) and one with
`register_custom_ops_library(lib)` (the native kernel replaces the function). Their outputs are compared
before timing (rel err = max |diff| / max |body|). Time: the best of --repeats runs after one warm-up
(the least disturbed by other load on a shared machine).

Models: one mq::SelectiveScan node (int8 inputs) and one mq::SelectiveScanFloat node (float32 inputs, the
FP32 baseline's op) at (b=1, L=1024, D=768, N=16) and (b=8, L=256, D=384, N=16), so that the native int8
and float kernels are compared on equal footing too ("int8 / float32 native"); with
--checkpoint, a quantized checkpoint (mq-deploy quantize ... --recipe mambaquant) exported with
mq_deploy.export.exporter.export (full graph, input_ids [batch, seq] -> logits).
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort
from benchmeta import RunMeta, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
from test_ort_custom_op import feeds, float_feeds, float_model, scan_model  # noqa: E402  (one model builder)

from mq_deploy.ops.native import ort_library_path  # noqa: E402

SHAPES = [(1, 1024, 768, 16), (8, 256, 384, 16)]


def session(model, lib, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if lib:
        so.register_custom_ops_library(lib)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def best_time(sess, feed, repeats):
    out = sess.run(None, feed)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, feed)
        ts.append(time.perf_counter() - t0)
    return min(ts), out


def compare(name, model, feed, lib, threads, repeats):
    t_body, out_body = best_time(session(model, None, threads), feed, repeats)
    t_lib, out_lib = best_time(session(model, lib, threads), feed, repeats)
    a, b = np.asarray(out_lib[0], np.float32), np.asarray(out_body[0], np.float32)
    err = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))
    print(f"{name:<40} | {t_body * 1e3:>10.1f} {t_lib * 1e3:>10.2f} | {t_body / t_lib:>7.1f}x | {err:.1e}",
          flush=True)
    ROWS.append({"model": name, "body_ms": t_body * 1e3, "lib_ms": t_lib * 1e3, "speedup": t_body / t_lib,
                 "rel_err": err})
    return t_lib


ROWS: list = []


def exported_graph(checkpoint, out_dir):
    from mq_deploy.export.exporter import export

    summary = export(checkpoint, os.path.join(out_dir, "model.onnx"), step=False, overwrite=True)
    n_scan = summary["op_counts"].get("mq::SelectiveScan", 0)
    print(f"# exported {checkpoint}: {summary['nodes']} nodes, {n_scan} mq::SelectiveScan, quant {summary['quant']}")
    if n_scan == 0:
        print("# warning: no int8 mq::SelectiveScan node (an FP checkpoint?): the library has nothing to replace")
    return summary["path"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=ort_library_path())
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra_op_num_threads, both sessions")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", help="quantized checkpoint to export and time as a full graph")
    ap.add_argument("--batch", type=int, default=1, help="full graph: batch")
    ap.add_argument("--seq", type=int, default=256, help="full graph: sequence length")
    ap.add_argument("--json", metavar="OUT", help="write the figures and the run's load here")
    a = ap.parse_args()
    meta = RunMeta()
    if not os.path.isfile(a.lib):
        raise SystemExit(f"{a.lib} is not built: python -m mq_deploy.ops.native --build (or pip install -e .)")
    print(f"onnxruntime {ort.__version__}, CPU EP, intra_op_num_threads={a.threads}, best of {a.repeats} runs; "
          f"lib {a.lib}")
    print(f"{'model':<40} | {'body ms':>10} {'lib ms':>10} | {'speedup':>8} | rel err")
    for b, L, d, n in SHAPES:
        t8 = compare(f"1 SelectiveScan b{b} L{L} D{d} N{n}", scan_model(), feeds(b, L, d, n), a.lib, a.threads,
                     a.repeats)
        tf = compare(f"1 SelectiveScanFloat b{b} L{L} D{d} N{n}", float_model(), float_feeds(b, L, d, n), a.lib,
                     a.threads, a.repeats)
        print(f"{'  int8 / float32 native (equal footing)':<40} | {tf / t8:>21.2f}x faster int8", flush=True)
        ROWS.append({"model": f"int8 / float32 native b{b} L{L} D{d} N{n}", "b_l_d_n": [b, L, d, n],
                     "int8_vs_float_native": tf / t8})
    if a.checkpoint:
        with tempfile.TemporaryDirectory(prefix="mq_ort_bench_") as tmp:
            path = exported_graph(a.checkpoint, tmp)
            ids = np.random.default_rng(0).integers(0, 256, (a.batch, a.seq), dtype=np.int64)
            compare(f"exported graph b{a.batch} seq{a.seq}", path, {"input_ids": ids}, a.lib, a.threads, a.repeats)
    if a.json:
        write(a.json, {"onnxruntime": ort.__version__, "threads": a.threads, "repeats": a.repeats, "statistic": "best",
                       "rows": ROWS}, meta)


if __name__ == "__main__":
    main()
