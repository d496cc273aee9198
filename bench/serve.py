"""Serving load: a real tritonserver (pytriton's, Python backend, CPU) on 127.0.0.1 serving the two
shipped samples (MambaQuant W8A8, exported with mq-deploy), at concurrency 1, 4, 16 and 64.

- Vim: images/s and per-request latency p50/p99; each request is one Fashion-MNIST test image (so the
  dynamic batcher has something to merge under load), over gRPC.
- LM: streamed generation through NAME_generate (decoupled). With --generate-step inline (the default) it
  runs the step graph itself, on one decode thread, the steps of all its generations one ONNX Runtime call
  per round; with bls each step is a BLS request to the stateful step model, which batches the steps of a
  scheduling round. Each client keeps one gRPC stream and runs its generations on it one after the other;
  every client is connected before the clock starts. A response holds one token or more (mq-deploy triton
  --response-interval-us, --max-tokens-per-response). Reported: tokens/s over all streams, time to the
  first token p50/p99, the gaps between a stream's responses p50/p99 as the client receives them, the
  tokens per response, the mean batch (inline: steps per step-graph call, from the generate model's
  Prometheus counters; bls: from Triton's statistics of the step model, requests per execution, with a
  request's mean queue and compute time), and the CPU time per token of tritonserver, of each
  Python-backend stub and of this client (/proc).
Beside each: the same work in-process through mq_deploy's OrtRunner (no server, one caller; and for the
LM also generate_batch with 16 prompts as one batch), so the ratio is the price (or gain) of serving.
Every loop is bounded (--requests, --streams, --tokens; each client call has a timeout).

    python bench/serve.py [--requests 256] [--streams 2] [--tokens 64] [--instances 1] [--state-dtype int8]
        [--generate-step inline|bls] [--response-interval-us US] [--max-tokens-per-response K]
        [--response-streams N] [--threads N]
        [--json OUT]
        [--vim VIM.onnx --lm-step LM_STEP.onnx]   # default: quantize + export the samples (--workdir keeps them)

Goals checked (issue 23): served tokens/s at c=16 >= 5x c=1; c=1 >= 0.5x in-process; first-token p99 at
c=16 <= 4x c=1. Both sides are warmed first (ONNX Runtime plans every new input shape once) and run ONNX
Runtime with the same --threads. Response arrival times are taken in the client's stream callback, where
gRPC may deliver several responses at once: tokens/s is the figure to compare.
Timings on a shared machine are noisy: the load average is printed beside every row.
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from benchmeta import RunMeta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def pct(xs, q):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def load():
    return "load %.1f %.1f %.1f" % os.getloadavg()


def export_samples(d, state_dtype="fp32"):
    from mq_deploy.cli.main import main

    vim = os.path.join(d, "vim.onnx")
    lm = os.path.join(d, "lm_step.onnx" if state_dtype == "fp32" else f"lm_step_{state_dtype}", "lm_step.onnx")
    os.makedirs(os.path.dirname(lm), exist_ok=True)
    jobs = (("vim-fashion-mnist", "vim-q", vim, []),
            ("mamba-byte-lm", "lm-q", lm, ["--decode-step", "--state-dtype", state_dtype]))
    for sample, q, out, extra in jobs:
        if os.path.isfile(out):
            continue
        assert main(["quantize", os.path.join(ROOT, "samples", sample), "-o", os.path.join(d, q), "--overwrite"]) == 0
        assert main(["export", os.path.join(d, q), "-o", out, *extra]) == 0
    return vim, lm


def vim_images(vim_onnx, n):
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.data.images import load_idx_split, to_tensor

    meta = OrtRunner(vim_onnx, custom_op_library=False).meta["mq.config"]
    images, _ = load_idx_split(os.path.join(ROOT, "samples", "vim-fashion-mnist", "data"), "test")
    return to_tensor(images[:n], meta["image_mean"], meta["image_std"]).numpy()


def bench_vim(url, x, concurrency, requests):
    import tritonclient.grpc as grpcclient

    per = max(1, requests // concurrency)
    lat = []
    lock = threading.Lock()

    def worker(c):
        client = grpcclient.InferenceServerClient(url)
        inp = grpcclient.InferInput("images", [1, *x.shape[1:]], "FP32")
        mine = []
        try:
            for k in range(per):
                inp.set_data_from_numpy(x[(c * per + k) % len(x)][None])
                t = time.perf_counter()
                client.infer("vim", [inp], client_timeout=60)
                mine.append(time.perf_counter() - t)
        finally:
            client.close()
        with lock:
            lat.extend(mine)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - t0
    return {"images_per_s": len(lat) / wall, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
            "requests": len(lat)}


def direct_vim(vim_onnx, x, requests, lib, threads=None):
    from mq_deploy.backends.ort.runner import OrtRunner

    r = OrtRunner(vim_onnx, custom_op_library=lib or False, threads=threads)
    for k in range(8):
        r.infer({"images": x[k][None]})
    lat = []
    t0 = time.perf_counter()
    for k in range(requests):
        t = time.perf_counter()
        r.infer({"images": x[k % len(x)][None]})
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    return {"images_per_s": requests / wall, "p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3}


PROMPTS = [b"And God said", b"In the beginning", b"And the LORD spake", b"Blessed are", b"Now the serpent",
           b"And it came to pass", b"The LORD is my", b"For God so loved"]


def step_stats(url, model):
    """Triton's cumulative statistics of a model: requests, executions, queue and compute ns."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    try:
        st = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    ns = st.get("inference_stats", {})
    return {"requests": int(st.get("inference_count", 0)), "executions": int(st.get("execution_count", 0)),
            "queue_ns": int(ns.get("queue", {}).get("ns", 0)),
            "compute_ns": sum(int(ns.get(k, {}).get("ns", 0)) for k in ("compute_input", "compute_infer",
                                                                         "compute_output"))}


