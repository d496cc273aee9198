"""How far the exported QDQ graph (in ONNX Runtime) drifts from the fake-quantized PyTorch model it
came from, per recipe and depth, on random-init transformers Mamba models (hidden 768, vocab 4000).

    python bench/qdq_drift.py --layers 2,6,12 --recipes rtn,quarot,mambaquant [--json out.json]

Prints the logits' mean cosine and top-1 agreement (graph vs fake quant), and the same for the fake-
quantized model against itself with independent noise of 1e-6 relative added to its embeddings (how
sensitive the PyTorch side is to a perturbation of the size of float rounding). Load average beside each row: timings are noisy here.
"""

import argparse
import os
import tempfile

from benchmeta import RunMeta


def run(layers, recipe, hidden=768, vocab=4000):
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    from mq_deploy.calib.collect import text_forward_loop
    from mq_deploy.export.graph import QuantSpec, build_model
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.fakequant import QuantConfig
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe
    from mq_deploy.verify.compare import compare_outputs

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        cfg = transformers.MambaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, state_size=16)
        transformers.MambaForCausalLM(cfg).save_pretrained(d)
        lm = load_model(d).model
    ids_all = np.random.default_rng(0).integers(0, vocab, 4096 + 1)
    sc = apply_recipe(lm, text_forward_loop(ids_all, 512, 4), RecipeConfig(recipe, QuantConfig(8, 8)))
    spec = QuantSpec(8, 8, {k: float(v) for k, v in sc["act_scales"].items()}, sc["weight_scales"], recipe)
    sess = ort.InferenceSession(build_model(lm, spec).SerializeToString(), providers=["CPUExecutionProvider"])
    ids = ids_all[:256].reshape(2, 128)
    got = sess.run(None, {"input_ids": ids})[0]
    with torch.no_grad():
        want = lm(torch.from_numpy(ids)).numpy()
        w = lm.embedding.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(1)) * 1e-6 * w.abs())
        pert = lm(torch.from_numpy(ids)).numpy()
    c, p = compare_outputs(got, want), compare_outputs(pert, want)
    return {"layers": layers, "recipe": recipe, "graph_cosine": c["cosine_mean"], "graph_top1": c["top1_agreement"],
            "perturbed_cosine": p["cosine_mean"], "perturbed_top1": p["top1_agreement"],
            "load": round(os.getloadavg()[0], 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", default="2,6,12")
    ap.add_argument("--recipes", default="rtn,quarot,mambaquant")
    ap.add_argument("--json")
    args = ap.parse_args()
    meta = RunMeta()
    rows = []
    print(f"{'layers':>6s} {'recipe':12s} {'graph cos':>10s} {'top-1':>6s} {'perturbed cos':>14s} {'load':>5s}")
    for n in map(int, args.layers.split(",")):
        for r in args.recipes.split(","):
            row = run(n, r)
            rows.append(row)
            print(f"{n:6d} {r:12s} {row['graph_cosine']:10.6f} {row['graph_top1']:6.3f} {row['perturbed_cosine']:14.9f} "
                  f"{row['load']:5.1f}", flush=True)
    if args.json:
        from mq_deploy.fileio import write_json

        write_json(args.json, {"rows": rows, "run": meta.finish()}, overwrite=True)


if __name__ == "__main__":
    main()
