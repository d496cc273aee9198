"""Fidelity of decode states stored as float16 or int8 (`export --decode-step --state-dtype`), on long generations.

For each LM sample: quantize it (MambaQuant W8A8), export its decode-step graph once per state dtype, and run
each in ONNX Runtime (our native ops when built), comparing with the float32-state artifact:

- greedy agreement over 512 and 2048 generated tokens from 20 prompts of the held-out text, two ways:
  * free-running: each artifact generates from its own tokens; the fraction of positions whose token equals
    the float32-state artifact's (one early difference makes the rest of a sequence differ: it measures
    where sequences part, and `first_divergence` says when);
  * teacher-forced: fed the float32-state artifact's tokens, the fraction of positions where its greedy
    choice is the same (each position judged on the same history);
- bits/byte of held-out windows scored one token per call through the decode graph (the states rounded at
  every step, as in generation), and its change against float32 states;
- state bytes per sequence (families.zero_states).

`--variants` also measures, on the PyTorch reference (float model, 8 prompts), what the artifact's int8 rule
was chosen against: a static per-channel scale from calibration (clipped when a long generation outgrows it),
and stochastic rounding of the per-row scaled state (no gain over round-to-nearest here). Writes --json.

    python bench/state_fidelity.py --json docs/state_fidelity.json
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmeta import RunMeta, write  # noqa: E402

DTYPES = ("fp32", "fp16", "int8")
SAMPLES = ("mamba-byte-lm", "mamba2-byte-lm", "hybrid-byte-lm")


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "mq_deploy", *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"mq-deploy {' '.join(args)} failed: {(r.stderr or r.stdout).strip()[-400:]}")
    return r.stdout


def _held_out(sample):
    with open(os.path.join(ROOT, "samples", sample, "data", "eval.txt"), "rb") as f:
        return f.read()


def _prompts(text, n, length=64):
    step = (len(text) - length) // n
    return np.array([list(text[i * step:i * step + length]) for i in range(n)], np.int64)


def _windows(text, n, length):
    start = len(text) // 2          # away from the prompts' start
    step = (len(text) - start - length) // n
    return np.array([list(text[start + i * step:start + i * step + length]) for i in range(n)], np.int64)


def _generate(runner, prompts, tokens, forced=None):
    """Greedy tokens [P, tokens] from `prompts`; with `forced` [P, tokens], feed those instead of its own choice
    and return its choices (teacher forcing)."""
    dec = runner.decoder(prompts.shape[0])
    logits = dec.prefill(prompts)
    out = np.zeros((prompts.shape[0], tokens), np.int64)
    for t in range(tokens):
        out[:, t] = logits.argmax(-1)
        logits = dec.step(out[:, t] if forced is None else forced[:, t])
    return out


def _step_bits(runner, windows):
    """bits/byte of windows [W, L] scored one token per call (a 1-token prefill, then steps)."""
    dec = runner.decoder(windows.shape[0])
    logits = dec.prefill(windows[:, :1])
    nll = 0.0
    for t in range(1, windows.shape[1]):
        z = logits.astype(np.float64)
        z = z - z.max(-1, keepdims=True)
        lp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll -= lp[np.arange(len(windows)), windows[:, t]].sum()
        if t < windows.shape[1] - 1:
            logits = dec.step(windows[:, t])
    return nll / (windows.shape[0] * (windows.shape[1] - 1)) / np.log(2)


def _agreement(a, b, n):
    return float((a[:, :n] == b[:, :n]).mean())


def _first_divergence(a, b):
    out = []
    for x, y in zip(a, b):
        d = np.nonzero(x != y)[0]
        out.append(int(d[0]) if len(d) else int(len(x)))
    return out


def run_sample(sample, args, lib):
    from mq_deploy.backends.base import open_runner
    from mq_deploy.families import zero_states

    work = os.path.join(ROOT, "build", "state_fidelity", sample)
    os.makedirs(work, exist_ok=True)
    q = os.path.join(work, "w8a8")
    if not (args.reuse and os.path.isdir(q)):
        _cli("quantize", os.path.join("samples", sample), "-o", q, "--overwrite")
    text = _held_out(sample)
    prompts, windows = _prompts(text, args.prompts), _windows(text, args.windows, args.window_len)
    rows, base = {}, None
    for dtype in DTYPES:
        path = os.path.join(work, f"step_{dtype}.onnx")
        if not (args.reuse and os.path.isfile(path)):
            _cli("export", q, "-o", path, "--decode-step", "--state-dtype", dtype, "--overwrite")
        runner = open_runner(path, custom_op_library=lib, threads=args.threads)
        t0 = time.time()
        free = _generate(runner, prompts, args.tokens)
        if base is None:
            base = free
        forced = _generate(runner, prompts, args.tokens, forced=base)
        bits = _step_bits(runner, windows)
        nbytes = int(sum(a.nbytes for a in zero_states(runner.artifact.config, 1).values()))
        rows[dtype] = {"state_bytes_per_sequence": nbytes,
                       "free_agreement": {str(n): _agreement(free, base, n) for n in args.spans},
                       "forced_agreement": {str(n): _agreement(forced, base, n) for n in args.spans},
                       "first_divergence": _first_divergence(free, base),
                       "step_bits_per_byte": float(bits), "seconds": round(time.time() - t0, 1)}
        print(f"{sample} {dtype}: {nbytes} B/seq, free {rows[dtype]['free_agreement']}, forced "
              f"{rows[dtype]['forced_agreement']}, step bits/byte {bits:.4f} ({rows[dtype]['seconds']} s)", flush=True)
    ref = rows["fp32"]
    for r in rows.values():
        r["bytes_ratio_vs_fp32"] = ref["state_bytes_per_sequence"] / r["state_bytes_per_sequence"]
        r["bits_change_pct"] = 100 * (r["step_bits_per_byte"] / ref["step_bits_per_byte"] - 1)
    return {"sample": sample, "quant": "mambaquant W8A8", "prompts": args.prompts, "prompt_bytes": 64,
            "tokens": args.tokens, "windows": args.windows, "window_len": args.window_len, "dtypes": rows}


# ---- the int8 rules the artifact's was chosen against (PyTorch reference) ----------------------------

def variants(sample, args):
    """Agreement and bits/byte of int8 rules on the float PyTorch model: per-row dynamic (the artifact's, float16
    scales), the same with float32 scales (and those made 2^-10 coarser: the measures' noise band), static
    per-channel from 8 calibration windows, and per-row with stochastic rounding."""
    import torch

    from mq_deploy.models import state_codec
    from mq_deploy.models.loaders import load_model
    from mq_deploy.ops.quant import fake_quantize, scale_from_amax

    torch.set_flush_denormal(True)      # a decaying float32 state's subnormals slow every step 10-100x
    # one thread: a step's ops are tiny, and on a loaded machine a second intra-op thread that waits for its
    # core makes every op wait for it (the steps ran >10x slower that way)
    torch.set_num_threads(1)
    model = load_model(os.path.join(ROOT, "samples", sample)).model.eval()
    text = _held_out(sample)
    with open(os.path.join(ROOT, "samples", sample, "data", "calib.txt"), "rb") as f:
        calib = f.read()
    prompts = torch.from_numpy(_prompts(text, args.variant_prompts))
    windows = torch.from_numpy(_windows(text, 8, args.variant_window_len))
    amax = {}
    gen = torch.Generator().manual_seed(0)

    def rule(name):
        def enc(i, st):
            conv, ssm = st[0], st[1]
            if name == "fp32":
                return st
            if name == "static-calibrate":
                a = ssm.abs().amax(0).amax(-1)
                amax[i] = a if i not in amax else torch.maximum(amax[i], a)
                return st
            if name == "static":
                s = scale_from_amax(amax[i], 8, eps=1e-30).unsqueeze(-1)
                return (conv, fake_quantize(ssm, s, 8, full_range=True))
            if name == "rows":          # the artifact's rule (what `--state-dtype int8` stores)
                q, s = state_codec.rows_int8(ssm)
                return (conv, q.float() * s.float().unsqueeze(-1))
            if name.startswith("rows-f32"):     # the same with a float32 scale, exactly amax / 127; "-coarser":
                # times 1 + 2^-10, the most the float16 scale's rounding adds: how far a change that small moves
                # each measure (the noise band the float16 rule is judged in)
                up = 1 + 2 ** -10 if name.endswith("coarser") else 1.0
                s = (scale_from_amax(ssm.abs().amax(-1), 8, eps=1e-30) * up).unsqueeze(-1)
                return (conv, torch.clamp(torch.round(ssm / s), -128, 127) * s)
            s = scale_from_amax(ssm.abs().amax(-1), 8, eps=1e-30).unsqueeze(-1)
            v = torch.floor(ssm / s + torch.rand(ssm.shape, generator=gen))      # stochastic rounding
            return (conv, torch.clamp(v, -128, 127) * s)
        return enc

    @torch.no_grad()
    def decode(ids, forced=None, steps=0):
        st = model.init_state(ids.shape[0])
        for t in range(ids.shape[1]):
            logits, st = model.step(ids[:, t], st)
        out = []
        for t in range(steps):
            out.append(logits.argmax(-1))
            logits, st = model.step(out[-1] if forced is None else forced[:, t], st)
        return torch.stack(out, 1) if out else None

    @torch.no_grad()
    def bits(ws):
        st, nll = model.init_state(ws.shape[0]), 0.0
        for t in range(ws.shape[1] - 1):
            logits, st = model.step(ws[:, t], st)
            nll -= torch.log_softmax(logits.double(), -1).gather(1, ws[:, t + 1:t + 2]).sum().item()
        return nll / (ws.shape[0] * (ws.shape[1] - 1)) / np.log(2)

    assert model.cfg.state_dtype == "float32"
    out, base = {}, None
    # calibration for the static rule: 8 windows of the calibration text, decoded step by step
    model._encode_state = rule("static-calibrate")
    cal = torch.tensor([list(calib[k * 4000:k * 4000 + 512]) for k in range(8)])
    decode(cal)
    for name in ("fp32", "rows", "rows-f32", "rows-f32-coarser", "static", "stochastic"):
        model._encode_state = rule(name)
        free = decode(prompts, steps=args.variant_tokens).numpy()
        base = free if base is None else base
        forced = decode(prompts, forced=torch.from_numpy(base), steps=args.variant_tokens).numpy()
        out[name] = {"free_agreement": _agreement(free, base, args.variant_tokens),
                     "forced_agreement": _agreement(forced, base, args.variant_tokens),
                     "first_divergence": _first_divergence(free, base), "step_bits_per_byte": float(bits(windows))}
        print(f"variants {sample} {name}: {out[name]}", flush=True)
    del model._encode_state
    return {"sample": sample, "model": "float (PyTorch reference)", "prompts": args.variant_prompts,
            "tokens": args.variant_tokens, "windows": 8, "window_len": args.variant_window_len, "rules": out}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", default=",".join(SAMPLES))
    p.add_argument("--prompts", type=int, default=20)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--spans", default="512,2048")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window-len", type=int, default=1024)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="mamba-byte-lm,mamba2-byte-lm",
                   help="samples whose int8 rules are compared on the PyTorch reference ('' to skip)")
    p.add_argument("--variant-prompts", type=int, default=8)
    p.add_argument("--variant-tokens", type=int, default=1024)
    p.add_argument("--variant-window-len", type=int, default=512)
    p.add_argument("--reuse", action="store_true",
                   help="keep the quantized samples and exports a previous run left in build/state_fidelity")
    p.add_argument("--json", required=True)
    args = p.parse_args(argv)
    args.spans = [int(x) for x in args.spans.split(",")]
    if max(args.spans) > args.tokens:
        raise SystemExit(f"--spans {max(args.spans)} is longer than --tokens {args.tokens}")
    lib = os.path.join(ROOT, "mq_deploy", "_native", "libmq_scan_ort.so")
    lib = lib if os.path.isfile(lib) else None
    meta = RunMeta()
    results = [run_sample(s, args, lib) for s in args.samples.split(",") if s]
    rules = [variants(s, args) for s in args.variants.split(",") if s]
    write(args.json, {"samples": results, "variants": rules, "native_ops": lib is not None,
                      "command": "python bench/state_fidelity.py " + " ".join(argv or sys.argv[1:])}, meta)


if __name__ == "__main__":
    main()
