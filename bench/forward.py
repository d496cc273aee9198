"""CPU forward latency: our Mamba1 vs HF transformers' MambaForCausalLM, same weights, side by side.

    python bench/forward.py [--layers 24 --d-model 768 --seq-len 256 --batch 1 --repeats 3] [--json OUT]

Default is the mamba-130m shape (d_model 768, 24 layers, vocab 50280). The HF model is random-init,
saved with save_pretrained and loaded by our loader, so both run the same weights; the script prints
how far their logits agree. (At this random-init depth float32 itself is the limit: both
implementations sit ~7e-4 from a float64 run of ours, and ~2e-4 from each other.) Runs alternate (ours, theirs, ours, ...) so drift hits both.
"""

import argparse
import statistics
import tempfile
import time

import torch
from benchmeta import RunMeta, write


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=50280)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", metavar="OUT", help="write the figures and the run's load here")
    args = ap.parse_args()
    meta = RunMeta()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from mq_deploy.models.loaders import load_model

    torch.manual_seed(0)
    hf = transformers.MambaForCausalLM(transformers.MambaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, num_hidden_layers=args.layers)).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        ours = load_model(d).model
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len))

    def run(m):
        with torch.inference_mode():
            t = time.perf_counter()
            out = m(ids)
            return time.perf_counter() - t, getattr(out, "logits", out)

    _, a = run(ours)
    _, b = run(hf)
    err = ((a - b).abs().max() / b.abs().max()).item()
    times = {"ours": [], "transformers": []}
    for _ in range(args.repeats):
        times["ours"].append(run(ours)[0])
        times["transformers"].append(run(hf)[0])
    med = {k: statistics.median(v) for k, v in times.items()}
    tok = args.batch * args.seq_len
    print(f"Mamba1 d_model {args.d_model}, {args.layers} layers, vocab {args.vocab}, batch {args.batch}, "
          f"L {args.seq_len}, torch threads {torch.get_num_threads()}; logits rel err {err:.1e}")
    for k in ("ours", "transformers"):
        print(f"  {k:13s} median {med[k] * 1e3:8.1f} ms  ({tok / med[k]:8.0f} tok/s)  runs: "
              + ", ".join(f"{t * 1e3:.0f}" for t in times[k]))
    print(f"speed-up ours vs transformers: {med['transformers'] / med['ours']:.2f}x")
    if args.json:
        write(args.json, {"d_model": args.d_model, "n_layer": args.layers, "vocab": args.vocab, "batch": args.batch,
                          "seq_len": args.seq_len, "threads": torch.get_num_threads(), "logits_rel_err": err,
                          "median_ms": {k: v * 1e3 for k, v in med.items()},
                          "runs_ms": {k: [t * 1e3 for t in v] for k, v in times.items()},
                          "speedup": med["transformers"] / med["ours"]}, meta)


if __name__ == "__main__":
    main()
