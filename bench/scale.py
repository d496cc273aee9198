"""Real-size shapes through the whole pipeline: mamba-130m / 790m / 2.8b, FalconMamba-7B and Mamba2-8B
(random init written by transformers' own save_pretrained, sharded; bf16 from 1.4b up, with a BPE
tokenizer.json beside it). Shapes: SHAPES below; tiny and mamba2-tiny are smoke runs.

Stages, each the real command line in its own process (wall time and that process's peak RSS):
  make      transformers builds the model and save_pretrained writes it (sharded)
  info      mq-deploy info DIR
  quantize  mq-deploy quantize DIR --recipe mambaquant (>= 8 calibration windows of 512 tokens)
  export    mq-deploy export QDIR -o model.onnx (external data past 2 GB)
  verify    mq-deploy verify model.onnx --reference QDIR (2 windows of 512 tokens)
  build     mq-deploy build model.onnx --backend onnxruntime

    python bench/scale.py --shapes 130m,790m --workdir /tmp/mq-scale --json scale.json
    python bench/scale.py --shapes 790m --stream on,off --json out.json   # streamed and whole-model quantize

Timings are on a shared 2-core machine: noisy; the load average is printed beside every row.
Goals (issue 9): quantize peak RSS <= fp32 model size + 3 GiB; export <= fp32 size + int8 size + 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

from benchmeta import RunMeta

SHAPES = {   # the state-spaces/mamba-*-hf configs (vocab 50280, d_state 16, d_conv 4, expand 2); tiny: a smoke run
    "tiny": dict(hidden_size=64, num_hidden_layers=2),
    "130m": dict(hidden_size=768, num_hidden_layers=24),
    "370m": dict(hidden_size=1024, num_hidden_layers=48),
    "790m": dict(hidden_size=1536, num_hidden_layers=48),
    "1.4b": dict(hidden_size=2048, num_hidden_layers=48),
    "2.8b": dict(hidden_size=2560, num_hidden_layers=64),
    # FalconMamba-7B's published shape (d_inner 8192, dt rank 256, vocab 65024), written by FalconMambaForCausalLM
    "falcon-mamba-7b": dict(hidden_size=4096, num_hidden_layers=64, vocab_size=65024, time_step_rank=256,
                            arch="falcon_mamba"),
    # its width with 2 of its 64 layers, in minutes instead of hours: what a 7B block and the 7B's embedding and
    # head hold in each stage, from the statistics pass to the build
    "falcon-mamba-7b-2l": dict(hidden_size=4096, num_hidden_layers=2, vocab_size=65024, time_step_rank=256,
                               arch="falcon_mamba"),
    # Mamba2-8B's published shape (NVIDIA's mamba2-8b-3t-4k, Quamba2's headline model): d_state 128, head_dim 64
    # (128 heads), 8 groups, vocab 256000, untied head; written by Mamba2ForCausalLM. mamba2-tiny: a smoke run
    "mamba2-8b": dict(hidden_size=4096, num_hidden_layers=56, vocab_size=256000, arch="mamba2"),
    # its width with 2 of its 56 layers (as falcon-mamba-7b-2l): an 8B block and the 8B's embedding and head
    "mamba2-8b-2l": dict(hidden_size=4096, num_hidden_layers=2, vocab_size=256000, arch="mamba2"),
    "mamba2-tiny": dict(hidden_size=256, num_hidden_layers=2, vocab_size=4096, arch="mamba2"),
}
HALF = {"2.8b": "bfloat16", "1.4b": "bfloat16", "falcon-mamba-7b": "bfloat16", "falcon-mamba-7b-2l": "bfloat16",
        "mamba2-8b": "bfloat16", "mamba2-8b-2l": "bfloat16"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)     # this checkout's mq_deploy, as the stages (run with cwd REPO) use
KJV = os.path.join(REPO, "samples", "mamba-byte-lm", "data")
from mq_deploy.verify.verify import VERDICTS  # noqa: E402  (exit codes of `mq-deploy verify`)

# runs one stage in a fresh interpreter and reports its own peak RSS (ru_maxrss, KiB on Linux)
_CHILD = r"""
import json, resource, sys, time
t0 = time.time()
kind = sys.argv[1]
rc = 0
if kind == "cli":
    from mq_deploy.cli.main import main
    rc = main(sys.argv[2:])
