"""`mq-deploy` command line. Thin: each subcommand maps flags onto one API call.

Heavy modules (torch, safetensors) are imported inside the handlers so `mq-deploy --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from mq_deploy import __version__
from mq_deploy.errors import MQUserError


def _write_json_atomic(path: str, obj) -> None:
    path = os.path.abspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def cmd_info(args) -> int:
    from mq_deploy.models.loaders import load_model

    loaded = load_model(args.model)
    cfg = loaded.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    m = cfg.mixer
    print(f"model:        {args.model}")
    print(f"format:       {loaded.format}")
    print(f"architecture: {cfg.architecture} ({'Vision Mamba, bimamba v2' if cfg.architecture == 'vim' else 'Mamba1 causal LM'})")
    print(f"parameters:   {n_params:,}")
    print(f"layers:       {cfg.n_layer}  d_model {cfg.d_model}  d_inner {m.d_inner}  d_state {m.d_state}  "
          f"d_conv {m.d_conv}  dt_rank {m.dt_rank}")
    if cfg.architecture == "mamba_lm":
        print(f"vocab:        {cfg.vocab_size}  ({'tied' if cfg.tie_embeddings else 'untied'} head)")
    else:
        print(f"image:        {cfg.in_chans}x{cfg.img_size}x{cfg.img_size}, patch {cfg.patch_size}, stride "
              f"{cfg.stride}, {cfg.num_patches} patches + middle class token; {cfg.num_classes} classes")
    quant = (loaded.extra or {}).get("quant")
    if quant:
        print(f"quantized:    {quant['recipe']} W{quant['wbits']}A{quant['abits']} ({quant['act_granularity']} "
              f"activations; online out_proj rotation {'on' if quant['online_out_rotation'] else 'off'}, "
              f"gate smoothing {'on' if quant['gate_scale'] else 'off'})")
    if args.json:
        _write_json_atomic(args.json, {"format": loaded.format, "parameters": n_params, "config": cfg.to_dict(),
                                       "quant": quant})
    return 0


def cmd_eval(args) -> int:
    import torch

    from mq_deploy.evaluate import EvalConfig, evaluate
    from mq_deploy.quant.qcheckpoint import load

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = EvalConfig(data=args.data, limit=args.limit, split=args.split, seq_len=args.seq_len, batch=args.batch)
    loaded = load(args.model)
    res = evaluate(loaded, cfg)
    print(f"{args.model}: {res['metric']} = {res['value']:.4f} ({res['samples']} samples of {res['data']})")
    if args.json:
        _write_json_atomic(args.json, {"metric": res["metric"], "value": res["value"], "samples": res["samples"]})
    return 0


def cmd_compare(args) -> int:
    import torch

    from mq_deploy.evaluate import EvalConfig
    from mq_deploy.quant.compare import BITS, RECIPES, CalibConfig, compare, parse_list

    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = parse_list(args.recipes, RECIPES, "recipe")
    bits = parse_list(args.bits, tuple(BITS), "bit width")
    calib = CalibConfig(path=args.calib, samples=args.calib_samples, seed=args.seed)
    ev = EvalConfig(data=args.data, limit=args.limit, split=args.split)
    print(f"{'recipe':12s} {'bits':5s} {'metric':14s} {'value':>9s} {'delta vs fp':>12s}")

    def show(r):
        print(f"{r['recipe']:12s} {r['bits']:5s} {r['metric']:14s} {r['value']:9.4f} {r['delta']:+12.4f}", flush=True)
    table = compare(args.model, recipes, bits, calib, ev, progress=show, alpha=args.alpha, percentile=args.percentile)
    if args.json:
        _write_json_atomic(args.json, table)
    return 0


def cmd_quantize(args) -> int:
    import torch

    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.compare import CalibConfig, calibration_loop
    from mq_deploy.quant.fakequant import QuantConfig
    from mq_deploy.quant.qcheckpoint import save_quantized
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rcfg = RecipeConfig(args.recipe, QuantConfig(args.wbits, args.abits, args.act_granularity), alpha=args.alpha,
                        percentile=args.percentile)
    if os.path.abspath(args.output) == os.path.abspath(args.model):
        raise MQUserError("the output directory must differ from the input model")
    if os.path.exists(args.output) and not args.overwrite:
        raise MQUserError(f"{args.output}: already exists (pass --overwrite to replace it)")
    loaded = load_model(args.model)
    loop = calibration_loop(loaded, CalibConfig(path=args.calib, samples=args.calib_samples, seed=args.seed))
    scales = apply_recipe(loaded.model, loop, rcfg)
    calib_info = {"source": os.path.abspath(loop.source), "samples": loop.samples, "seed": args.seed}
    out = save_quantized(loaded.model, args.output, rcfg, scales, calib_info, loaded.extra, args.model,
                         overwrite=args.overwrite)
    print(f"wrote {out}: {args.recipe} W{args.wbits}A{args.abits}, calibrated on {loop.samples} samples of "
          f"{loop.source}")
    return 0


def cmd_inspect(args) -> int:
    import torch

    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.compare import CalibConfig, calibration_loop
    from mq_deploy.quant.inspect import inspect_model, write_report
    from mq_deploy.quant.recipes import RecipeConfig, apply_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    if os.path.exists(args.output) and not args.overwrite:
        raise MQUserError(f"{args.output}: already exists (pass --overwrite to replace it)")
    loaded = load_model(args.model)
    loop = calibration_loop(loaded, CalibConfig(path=args.calib, samples=args.calib_samples))
    title = f"{args.model}: activation channels at the matmul inputs"
    if args.recipe:
        apply_recipe(loaded.model, loop, RecipeConfig(args.recipe, alpha=args.alpha), quantize=False)
        title += f" after the {args.recipe} transforms"
    result = inspect_model(loaded.model, loop, alpha=args.alpha)
    out = write_report(result, args.output, title, overwrite=args.overwrite)
    print(f"wrote {out}: {len(result['channels'])} plots and summary.md")
    points = {}
    for r in result["rows"]:
        points.setdefault(r["point"], {})[r["view"]] = r
    print(f"{'point':28s} {'view':14s} {'kurtosis':>9s} {'max/med max':>12s} {'max/med var':>12s}")
    for name, per_view in points.items():
        for view, r in per_view.items():
            print(f"{name:28s} {view:14s} {r['kurtosis']:9.2f} {r['max_median_channel_max']:12.2f} "
                  f"{r['max_median_channel_var']:12.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mq-deploy", description="Quantize and deploy Mamba models (MambaQuant PTQ).")
    p.add_argument("--version", action="version", version=f"mq-deploy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="describe a model checkpoint (format, architecture, size)")
    s.add_argument("model", help="checkpoint directory (mq-deploy, HF transformers, mamba-ssm) or Vim .pth")
    s.add_argument("--json", metavar="OUT", help="also write the description as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", help="end metric: bits per byte (LM) or top-1 (Vim)")
    s.add_argument("model")
    s.add_argument("--data", metavar="PATH", help="text file (LM) or Fashion-MNIST idx directory (Vim); "
                   "default: the data shipped with a sample model")
    s.add_argument("--split", default="test", choices=["test", "train", "calib"], help="Vim idx split")
    s.add_argument("--limit", type=int, metavar="N", help="at most N windows (LM) or images (Vim)")
    s.add_argument("--seq-len", type=int, default=1024, help="LM window length in bytes")
    s.add_argument("--batch", type=int)
    s.add_argument("--threads", type=int, help="torch CPU threads")
    s.add_argument("--json", metavar="OUT", help='write {"metric", "value", "samples"}')
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("quantize", help="transform + quantize a model, write a quantized checkpoint directory")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    s.add_argument("--recipe", default="mambaquant", choices=["fp", "rtn", "smoothquant", "quarot", "mambaquant"])
    s.add_argument("--wbits", type=int, default=8, choices=[4, 8])
    s.add_argument("--abits", type=int, default=8, choices=[8, 16])
    s.add_argument("--act-granularity", default="per_tensor", choices=["per_tensor", "per_token"])
    s.add_argument("--alpha", type=float, default=0.5, help="smoothing migration strength")
    s.add_argument("--percentile", type=float, default=99.99, help="mambaquant observer percentile")
    s.add_argument("--calib", metavar="PATH", help="calibration text file / idx directory (default: the sample's)")
    s.add_argument("--calib-samples", type=int, metavar="N")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("inspect", help="per-channel max/variance plots: raw, Hadamard, KLT·H, smoothing+rotation")
    s.add_argument("model")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.add_argument("--recipe", choices=["rtn", "smoothquant", "quarot", "mambaquant"],
                   help="inspect after this recipe's transforms (default: the model as loaded)")
    s.add_argument("--alpha", type=float, default=0.5)
    s.add_argument("--calib", metavar="PATH")
    s.add_argument("--calib-samples", type=int, metavar="N")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("compare", help="table of the end metric per PTQ recipe and bit width (fake quantization)")
    s.add_argument("model")
    s.add_argument("--recipes", default="fp,rtn,smoothquant,quarot,mambaquant")
    s.add_argument("--bits", default="w8a8,w4a8")
    s.add_argument("--alpha", type=float, default=0.5, help="smoothing migration strength")
    s.add_argument("--percentile", type=float, default=99.99,
                   help="mambaquant observer percentile on heavy-tailed points (100 = min-max)")
    s.add_argument("--calib", metavar="PATH", help="calibration text file / idx directory (default: the sample's)")
    s.add_argument("--calib-samples", type=int, metavar="N")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--data", metavar="PATH")
    s.add_argument("--split", default="test", choices=["test", "train", "calib"])
    s.add_argument("--limit", type=int, metavar="N")
    s.add_argument("--threads", type=int)
    s.add_argument("--json", metavar="OUT", help='write {"rows": [{"recipe", "bits", "metric", "value", "delta"}]}')
    s.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except MQUserError as e:
        print(f"mq-deploy {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
