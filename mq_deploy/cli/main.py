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


def cmd_export(args) -> int:
    from mq_deploy.export.exporter import export

    info = export(args.model, args.output, step=args.decode_step, opset=args.opset, overwrite=args.overwrite)
    ops = ", ".join(f"{k} {v}" for k, v in sorted(info["op_counts"].items(), key=lambda kv: -kv[1])[:8])
    print(f"wrote {info['path']}: {info['graph']} graph of the {info['architecture']} "
          f"({info['quant'] or 'float32'}), {info['nodes']} nodes, {info['bytes'] / 1e6:.2f} MB; {ops}")
    if args.json:
        _write_json_atomic(args.json, info)
    return 0


def cmd_verify(args) -> int:
    from mq_deploy.quant.qcheckpoint import load
    from mq_deploy.runtime.runners import TorchRunner, open_runner
    from mq_deploy.verify.verify import VerifyConfig, format_report, verify

    cfg = VerifyConfig(data=args.data, limit=args.limit, seq_len=args.seq_len, batch=args.batch, atol=args.atol,
                       rtol=args.rtol, check_error_stat=args.check_error_stat, min_cosine=args.min_cosine,
                       min_top1_agreement=args.min_top1_agreement, max_metric_delta=args.max_metric_delta)
    artifact = open_runner(args.artifact, custom_op_library=args.custom_op_lib, plugins=args.plugins or (),
                           threads=args.threads)
    reference = TorchRunner(load(args.reference))
    rep = verify(artifact, reference, cfg)
    print(format_report(rep, args.artifact, args.reference))
    if args.json:
        _write_json_atomic(args.json, {"outputs": rep["outputs"], "metrics": rep["metrics"], "checks": rep["checks"],
                                       "passed": rep["passed"]})
    return 0 if rep["passed"] else 1


def cmd_generate(args) -> int:
    from mq_deploy.runtime.apps import generate
    from mq_deploy.runtime.runners import OrtRunner

    runner = OrtRunner(args.model, custom_op_library=args.custom_op_lib, threads=args.threads)
    byte_level = runner.meta.get("mq.tokenizer") == "bytes"
    if args.prompt_ids is not None:
        try:
            prompt = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise MQUserError(f"--prompt-ids must be integers, got {args.prompt_ids!r}") from None
    elif args.prompt is not None:
        if not byte_level:
            raise MQUserError(f"{args.model}: the model's vocabulary is not bytes and no tokenizer is bundled; "
                              "pass --prompt-ids")
        prompt = list(args.prompt.encode("utf-8"))
    else:
        raise MQUserError("give --prompt TEXT or --prompt-ids IDS")
    shown = bytearray()

    def show(tok):
        if byte_level and not args.ids:
            shown.append(tok)
            try:   # print whole UTF-8 characters as they complete
                sys.stdout.write(shown.decode("utf-8"))
                shown.clear()
            except UnicodeDecodeError:
                if len(shown) >= 4:
                    sys.stdout.write(shown.decode("utf-8", errors="replace"))
                    shown.clear()
        else:
            sys.stdout.write(f"{tok} ")
        sys.stdout.flush()

    if byte_level and not args.ids and args.prompt is not None:
        sys.stdout.write(args.prompt)
    out = generate(runner, prompt, args.max_new_tokens, args.temperature, args.seed, on_token=show)
    if shown:
        sys.stdout.write(shown.decode("utf-8", errors="replace"))
    sys.stdout.write("\n")
    if args.json:
        _write_json_atomic(args.json, {"prompt_ids": prompt, "new_ids": out})
    return 0


def cmd_run(args) -> int:
    import numpy as np

    from mq_deploy.runtime.apps import classify, load_images
    from mq_deploy.runtime.runners import OrtRunner

    runner = OrtRunner(args.model, custom_op_library=args.custom_op_lib, threads=args.threads)
    cfg = runner.meta.get("mq.config")
    if runner.meta.get("mq.kind") != "vim" or cfg is None:
        raise MQUserError(f"{args.model}: `run` classifies images with an exported Vision Mamba "
                          "(for a language model use `generate`)")
    images, labels, names = load_images(args.images, cfg["in_chans"], cfg["img_size"])
    if args.limit:
        images, names = images[:args.limit], names[:args.limit]
        labels = None if labels is None else labels[:args.limit]
    logits = classify(runner, images, cfg["image_mean"], cfg["image_std"], batch=args.batch)
    pred = logits.argmax(-1)
    classes = args.class_names.split(",") if args.class_names else None
    if classes and len(classes) != logits.shape[-1]:
        raise MQUserError(f"--class-names has {len(classes)} names, the model has {logits.shape[-1]} classes")
    shown = len(pred) if args.show is None else min(args.show, len(pred))
    for name, p in list(zip(names, pred))[:shown]:
        print(f"{name}\t{p}" + (f"\t{classes[p]}" if classes else ""))
    if shown < len(pred):
        print(f"... ({len(pred) - shown} more; --show N prints more)")
    result = {"predictions": [int(p) for p in pred], "names": names}
    if labels is not None:
        acc = float((pred == np.asarray(labels)).mean())
        print(f"top-1 {acc * 100:.2f}% on {len(pred)} labelled images")
        result["top1"] = acc
    if args.json:
        _write_json_atomic(args.json, result)
    return 0