else:
    import runpy
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
print("@@STAGE " + json.dumps({"rc": rc, "seconds": time.time() - t0,
                                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
sys.exit(rc or 0)
"""

_MAKE = r"""
import os, sys, torch, transformers
out, hidden, layers, dtype, shard = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
arch, vocab, dt_rank = sys.argv[6], int(sys.argv[7]), sys.argv[8]
# initializer_range 0.005 with the GPT-2 residual rescale: random weights in the ordered regime, where a
# perturbation of float-rounding size stays that size. transformers' default (0.1, no rescale) makes a deep
# random model chaotic under int8 (bench/qdq_drift.py), and then no export could pass verify.
kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=16, expand=2, conv_kernel=4,
          eos_token_id=0, pad_token_id=0, bos_token_id=0, initializer_range=0.005, rescale_prenorm_residual=True,
          time_step_rank="auto" if dt_rank == "auto" else int(dt_rank))
if arch == "mamba2":     # d_state 128, heads of 64 channels, 8 groups (fewer where there are fewer heads)
    heads = 2 * hidden // 64
    kw.update(state_size=128, head_dim=64, num_heads=heads, n_groups=min(8, heads), chunk_size=256,
              tie_word_embeddings=False)
    cfg, cls = transformers.Mamba2Config(**kw), transformers.Mamba2ForCausalLM
elif arch == "falcon_mamba":
    cfg, cls = transformers.FalconMambaConfig(**kw), transformers.FalconMambaForCausalLM
else:
    cfg, cls = transformers.MambaConfig(**kw), transformers.MambaForCausalLM
torch.manual_seed(0)
dt = getattr(torch, dtype)
torch.set_default_dtype(dt)      # build and initialise directly in the stored dtype: one copy in memory
m = cls(cfg).eval()
m.save_pretrained(out, max_shard_size=shard)
"""


def _free_gib():
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) for line in f}
    return info["MemAvailable"] / 2**20


def _parameters(folder):
    """Parameter count from the safetensors headers (nothing loaded)."""
    import math

    from safetensors import safe_open

    n = 0
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), framework="pt") as st:
                n += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return n


def run_stage(name, argv, kind="cli", log=None):
    cmd = [sys.executable, "-c", _CHILD, kind, *argv]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    res = {"stage": name, "rc": p.returncode, "seconds": time.time() - t0, "peak_rss_gib": None,
           "load": round(os.getloadavg()[0], 2), "argv": [a for a in argv if not os.path.isabs(a)]}
    for line in p.stdout.splitlines():
        if line.startswith("@@STAGE "):
            res.update({k: v for k, v in json.loads(line[8:]).items() if k == "peak_rss_gib"})
    out_lines = [ln for ln in (p.stdout + p.stderr).splitlines() if not ln.startswith("@@STAGE ")]
    res["tail"] = out_lines[-6:]
    if log:
        with open(log, "a") as f:
            f.write(f"$ {' '.join(argv)}\n" + "\n".join(out_lines) + "\n\n")
    return res


def _wait_while_paused(workdir):
    """`touch WORKDIR/PAUSE` holds the run between stages (to measure something else on an idle machine);
    removing it resumes. Stage timings never include the pause."""
    flag = os.path.join(workdir, "PAUSE")
    if os.path.exists(flag):
        print(f"paused ({flag} exists)", flush=True)
        while os.path.exists(flag):
            time.sleep(5)


def train_tokenizer(path, vocab_size=4000):
    from mq_deploy.data.tokenizer import train_byte_level_bpe

    with open(os.path.join(KJV, "calib.txt"), encoding="utf-8") as f:
        train_byte_level_bpe(path, [f.read()], vocab_size)


def bench_shape(shape, workdir, calib_windows, keep, log, stages_wanted=None, streams=("auto",), resume=False,
                saved=lambda info: None):
    """streams: quantize's --stream modes, each a stage of its own on the same model (the first's checkpoint is
    what export reads; export and verify take the first mode too). resume: a quantize whose OUT.partial folder
    an interrupted run left continues from its last finished block (quantize --resume; the row says so).
    saved(info) is called before each stage (the row then holds the stage as running, with its start time: a
    run killed mid-stage leaves that on record) and after it."""
    d = os.path.join(workdir, shape)
    if stages_wanted is None or "make" in stages_wanted:   # a fresh folder; later stages reuse a kept one
        if os.path.exists(d):
            shutil.rmtree(d)
        os.makedirs(d)
    model, q, onnx_path = os.path.join(d, "hf"), os.path.join(d, "q"), os.path.join(d, "model.onnx")
    hidden, layers = SHAPES[shape]["hidden_size"], SHAPES[shape]["num_hidden_layers"]
    dtype = HALF.get(shape, "float32")
    info = {"shape": shape, "d_model": hidden, "n_layer": layers, "stored_dtype": dtype,
            "free_gib_at_start": round(_free_gib(), 1), "stages": []}
    script = os.path.join(d, "make.py")
    with open(script, "w") as f:
        f.write(_MAKE)
    sh = SHAPES[shape]
    stages = [
        ("make", ["python", script, model, str(hidden), str(layers), dtype, "2GB", sh.get("arch", "mamba"),
                  str(sh.get("vocab_size", 50280)), str(sh.get("time_step_rank", "auto"))], "script"),
        ("info", ["info", model], "cli")]
    for k, mode in enumerate(streams):
        stages.append((f"quantize --stream {mode}", ["quantize", model, "-o", q if k == 0 else f"{q}-{mode}",
                                                     "--recipe", "mambaquant", "--calib", os.path.join(KJV, "calib.txt"),
                                                     "--calib-samples", str(calib_windows), "--stream", mode], "cli"))
    info["streams"] = list(streams)
    stages += [
        ("export", ["export", q, "-o", onnx_path, "--stream", streams[0]], "cli"),
        ("verify", ["verify", onnx_path, "--reference", q, "--data", os.path.join(KJV, "eval.txt"),
                    "--limit", "2", "--seq-len", "512", "--batch", "1", "--stream", streams[0]], "cli"),
        ("build", ["build", onnx_path, "--backend", "onnxruntime", "--optShapes", "input_ids:1x64"], "cli"),
    ]
    for name, argv, kind in stages:
        if stages_wanted and name.split()[0] not in stages_wanted:
            continue
        _wait_while_paused(workdir)
        if name == "info" and not os.path.exists(os.path.join(model, "tokenizer.json")):
            train_tokenizer(os.path.join(model, "tokenizer.json"))   # beside the weights, as in the hub folders
        resumed = resume and name.startswith("quantize") and os.path.isdir(argv[argv.index("-o") + 1] + ".partial")
        if resumed:
            argv = argv + ["--resume"]
        started = time.time()
        saved(dict(info, stages=info["stages"] + [{"stage": name, "rc": None, "running": True, "started": started}]))
        r = run_stage(name, argv[1:] if kind == "script" else argv, kind, log)
        r["started"] = started
        if resumed:
            r["resumed"] = True
        if name == "make":
            r["files"] = sorted(os.listdir(model)) if os.path.isdir(model) else []
        if "parameters" not in info and os.path.isdir(model):     # (also when make ran in an earlier run)
            info["parameters"] = _parameters(model)
            info["fp32_gib"] = info["parameters"] * 4 / 2**30
        if name == "export" and os.path.exists(onnx_path):
            r["onnx_gib"] = os.path.getsize(onnx_path) / 2**30
            data = onnx_path + ".data"
            r["external_data_gib"] = os.path.getsize(data) / 2**30 if os.path.exists(data) else 0.0
        info["stages"].append(r)
        saved(info)
        print(f"{shape:5s} {name:22s} rc {r['rc']}  {r['seconds']:8.1f} s  peak RSS "
              f"{(r['peak_rss_gib'] or 0):6.2f} GiB  load {r['load']}  " + (r["tail"][-1][:110] if r["tail"] else ""),
              flush=True)
        if r["rc"] not in set(VERDICTS.values()):   # verify's verdicts (1: a check failed; 3: within the noise
            # floor) are measurements too: the pipeline goes on
            print("\n".join(r["tail"]), flush=True)
            break
    if not keep:
        shutil.rmtree(d, ignore_errors=True)
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="130m")
    ap.add_argument("--workdir", default="/tmp/mq-scale")
    ap.add_argument("--calib-windows", type=int, default=8, help="calibration windows of 512 tokens (>= 8)")
    ap.add_argument("--keep", action="store_true", help="keep the model folders and artifacts")
    ap.add_argument("--stages", help="only these stages (comma-separated; make must come first on a fresh workdir)")
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--resume", action="store_true",
                    help="a quantize stage whose OUT.partial an interrupted run left resumes from its last finished "
                         "block (quantize --resume); its row says resumed")
    ap.add_argument("--stream", default="auto",
                    help="quantize's --stream modes, comma-separated, each its own stage on the same model in this run "
                         "(e.g. on,off: the layer-streamed and the whole-model quantize side by side); export and "
                         "verify take the first")
    args = ap.parse_args()
    meta = RunMeta()
    os.makedirs(args.workdir, exist_ok=True)
    log = os.path.join(args.workdir, "scale.log")
    rows = []

    def saved(info):       # the JSON so far, after every stage and before each (a killed run leaves its record)
        if args.json:
            from mq_deploy.fileio import write_json

            write_json(args.json, {"rows": rows + [info], "nproc": os.cpu_count(),
                                   "run": {**meta.info, "partial": True}}, overwrite=True)

    for shape in args.shapes.split(","):
        rows.append(bench_shape(shape, args.workdir, args.calib_windows, args.keep, log,
                                args.stages.split(",") if args.stages else None, tuple(args.stream.split(",")),
                                args.resume, saved))
    if args.json:
        from mq_deploy.fileio import write_json

        write_json(args.json, {"rows": rows, "nproc": os.cpu_count(), "run": meta.finish()}, overwrite=True)
    print(f"\n{'shape':6s} {'stage':9s} {'rc':>3s} {'wall s':>9s} {'peak RSS GiB':>13s}  (fp32 model GiB)")
    for info in rows:
        for r in info["stages"]:
            print(f"{info['shape']:6s} {r['stage']:22s} {r['rc']:3d} {r['seconds']:9.1f} "
                  f"{(r['peak_rss_gib'] or 0):13.2f}  ({info.get('fp32_gib', 0):.2f})")


if __name__ == "__main__":
    main()
