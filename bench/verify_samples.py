"""`mq-deploy verify` on the shipped samples: each case quantized, exported and verified by the real commands.

    python bench/verify_samples.py --json docs/verify_samples.json [--workdir DIR] [--cases NAME,...]

Cases (MambaQuant, default observers; verify with its defaults, so ONNX Runtime uses the native scan library
that `pip install` builds, as a user's run does):
  vim-w8a8, vim-w4a8          full graph, the first 2000 Fashion-MNIST test images
  lm-w8a8, lm-w4a8            full graph, 100 held-out windows of 256 bytes
  lm-w8a8-step                the decode-step graph, 20 windows (the reference runs them step by step)
  lm-w4a8-gptq                --weight-rounding gptq, verify's default data (32 windows)
  *-nbits, *-nbits-a16        the W4 cases exported for ONNX Runtime (--int4-format matmulnbits: int8
                              activations; matmulnbits-a16: float), from the same quantized folder
(--limit scales them all, e.g. --scale 5 for the whole Vim test set and 500 LM windows.)
Each command runs in its own process; the JSON keeps verify's own report per case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmeta import ROOT, RunMeta, write

LM, VIM = os.path.join(ROOT, "samples", "mamba-byte-lm"), os.path.join(ROOT, "samples", "vim-fashion-mnist")
CASES = {   # name: (sample, quantize flags, export flags, verify flags)
    "vim-w8a8": (VIM, ["--wbits", "8"], [], 2000),
    "vim-w4a8": (VIM, ["--wbits", "4"], [], 2000),
    "lm-w8a8": (LM, ["--wbits", "8"], [], 100),
    "lm-w4a8": (LM, ["--wbits", "4"], [], 100),
    "lm-w8a8-step": (LM, ["--wbits", "8"], ["--decode-step"], 20),
    "lm-w4a8-gptq": (LM, ["--wbits", "4", "--weight-rounding", "gptq"], [], None),
}
for _name in ("vim-w4a8", "lm-w4a8", "lm-w4a8-gptq"):
    _sample, _q, _e, _limit = CASES[_name]
    for _fmt, _tag in (("matmulnbits", "nbits"), ("matmulnbits-a16", "nbits-a16")):
        CASES[f"{_name}-{_tag}"] = (_sample, _q, ["--int4-format", _fmt], _limit)


def cli(*args, ok=(0,)):
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "mq_deploy", *args], capture_output=True, text=True, cwd=ROOT)
    if p.returncode not in ok:
        raise SystemExit(f"mq-deploy {' '.join(args)}: exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t, p.returncode


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT")
    ap.add_argument("--workdir", help="keep the checkpoints and ONNX files here")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every case's --limit")
    a = ap.parse_args(argv)
    meta = RunMeta()
    work = a.workdir or tempfile.mkdtemp(prefix="mq-bench-verify-")
    os.makedirs(work, exist_ok=True)
    rows, qdirs = [], {}
    for name in a.cases.split(","):
        sample, qflags, eflags, limit = CASES[name]
        vflags = ["--limit", str(int(limit * a.scale))] if limit else []
        # one quantized folder per sample and quantize flags (named after the first case that needs it)
        q = qdirs.setdefault((sample, tuple(qflags)), os.path.join(work, name.replace("-step", "") + "-q"))
        onnx = os.path.join(work, name + ".onnx")
        rep = os.path.join(work, name + ".verify.json")
        load_at_start = round(os.getloadavg()[0], 2)
        secs = {}
        if not os.path.isdir(q):
            secs["quantize"], _ = cli("quantize", sample, "-o", q, "--recipe", "mambaquant", *qflags)
        secs["export"], _ = cli("export", q, "-o", onnx, "--overwrite", *eflags)
        # verify exits 1 when a check fails, 3 when it fails within the noise floor: the report still counts
        secs["verify"], rc = cli("verify", onnx, "--reference", q, "--json", rep, "--overwrite", *vflags,
                                 ok=(0, 1, 3))
        with open(rep) as f:
            report = json.load(f)
        rows.append({"case": name, "quantize": qflags, "export": eflags, "verify": vflags, "rc": rc,
                     "seconds": secs, "load_at_start": load_at_start, "report": report})
        m = report["metrics"]
        print(f"{name:14s} rc {rc}  {m['metric']} artifact {m['artifact']:.4f} reference {m['reference']:.4f}  "
              f"cosine {report['outputs']['logits']['cosine_mean']:.6f}  load {load_at_start}", flush=True)
    if a.json:
        write(a.json, {"rows": rows}, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
