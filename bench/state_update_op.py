"""ONNX Runtime (CPU) time of one fused decode-step node, mq::SelectiveStateUpdate(Float), at a model's shape:
this tree's custom-op library against a baseline library built from another commit, in one run.

    python bench/state_update_op.py [--lib mq_deploy/_native/libmq_scan_ort.so] [--baseline-rev REV]
                                    [--shape 130m] [--batches 1,8] [--threads 1,2] [--spin 1,0] [--repeats 5]
                                    [--json OUT]

The node is the one the step graph holds per layer (conv-state shift and depthwise conv, x_proj, dt_proj, the
scan from the ssm state, the gate), with random weights and states of the shape's sizes (the inputs of
tests/test_state_update.py's kernel test, which reach the edges: -128 codes, saturating quant points, delta +
bias > 20). Every (dtype, batch, threads) case runs each library in its own child process, the libraries
alternating case by case, so that a change of load cannot favour one side. Time: the best of --repeats
blocks of calls after a warm-up (the least disturbed by other load). The outputs of the two libraries are
compared (max |diff| / max |ref| over y and both states) before their times are reported.

--baseline-rev REV builds plugins/selective_scan as it was at REV (git archive + its own build.sh) into a
temporary folder: the "before" of a kernel change, measured beside the "after".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchmeta import RunMeta, write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (Di, d_state, dt_rank, d_conv) of the published shapes
SHAPES = {"130m": (1536, 16, 48, 4), "370m": (2048, 16, 64, 4), "790m": (3072, 16, 96, 4), "2.8b": (5120, 16, 160, 4)}

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np, onnxruntime as ort
import test_state_update as T
lib, quant, b, Di, N, R, K, threads, repeats, spin, out = (sys.argv[2], sys.argv[3] == "int8", *map(int, sys.argv[4:12]),
                                                            sys.argv[12])
f, attrs = T._update_inputs(b, 1, Di, N, R, K, False, quant, seed=1)
shapes = {k: list(v.shape) for k, v in f.items()}
so = ort.SessionOptions()
so.register_custom_ops_library(lib)
so.intra_op_num_threads = threads
so.add_session_config_entry("session.intra_op.allow_spinning", str(spin))   # bench/peers.py: 1; OrtRunner: 0
sess = ort.InferenceSession(T._update_model(quant, shapes, attrs).SerializeToString(), so,
                            providers=["CPUExecutionProvider"])
feeds = {k: v.numpy() for k, v in f.items()}
for _ in range(30):
    res = sess.run(None, feeds)
t = time.perf_counter()
for _ in range(30):
    sess.run(None, feeds)
calls = max(20, int(0.4 / max(1e-6, (time.perf_counter() - t) / 30)))   # blocks of ~0.4 s
best = float("inf")
for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(calls):
        sess.run(None, feeds)
    best = min(best, (time.perf_counter() - t) / calls)
np.savez(out, *res)
print(json.dumps({"us": best * 1e6, "calls": calls}))
"""


def build_baseline(rev: str, tmp: str) -> str:
    """libmq_scan_ort.so built from plugins/selective_scan as it was at git revision `rev`."""
    src = os.path.join(tmp, "src")
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "plugins/selective_scan"], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--baseline-rev {rev}: git archive failed: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    out = os.path.join(tmp, "build")
    r = subprocess.run(["bash", os.path.join(src, "plugins/selective_scan/ort/build.sh"), out],
                       capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"--baseline-rev {rev}: the build failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return os.path.join(out, "libmq_scan_ort.so")


def run_child(lib, dtype, b, shape, threads, repeats, spin, out):
    Di, N, R, K = shape
    argv = [sys.executable, "-c", _CHILD, os.path.join(REPO, "tests"), lib, dtype, str(b), str(Di), str(N), str(R),
            str(K), str(threads), str(repeats), str(spin), out]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{lib} {dtype} b{b} threads {threads}: the child failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def rel_err(a_path, b_path):
    import numpy as np

    a, b = np.load(a_path), np.load(b_path)
    return max(float(np.abs(a[k] - b[k]).max() / max(1e-30, float(np.abs(b[k]).max()))) for k in a.files)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default=os.path.join(REPO, "mq_deploy", "_native", "libmq_scan_ort.so"))
    ap.add_argument("--baseline-rev", help="also time the library as built from this git revision")
    ap.add_argument("--shape", default="130m", choices=sorted(SHAPES))
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--dtypes", default="int8,fp32")
    ap.add_argument("--spin", default="1,0", help="ORT's intra-op spinning: 1 as bench/peers.py, 0 as OrtRunner "
                    "(serving, verify) by default")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", metavar="OUT")
    a = ap.parse_args()
    meta = RunMeta()
    if not os.path.isfile(a.lib):
        raise SystemExit(f"{a.lib} is not built (pip install -e . builds it)")
    shape = SHAPES[a.shape]
    rows = []
    with tempfile.TemporaryDirectory(prefix="mq_su_bench_") as tmp:
        libs = {"this tree": os.path.abspath(a.lib)}
        base_rev = None
        if a.baseline_rev:
            base_rev = subprocess.run(["git", "-C", REPO, "rev-parse", a.baseline_rev], capture_output=True,
                                      text=True).stdout.strip() or a.baseline_rev
            libs = {f"baseline {base_rev[:7]}": build_baseline(a.baseline_rev, tmp), **libs}
        print(f"mq::SelectiveStateUpdate at the {a.shape} shape (Di {shape[0]}, N {shape[1]}, dt_rank {shape[2]}, "
              f"d_conv {shape[3]}), L = 1, best of {a.repeats} blocks; load {os.getloadavg()[0]:.2f}", flush=True)
        for dtype in a.dtypes.split(","):
            for b in map(int, a.batches.split(",")):
                for threads in map(int, a.threads.split(",")):
                    for spin in map(int, a.spin.split(",")):
                        if threads == 1 and spin != int(a.spin.split(",")[0]):
                            continue          # (one thread: no pool to spin)
                        times, outs = {}, {}
                        for name, lib in libs.items():
                            outs[name] = os.path.join(tmp, f"{len(rows)}-{len(outs)}.npz")
                            times[name] = run_child(lib, dtype, b, shape, threads, a.repeats, spin, outs[name])["us"]
                        names = list(libs)
                        row = {"dtype": dtype, "batch": b, "threads": threads, "spin": bool(spin), "us": times,
                               "load": round(os.getloadavg()[0], 2)}
                        if len(names) == 2:
                            row["speedup"] = times[names[0]] / times[names[1]]
                            row["rel_err"] = rel_err(outs[names[1]], outs[names[0]])
                        rows.append(row)
                        cells = "  ".join(f"{k} {v:8.1f} us" for k, v in times.items())
                        extra = f"  {row['speedup']:.2f}x  (rel err {row['rel_err']:.1e})" if "speedup" in row else ""
                        print(f"{dtype} b{b} threads {threads}{' spin' if spin and threads > 1 else ''}: {cells}{extra}"
                              f"  load {row['load']:.2f}", flush=True)
    if a.json:
        write(a.json, {"op": "mq::SelectiveStateUpdate", "shape": a.shape, "sizes": dict(zip(("Di", "N", "dt_rank",
              "d_conv"), shape)), "baseline_rev": base_rev, "statistic": "best", "repeats": a.repeats,
              "libraries": list(libs), "rows": rows}, meta)


if __name__ == "__main__":
    main()