def cmd_build(args) -> int:
    from mq_deploy.build.tensorrt import parse_shapes
    from mq_deploy.runtime.runners import load_onnx

    proto = load_onnx(args.model, load_external_data=False)
    has_qdq = any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    if args.int8 and not has_qdq:
        raise MQUserError(f"{args.model}: --int8 asks for an int8 build, but the graph has no QuantizeLinear nodes "
                          "(a float32 export); quantize first: mq-deploy quantize MODEL -o QDIR && "
                          "mq-deploy export QDIR -o model.onnx")
    shapes = {k: parse_shapes(getattr(args, k)) for k in ("minShapes", "optShapes", "maxShapes")}
    stem = args.model[:-5] if args.model.endswith(".onnx") else args.model
    if args.backend == "onnxruntime":
        from mq_deploy.build.onnxruntime import build_ort

        if args.fp16:
            raise MQUserError("--fp16 is a TensorRT option; the ONNX Runtime CPU build keeps float32 outside int8")
        lib = args.plugins[0] if args.plugins else None
        rep = build_ort(args.model, args.saveEngine or stem + ".ort.onnx", custom_op_library=lib,
                        shapes=shapes["optShapes"] or None, overwrite=args.overwrite)
        v = rep["verify"]["outputs"].get("logits", {})
        print(f"wrote {rep['output']}: ONNX Runtime {rep['onnxruntime_version']} optimized model, "
              f"{rep['nodes_before']} -> {rep['nodes_after']} nodes, {rep['bytes'] / 1e6:.2f} MB, "
              f"{rep['build_seconds']:.2f} s")
        top = ", ".join(f"{k} {n}" for k, n in sorted(rep["op_counts"].items(), key=lambda kv: -kv[1])[:10])
        print(f"  ops: {top}")
        print(f"  verified against {args.model} on {rep['verify']['feeds']}: logits cosine "
              f"{v.get('cosine_mean', float('nan')):.6f}, top-1 agreement {v.get('top1_agreement', 0) * 100:.2f}%, "
              f"max abs {v.get('max_abs', float('nan')):.3g}")
    else:
        from mq_deploy.build.tensorrt import build_engine

        out = args.saveEngine or stem + ".engine"
        if os.path.exists(out) and not args.overwrite:
            raise MQUserError(f"{out}: already exists (pass --overwrite to replace it)")
        rep = build_engine(args.model, out, int8=args.int8, fp16=args.fp16, min_shapes=shapes["minShapes"] or None,
                           opt_shapes=shapes["optShapes"] or None, max_shapes=shapes["maxShapes"] or None,
                           plugins=args.plugins or (), timing_cache=args.timingCacheFile,
                           workspace=args.workspace_mib * 2 ** 20 if args.workspace_mib else None)
        print(f"wrote {rep.get('engine')}: TensorRT {rep.get('tensorrt_version')}, "
              f"{rep.get('engine_bytes', 0) / 1e6:.2f} MB, {rep.get('build_seconds', 0):.1f} s, "
              f"{len(rep.get('layers', []))} layers, {rep.get('scan_nodes')} mq::SelectiveScan plugin nodes")
        precisions: dict = {}
        for layer in rep.get("layers", []):
            precisions[layer.get("precision")] = precisions.get(layer.get("precision"), 0) + 1
        print("  layer precisions: " + ", ".join(f"{k} {v}" for k, v in precisions.items()))
    if args.json:
        _write_json_atomic(args.json, rep)
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

    s = sub.add_parser("export", help="write an ONNX file (QDQ int8/int4 + mq::SelectiveScan, or float32)")
    s.add_argument("model", help="quantized checkpoint directory (mq-deploy quantize) or a float model")
    s.add_argument("-o", "--output", required=True, metavar="MODEL.onnx")
    s.add_argument("--decode-step", action="store_true",
                   help="LM: the stateful graph (input_ids, conv_state, ssm_state -> logits, new states)")
    s.add_argument("--opset", type=int, default=21, help="ONNX opset (>= 21; default 21)")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--json", metavar="OUT", help="write the export summary as JSON")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("verify", help="run an ONNX file or TensorRT engine against the PyTorch reference")
    s.add_argument("artifact", help="model.onnx, or a TensorRT engine (.engine/.plan)")
    s.add_argument("--reference", required=True, metavar="DIR",
                   help="the checkpoint it came from (a quantized one runs with fake quantization)")
    s.add_argument("--data", metavar="PATH", help="text file (byte LM), token ids .npy [windows, length+1] (any "
                   "LM), or idx directory (Vim); default: the sample's")
    s.add_argument("--limit", type=int, metavar="N", help="LM windows (default 32) or images (default all)")
    s.add_argument("--seq-len", type=int, default=256, help="LM window length")
    s.add_argument("--batch", type=int)
    s.add_argument("--atol", type=float)
    s.add_argument("--rtol", type=float)
    s.add_argument("--check-error-stat", default="mean", choices=["max", "mean", "median"])
    s.add_argument("--min-cosine", type=float, default=0.999)
    s.add_argument("--min-top1-agreement", type=float, default=0.99)
    s.add_argument("--max-metric-delta", type=float, default=0.002, help="relative; 0.002 = 0.2%%")
    s.add_argument("--custom-op-lib", metavar="SO", help="register a native mq::SelectiveScan library in ORT")
    s.add_argument("--plugins", nargs="*", metavar="SO", help="TensorRT plugin libraries (engines)")
    s.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    s.add_argument("--json", metavar="OUT", help='write {"outputs", "metrics", "checks", "passed"}')
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("generate", help="generate text with an exported decode-step graph in ONNX Runtime")
    s.add_argument("model", metavar="MODEL_STEP.onnx")
    s.add_argument("--prompt", metavar="TEXT")
    s.add_argument("--prompt-ids", metavar="IDS", help="token ids (comma or space separated) instead of text")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--ids", action="store_true", help="print token ids instead of text")
    s.add_argument("--custom-op-lib", metavar="SO")
    s.add_argument("--threads", type=int)
    s.add_argument("--json", metavar="OUT")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("run", help="classify images with an exported Vision Mamba in ONNX Runtime")
    s.add_argument("model", metavar="MODEL.onnx")
    s.add_argument("--images", required=True, metavar="PATH",
                   help="image file, directory of images, idx file / directory (Fashion-MNIST) or .npy uint8 array")
    s.add_argument("--limit", type=int, metavar="N")
    s.add_argument("--show", type=int, default=20, metavar="N", help="print the first N predictions (default 20)")
    s.add_argument("--class-names", metavar="A,B,...")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--custom-op-lib", metavar="SO")
    s.add_argument("--threads", type=int)
    s.add_argument("--json", metavar="OUT", help='write {"predictions", "names", "top1"}')
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("build", help="build a deployable engine: TensorRT (plugin) or an ORT-optimized model")
    s.add_argument("model", metavar="MODEL.onnx")
    s.add_argument("--backend", default="tensorrt", choices=["tensorrt", "onnxruntime"])
    s.add_argument("--int8", action="store_true", help="int8 build (the graph must carry Q/DQ nodes)")
    s.add_argument("--fp16", action="store_true", help="TensorRT: fp16 outside the int8 layers, fp16 scan output")
    s.add_argument("--minShapes", metavar="SPEC", help="name:AxB[,name:...] (trtexec syntax)")
    s.add_argument("--optShapes", metavar="SPEC", help="also the shapes the onnxruntime build verifies with")
    s.add_argument("--maxShapes", metavar="SPEC")
    s.add_argument("--plugins", nargs="*", metavar="SO",
                   help="TensorRT: libmq_scan_trt.so; onnxruntime: libmq_scan_ort.so custom-op library")
    s.add_argument("--saveEngine", metavar="PATH", help="default: MODEL.engine / MODEL.ort.onnx")
    s.add_argument("--timingCacheFile", metavar="PATH")
    s.add_argument("--workspace-mib", type=int, metavar="MIB", help="TensorRT builder workspace limit")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--json", metavar="OUT", help="write the build report as JSON")
    s.set_defaults(func=cmd_build)
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
