"""Wall time and peak RSS of `mq-deploy quantize --recipe mambaquant` on a 130m-size model.

    python bench/quantize.py [--layers 24 --d-model 768 --calib-samples 32 --seq-len 512] [--json OUT]

A random-init Mamba1 LM of the mamba-130m shape (d_model 768, 24 layers, vocab 50280) is written to a
temporary directory with a byte-level BPE tokenizer (4000 tokens, trained here with `tokenizers` on the
LM sample's calibration text, since byte values are never used as token ids of a non-byte LM);
calibration uses 32 windows of 512 tokens of that text. `quantize` runs as a child process so its peak RSS is its own.
Goal on this 2-core machine: <= 5 minutes, <= 6 GB.
"""

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

from benchmeta import RunMeta, write

HERE = os.path.dirname(os.path.abspath(__file__))
CALIB = os.path.join(HERE, "..", "samples", "mamba-byte-lm", "data", "calib.txt")


def _train_tokenizer(path, vocab_size):
    from mq_deploy.data.tokenizer import train_byte_level_bpe

    with open(CALIB, encoding="utf-8") as f:
        train_byte_level_bpe(path, [f.read()], vocab_size)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--recipe", default="mambaquant")
    ap.add_argument("--json", metavar="OUT", help="write the figures and the run's load here")
    args = ap.parse_args()
    meta = RunMeta()

    from mq_deploy.config import MambaLMConfig
    from mq_deploy.models.io import save_model
    from mq_deploy.models.mamba import MambaLM

    with tempfile.TemporaryDirectory() as d:
        model = MambaLM(MambaLMConfig(d_model=args.d_model, n_layer=args.layers, vocab_size=args.vocab))
        model.reset_parameters(seed=0)
        save_model(model, os.path.join(d, "m"))
        del model
        tok = os.path.join(d, "tokenizer.json")
        if args.vocab != 256:
            _train_tokenizer(tok, min(4000, args.vocab))
        cmd = [sys.executable, "-m", "mq_deploy", "quantize", os.path.join(d, "m"), "--recipe", args.recipe,
               "--calib", CALIB, "--calib-samples", str(args.calib_samples), "-o", os.path.join(d, "q")]
        if args.vocab != 256:      # byte-level LMs take bytes; any other vocabulary its tokenizer
            cmd[-2:-2] = ["--tokenizer", tok]
        load_at_start = os.getloadavg()[0]
        t = time.perf_counter()
        subprocess.run(cmd, check=True)   # as a user runs it: no allocator tuning
        wall = time.perf_counter() - t
        rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20   # KiB -> GiB
    print(f"quantize --recipe {args.recipe}: d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, "
          f"{args.calib_samples} x {args.seq_len} calibration tokens")
    print(f"  wall {wall:.1f} s (goal <= 300 s: {wall / 300:.2f} of it), peak RSS {rss_gb:.2f} GiB "
          f"(goal <= 6 GB: {rss_gb * 2**30 / 6e9:.2f} of it)")
    if args.json:
        write(args.json, {"recipe": args.recipe, "d_model": args.d_model, "n_layer": args.layers, "vocab": args.vocab,
                          "calib_samples": args.calib_samples, "seq_len": args.seq_len, "wall_s": wall,
                          "peak_rss_gib": rss_gb, "load_at_start": load_at_start,
                          "goals": {"wall_s": 300, "peak_rss_bytes": 6e9}}, meta)


if __name__ == "__main__":
    main()