def generate_stats(metrics_url, model):
    """An inline generate model's steps and step-graph calls so far (server.generate_counters), in step_stats'
    keys: requests = steps, executions = calls (no queue or compute times: it has no step model)."""
    from mq_deploy.serve.server import generate_counters

    steps, calls = generate_counters(metrics_url, model)
    return {"requests": steps, "executions": calls}


def cpu_seconds(server_pid):
    """CPU seconds (user + system) so far of tritonserver, of its Python-backend stubs (one per model instance,
    labelled by model) and of this client process: where a token's time goes."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or server_pid is None:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        if int(pid) == server_pid:
            out["tritonserver"] = out.get("tritonserver", 0.0) + cpu
        elif int(fields[1]) == server_pid and b"stub" in os.path.basename(cmd[0]) and len(cmd) > 1:
            parts = cmd[1].decode(errors="replace").split(os.sep)
            label = "stub " + (parts[-3] if len(parts) >= 3 else "?")
            out[label] = out.get(label, 0.0) + cpu
    t = os.times()
    out["client (this bench)"] = t.user + t.system
    return out


def bench_lm(url, concurrency, streams_per_client, tokens, server_pid=None, metrics_url=None):
    """metrics_url: the server's metrics endpoint, for an inline generate model's batch (else the step model's)."""
    import tritonclient.grpc as grpcclient

    gaps, firsts, counts, responses = [], [], [], []
    lock = threading.Lock()
    stats = (lambda: generate_stats(metrics_url, "lm_step_generate")) if metrics_url else \
        (lambda: step_stats(url, "lm_step"))
    before = stats()
    cpu0 = cpu_seconds(server_pid)

    ready = threading.Barrier(concurrency)
    clock = [None]

    def worker(c):
        client = grpcclient.InferenceServerClient(url)
        q = queue.Queue()
        # one gRPC stream per client, its generations one after the other on it (as perf_analyzer's streaming
        # mode does); every client's channel and stream is open before the clock starts: the clients share
        # these cores with the server, and 64 channels opened at once are the client's cost, not a first token's
        client.start_stream(callback=lambda result, error: q.put((time.perf_counter(), result, error)))
        try:
            ready.wait(60)
            if c == 0:
                clock[0] = time.perf_counter()
            for s in range(streams_per_client):
                t = grpcclient.InferInput("text", [1], "BYTES")
                t.set_data_from_numpy(np.array([PROMPTS[(c + s) % len(PROMPTS)]], object))
                n = grpcclient.InferInput("max_new_tokens", [1], "INT32")
                n.set_data_from_numpy(np.array([tokens], np.int32))
                t0 = time.perf_counter()
                client.async_stream_infer("lm_step_generate", [t, n], request_id=str(s),
                                          enable_empty_final_response=True)
                stamps, made = [], 0
                for _ in range(tokens + 1):         # each response holds one token or more, then the final one
                    when, result, error = q.get(timeout=120)
                    if error is not None:
                        raise error
                    if result.get_response().id != str(s):
                        raise RuntimeError(f"a response of request {result.get_response().id} during request {s}")
                    if result.get_response().parameters["triton_final_response"].bool_param:
                        break
                    stamps.append(when)
                    made += len(result.as_numpy("token_id"))
                with lock:
                    firsts.append(stamps[0] - t0)
                    gaps.extend(np.diff(stamps).tolist())
                    counts.append(made)
                    responses.append(len(stamps))
        finally:
            client.stop_stream()
            client.close()

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, range(concurrency)))
    wall = time.perf_counter() - clock[0]
    time.sleep(0.6 if metrics_url else 0)     # the generate model sends its counts at most every 0.5 s
    after = stats()
    cpu1 = cpu_seconds(server_pid)
    d = {k: after[k] - before[k] for k in after}
    ex = max(d["executions"], 1)
    ntok = max(sum(counts), 1)
    cpu = {k: (cpu1[k] - cpu0.get(k, 0.0)) / ntok * 1e3 for k in cpu1}
    return {"tokens_per_s": sum(counts) / wall, "inter_response_p50_ms": pct(gaps, 50) * 1e3,
            "inter_response_p99_ms": pct(gaps, 99) * 1e3, "first_token_p50_ms": pct(firsts, 50) * 1e3,
            "first_token_p99_ms": pct(firsts, 99) * 1e3, "streams": len(counts), "tokens": sum(counts),
            "tokens_per_response": sum(counts) / max(sum(responses), 1),
            # Triton's queue and compute times are summed over requests: per request, a request's wait for
            # the execution in progress and the time of the execution it ran in (IPC to the stub included)
            "step_model": {"requests": d["requests"], "executions": d["executions"],
                           "mean_batch": d["requests"] / ex,
                           **({} if metrics_url else {
                               "queue_us_per_request": d["queue_ns"] / max(d["requests"], 1) / 1e3,
                               "compute_us_per_request": d["compute_ns"] / max(d["requests"], 1) / 1e3})},
            "cpu_ms_per_token": cpu, "wall_ms_per_token": wall / ntok * 1e3}


def direct_lm(step_onnx, streams, tokens, lib, threads=None):
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate, generate_batch

    r = OrtRunner(step_onnx, custom_op_library=lib or False, threads=threads)
    for p in PROMPTS:               # warm: ONNX Runtime plans each new input shape (prompt length) once
        generate(r, list(p), 2)
    firsts = []
    for p in PROMPTS * 2:           # prefill + first token, as a served stream's first response
        t = time.perf_counter()
        generate(r, list(p), 1)
        firsts.append(time.perf_counter() - t)
    t0 = time.perf_counter()
    for s in range(streams):
        generate(r, list(PROMPTS[s % len(PROMPTS)]), tokens)
    wall = time.perf_counter() - t0
    batch = [list(PROMPTS[s % len(PROMPTS)]) for s in range(16)]
    generate_batch(r, batch, 2)
    t1 = time.perf_counter()
    generate_batch(r, batch, tokens)
    batch_wall = time.perf_counter() - t1
    return {"tokens_per_s": streams * tokens / wall, "first_token_p50_ms": pct(firsts, 50) * 1e3,
            "first_token_p99_ms": pct(firsts, 99) * 1e3, "batch16_tokens_per_s": 16 * tokens / batch_wall}


def goals(lm, direct):
    """Issue 23's goals from the LM rows: (name, value, target, met)."""
    by = {r["concurrency"]: r for r in lm}
    out = []
    if 1 in by and 16 in by:
        v = by[16]["tokens_per_s"] / by[1]["tokens_per_s"]
        # no server's 16 streams outrun 16 prompts decoded as one batch in-process, on the same cores
        out.append({"goal": "tokens/s c=16 / c=1", "value": v, "target": ">= 5", "met": v >= 5,
                    "note": f"5x c=1 is {5 * by[1]['tokens_per_s']:.0f} tokens/s; in-process, 16 prompts as one "
                            f"batch ran {direct['batch16_tokens_per_s']:.0f} tokens/s and one prompt "
                            f"{direct['tokens_per_s']:.0f}"})
        v = by[16]["first_token_p99_ms"] / by[1]["first_token_p99_ms"]
        out.append({"goal": "first-token p99 c=16 / c=1", "value": v, "target": "<= 4", "met": v <= 4})
    if 1 in by:
        v = by[1]["tokens_per_s"] / direct["tokens_per_s"]
        out.append({"goal": "tokens/s c=1 / in-process", "value": v, "target": ">= 0.5", "met": v >= 0.5})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vim", help="Vim ONNX export (default: quantize + export samples/vim-fashion-mnist)")
    ap.add_argument("--lm-step", help="LM decode-step ONNX export (default: from samples/mamba-byte-lm)")
    ap.add_argument("--requests", type=int, default=256, help="Vim requests per concurrency level")
    ap.add_argument("--streams", type=int, default=2, help="generation streams per client per level (at least 128 "
                    "streams per level in all, for the percentiles)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    ap.add_argument("--instances", type=int, default=1, help="instances of each model (one step-model instance "
                    "batches every sequence)")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--state-dtype", default="fp32", choices=("fp32", "fp16", "int8"),
                    help="how the LM step graph stores its states (export --state-dtype; default fp32)")
    ap.add_argument("--generate-step", default="inline", choices=("inline", "bls"),
                    help="how lm_step_generate runs its steps (mq-deploy triton --generate-step; default inline)")
    ap.add_argument("--response-interval-us", type=int, help="mq-deploy triton --response-interval-us (default: "
                    "its default)")
    ap.add_argument("--max-tokens-per-response", type=int, help="mq-deploy triton --max-tokens-per-response "
                    "(default: its default)")
    ap.add_argument("--response-streams", type=int, help="mq-deploy triton --response-streams (default: its default)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads, served (mq-deploy triton --threads) "
                    "and in-process alike (default: ONNX Runtime's own, one per core)")
    ap.add_argument("--no-native", action="store_true", help="scans as ONNX function bodies on both sides")
    ap.add_argument("--workdir", help="keep the sample exports here and reuse them on the next run")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    meta = RunMeta()

    from mq_deploy.serve.repository import TritonConfig, write_repository
    from mq_deploy.serve.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="mq-bench-serve-") as d:
        vim, lm = args.vim, args.lm_step
        if vim and os.path.basename(vim) != "vim.onnx" or lm and os.path.basename(lm) != "lm_step.onnx":
            for src, dst in ((vim, "vim.onnx"), (lm, "lm_step.onnx")):
                if src:
                    os.symlink(os.path.abspath(src), os.path.join(d, dst))
            vim, lm = vim and os.path.join(d, "vim.onnx"), lm and os.path.join(d, "lm_step.onnx")
        if not (vim and lm):
            t = time.perf_counter()
            ev, el = export_samples(args.workdir or d, args.state_dtype)
            vim, lm = vim or ev, lm or el
            print(f"quantized + exported the samples in {time.perf_counter() - t:.0f} s")
        repo = os.path.join(d, "repo")
        # Both sides run the scans the same way: the native mq::SelectiveScan library when pip install built
        # it (OrtRunner's default, registered by the served models through --custom-op-lib), else the
        # function bodies.
        from mq_deploy.ops.native import ort_library

        lib = None if args.no_native else ort_library()
        print(f"scans: {'native library ' + lib if lib else 'ONNX function bodies'}")
        # names from the file names: vim (+ vim_preprocess, vim_image) and lm_step (+ lm_step_generate)
        top = max(levels)
        stream_flags = {k: getattr(args, k) for k in ("response_interval_us", "max_tokens_per_response",
                                                      "response_streams", "threads")
                        if getattr(args, k) is not None}
        cfg = TritonConfig(backend="python", max_batch=max(16, top), instances=args.instances, custom_op_lib=lib,
                           max_sequences=max(64, top), generate_step=args.generate_step, **stream_flags)
        write_repository([vim, lm], repo, cfg)
        x = vim_images(vim, 512)
        from mq_deploy.backends.ort.runner import OrtRunner

        state_dtype = OrtRunner(lm, custom_op_library=lib).artifact.config.state_dtype     # what the file stores
        # getattr: the same script measures an older tree (its bench/ folder), whose TritonConfig lacks some fields
        rows = {"vim": [], "lm": [], "machine": {"cpus": os.cpu_count()}, "state_dtype": state_dtype,
                "generate_step": args.generate_step, "response_interval_us": getattr(cfg, "response_interval_us", None),
                "max_tokens_per_response": getattr(cfg, "max_tokens_per_response", None),
                "response_streams": getattr(cfg, "response_streams", None),
                "threads": getattr(cfg, "threads", None),
                "native_library": lib and (os.path.relpath(lib, ROOT) if lib.startswith(ROOT + os.sep) else lib)}
        print(f"direct (in-process OrtRunner, one caller)  [{load()}]")
        dv = direct_vim(vim, x, min(args.requests, 128), lib, args.threads)
        dl = direct_lm(lm, 16, args.tokens, lib, args.threads)
        print(f"  vim {dv['images_per_s']:8.1f} images/s  p50 {dv['p50_ms']:.2f} ms  p99 {dv['p99_ms']:.2f} ms")
        print(f"  lm  {dl['tokens_per_s']:8.1f} tokens/s  first token p50 {dl['first_token_p50_ms']:.2f} ms  "
              f"p99 {dl['first_token_p99_ms']:.2f} ms;  16 prompts as one batch (generate_batch) "
              f"{dl['batch16_tokens_per_s']:.1f} tokens/s")
        rows["direct"] = {"vim": dv, "lm": dl}
        from mq_deploy.serve.server import free_port

        inline = args.generate_step == "inline"
        with TritonServer(repo, log_path=os.path.join(d, "server.log"),
                          metrics_port=free_port("127.0.0.1") if inline else None) as srv:
            murl = f"127.0.0.1:{srv.metrics_port}" if inline else None
            bench_vim(srv.grpc_url, x, 4, 16)                   # warm
            for c in levels:
                r = bench_vim(srv.grpc_url, x, c, args.requests)
                r.update(concurrency=c, vs_direct=r["images_per_s"] / dv["images_per_s"], load=os.getloadavg())
                rows["vim"].append(r)
                print(f"served vim  c={c:<3} {r['images_per_s']:8.1f} images/s ({r['vs_direct']:.2f}x direct)  "
                      f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  [{load()}]", flush=True)
            bench_lm(srv.grpc_url, len(PROMPTS), 1, 2)      # warm every prompt length, as on the direct side
            for c in levels:                                # ... and the batch sizes each level makes
                bench_lm(srv.grpc_url, c, 1, 4)
            for c in levels:
                r = bench_lm(srv.grpc_url, c, max(args.streams, -(-128 // c)), args.tokens, srv.proc.pid, murl)
                r.update(concurrency=c, vs_direct=r["tokens_per_s"] / dl["tokens_per_s"], load=os.getloadavg())
                rows["lm"].append(r)
                sm = r["step_model"]
                print(f"served lm   c={c:<3} {r['tokens_per_s']:8.1f} tokens/s ({r['vs_direct']:.2f}x direct)  "
                      f"between responses p50 {r['inter_response_p50_ms']:6.2f} ms  p99 {r['inter_response_p99_ms']:7.2f} "
                      f"ms ({r['tokens_per_response']:.1f} tokens each)  "
                      f"first token p50 {r['first_token_p50_ms']:7.2f} ms  p99 {r['first_token_p99_ms']:7.2f} ms  "
                      f"mean batch {sm['mean_batch']:.1f}" + ("" if inline else
                      f" (step model), per request queue {sm['queue_us_per_request']:.0f} us, "
                      f"compute {sm['compute_us_per_request']:.0f} us") + f"  [{load()}]", flush=True)
                print("            CPU ms per token: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                                 sorted(r["cpu_ms_per_token"].items())) +
                      f" (wall {r['wall_ms_per_token']:.2f} ms per token on {os.cpu_count()} cores)")
        rows["goals"] = goals(rows["lm"], dl)
        for g in rows["goals"]:
            print(f"goal {g['goal']:28s} {g['value']:6.2f}  (target {g['target']}): "
                  f"{'met' if g['met'] else 'MISSED'}")
    if args.json:
        from mq_deploy.fileio import write_json

        write_json(args.json, {**rows, "run": meta.finish()}, overwrite=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
