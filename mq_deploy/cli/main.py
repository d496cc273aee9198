"""`mq-deploy` command line. Thin: each subcommand maps flags onto one library call, which does every
check (outputs, inputs, values); argument groups are shared between subcommands (STYLE.md 11).

Heavy modules (torch, onnxruntime) are imported inside the handlers so `mq-deploy --help` stays fast.
Every file a command writes goes through mq_deploy.fileio; `--json` and `-o` are checked before the
work starts, so a bad path never costs a long run, and never names an input.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from mq_deploy import __version__
from mq_deploy.config import EXPORT_ABITS, EXPORT_WBITS
from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import KV_CACHE


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line (and exit 2) like every other error of ours."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _LazyChoices:
    """choices= that come from a library registry, imported only when argparse checks a value or
    prints this subcommand's help (so `mq-deploy --help` imports no torch)."""

    def __init__(self, load):
        self._load, self._items = load, None

    def _get(self):
        if self._items is None:
            self._items = tuple(self._load())
        return self._items

    def __contains__(self, x):
        return x in self._get()

    def __iter__(self):
        return iter(self._get())

    def __len__(self):
        return len(self._get())

    def __getitem__(self, i):
        return self._get()[i]


def _recipe_names():
    from mq_deploy.quant.recipes import recipe_names  # the registry (torch-free)

    return list(recipe_names())


# ---- value types (argparse calls them; their errors become one line) -------------------------------

def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def finite_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return v


def nonneg_float(text: str) -> float:
    v = finite_float(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def int_range(lo: int, hi=None):
    """argparse type: an integer in [lo, hi]; hi may be a callable (a bound another module owns, imported
    only when the flag is given)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        top = hi() if callable(hi) else hi
        if v < lo or (top is not None and v > top):
            raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {top}, got {v}" if top is not None
                                             else f"must be an integer >= {lo}, got {v}")
        return v
    return parse


def threads_int(text: str) -> int:
    """--threads: 1 .. backends.base.max_threads() (a few per CPU; more only slows ORT and torch down)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    from mq_deploy.backends.base import check_threads

    try:
        return check_threads(v, "it")
    except MQUserError as e:
        raise argparse.ArgumentTypeError(str(e).replace("it must", "must", 1)) from None


def _max_seed():
    from mq_deploy.runtime.apps import MAX_SEED

    return MAX_SEED


def _max_new_tokens():
    from mq_deploy.runtime.apps import MAX_NEW_TOKENS

    return MAX_NEW_TOKENS


seed_int = int_range(0, _max_seed)


# ---- shared argument groups ------------------------------------------------------------------------

def add_output(s, metavar="OUT", required=True, help=None):
    g = s.add_argument_group("output")
    g.add_argument("-o", "--output", required=required, metavar=metavar, help=help)
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing output, only if mq-deploy wrote it")
    return g


def add_json(s, what="", g=None):
    g = g or s.add_argument_group("output")
    g.add_argument("--json", metavar="OUT", help=f"also write {what or 'the result'} as JSON")
    if not any(a.dest == "overwrite" for a in s._actions):
        g.add_argument("--overwrite", action="store_true", help="replace an existing JSON file mq-deploy wrote")


def add_tokenizer(s, g=None):
    """--tokenizer (LM text): once per subcommand, in the first group that reads text."""
    if any(a.dest == "tokenizer" for a in s._actions):
        return
    (g or s).add_argument("--tokenizer", metavar="FILE_OR_DIR",
                          help="LM: tokenizer.json (or its folder) of the model; default: the one beside the "
                               "weights / in the artifact; byte-level LMs (vocab 256) need none")


def add_calib(s, seq_len_flag: bool = True):
    """seq_len_flag: the calibration window is also `--seq-len` (commands without evaluation windows)."""
    g = s.add_argument_group("calibration")
    g.add_argument("--calib", metavar="PATH", help="calibration text file (LM), idx directory or image folder "
                   "(Vim); default: the sample's")
    g.add_argument("--calib-samples", type=positive_int, metavar="N",
                   help="LM: windows (default 32); Vim: images (default 256)")
    names = ("--calib-seq-len", "--seq-len") if seq_len_flag else ("--calib-seq-len",)
    g.add_argument(*names, dest="calib_seq_len", type=positive_int, default=512, metavar="N",
                   help="LM: calibration window length in tokens (default 512)")
    g.add_argument("--seed", type=seed_int, default=0)
    add_tokenizer(s, g)


def add_eval_data(s, seq_len=1024, limit_help="at most N windows (LM) or images (Vim)"):
    g = s.add_argument_group("evaluation data")
    g.add_argument("--data", metavar="PATH", help="text file (LM), or a Fashion-MNIST idx directory or an image "
                   "folder (ImageFolder layout or flat, JPEG/PNG) (Vim); default: the data shipped with a sample model")
    g.add_argument("--limit", type=positive_int, metavar="N", help=limit_help)
    g.add_argument("--seq-len", type=positive_int, default=seq_len, help="LM window length in tokens")
    g.add_argument("--batch", type=positive_int)
    add_tokenizer(s, g)
    return g


def add_runtime(s, ort=True):
    g = s.add_argument_group("runtime")
    g.add_argument("--threads", type=threads_int, help="CPU threads (torch / ONNX Runtime intra-op; at most 4 per CPU)")
    if ort:
        g.add_argument("--custom-op-lib", metavar="SO", help="register a native mq::SelectiveScan library in ORT")
        g.add_argument("--no-native", action="store_true",
                       help="ORT: run the mq ops' function bodies, not the native custom-op library that "
                            "pip install builds (used by default when present)")


def _points_help() -> str:
    from mq_deploy.families import families

    return "; ".join(f"{f.name}: {'|'.join(f.points)}" for f in families())


def add_recipe(s, quantize=True):
    from_lib = "fake quantization; `quantize`/`export` take what the int8 scan runs"
    g = s.add_argument_group("recipe")
    if quantize:
        g.add_argument("--recipe", default="mambaquant", choices=_LazyChoices(_recipe_names))
        g.add_argument("--wbits", type=int, default=8, choices=EXPORT_WBITS)
        g.add_argument("--abits", type=int, default=8, choices=EXPORT_ABITS,
                       help=f"8 (the artifact's int8 activations; lower bits: `compare --bits`, {from_lib})")
        g.add_argument("--act-granularity", default="per_tensor", choices=["per_tensor", "per_token"])
        g.add_argument("--ssm-scales", default="per_tensor", choices=["per_tensor", "grouped"],
                       help="the scan inputs' static scales: one per tensor, or one per group of channels where the "
                            "family has groups (Mamba2: x and dt per head, B and C per SSD group, as Quamba2)")
        g.add_argument("--kv-cache", default="fp32", choices=KV_CACHE,
                       help="attention layers' KV caches: float32, or int8 with a static scale per key/value head "
                            "(calibrated; the step graph's caches are then int8 tensors, a quarter of the memory)")
    g.add_argument("--alpha", type=finite_float, default=0.5, help="smoothing migration strength")
    g.add_argument("--percentile", type=finite_float, default=None,
                   help="the P of a `percentile` observer given without one (100 = min-max; default 99.9999, "
                        "MambaQuant's)")
    g.add_argument("--observer", metavar="SPEC", default=None,
                   help="activation observers: KIND[,POINT=KIND...] with KIND minmax|percentile[:P]|mse|mse-out|"
                        f"entropy and POINT a quant point of the model's family ({_points_help()}; +_b: Vim backward) "
                        "or heavy (each family's heavy-tailed points); default: the recipe's (mambaquant: "
                        "minmax,heavy=percentile)")
    g.add_argument("--weight-rounding", default="rtn", choices=["rtn", "gptq"],
                   help="rtn, or GPTQ on the same per-channel grid (after the rotations; Hessians from calibration)")
    g.add_argument("--klt-source", default="last", choices=["last", "sum"],
                   help="mambaquant's residual KLT: from the last layer's in_proj input (default, the authors'), "
                        "or every layer's summed")
    return g


# ---- helpers ---------------------------------------------------------------------------------------

def _set_threads(args):
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _json_target(args, inputs):
    """Check --json before the work (never an input, its folder must exist, no silent overwrite)."""
    if getattr(args, "json", None):
        from mq_deploy import fileio

        fileio.check_target(args.json, args.overwrite, [i for i in inputs if i], "JSON report")


def _write_json(args, obj, inputs):
    if getattr(args, "json", None):
        from mq_deploy import fileio

        fileio.write_json(args.json, obj, overwrite=args.overwrite, inputs=[i for i in inputs if i],
                          what="JSON report")


def _recipe_cfg(args, recipe=None, wbits=8, abits=8, granularity="per_tensor", ssm_scales="per_tensor",
                kv_cache="fp32"):
    from mq_deploy.quant.fakequant import QuantConfig
    from mq_deploy.quant.recipes import RecipeConfig

    kw = {"alpha": args.alpha, "observer": args.observer, "weight_rounding": args.weight_rounding,
          "klt_source": args.klt_source}
    if args.percentile is not None:
        kw["percentile"] = args.percentile
    return RecipeConfig(recipe or args.recipe, QuantConfig(wbits, abits, granularity, ssm_scales, kv_cache), **kw)


# ---- commands --------------------------------------------------------------------------------------

def cmd_info(args) -> int:
    from mq_deploy.models.loaders import load_model, streams

    _json_target(args, [args.model])
    # a large LM: names, shapes and dtypes checked, nothing read (its values are checked as a stage reads them)
    loaded = load_model(args.model, lazy=streams(args.model, "auto"))
    cfg = loaded.config
    n_params = sum(p.numel() for p in loaded.model.parameters())
    from mq_deploy.families import family_of

    kinds = {}                          # distinct block configs in layer order -> their layers
    for i, m in enumerate(cfg.layer_configs()):
        kinds.setdefault(id(m), (m, []))[1].append(i)
    names = sorted({family_of(m).name for m, _ in kinds.values()})
    print(f"model:        {args.model}")
    print(f"format:       {loaded.format}")
    kind = ("Vision Mamba, bimamba v2" if cfg.architecture == "vim" else
            f"{names[0]} causal LM" if len(names) == 1 else f"hybrid causal LM: {', '.join(names)}")
    print(f"architecture: {cfg.architecture} ({kind})")
    print(f"parameters:   {n_params:,}")
    if len(kinds) == 1:
        (m, _), = kinds.values()
        print(f"layers:       {cfg.n_layer}  d_model {cfg.d_model}  {family_of(m).describe(m)}")
    else:
        print(f"layers:       {cfg.n_layer}  d_model {cfg.d_model}")
        for m, idx in kinds.values():
            print(f"  {len(idx):3d} x {family_of(m).describe(m)}  (layers {', '.join(map(str, idx))})")
    if cfg.architecture == "mamba_lm":
        print(f"vocab:        {cfg.vocab_size}  ({'tied' if cfg.tie_embeddings else 'untied'} head)")
    else:
        print(f"image:        {cfg.in_chans}x{cfg.img_size}x{cfg.img_size}, patch {cfg.patch_size}, stride "
              f"{cfg.stride}, {cfg.num_patches} patches + middle class token; {cfg.num_classes} classes")
    quant = (loaded.extra or {}).get("quant")
    if quant:
        extra = f", gate smoothing {'on' if quant['gate_scale'] else 'off'}" if "gate_scale" in quant else ""
        extra += f", scan input scales {quant['ssm_scales']}" if "ssm_scales" in quant else ""
        extra += f", KV cache {quant['kv_cache']}" if "kv_cache" in quant else ""
        print(f"quantized:    {quant['recipe']} W{quant['wbits']}A{quant['abits']} ({quant['act_granularity']} "
              f"activations; online out_proj rotation {'on' if quant['online_out_rotation'] else 'off'}{extra})")
    _write_json(args, {"format": loaded.format, "parameters": n_params, "config": cfg.to_dict(), "quant": quant},
                [args.model])
    return 0


def cmd_eval(args) -> int:
    from mq_deploy.evaluate import EvalConfig, evaluate
    from mq_deploy.quant.qcheckpoint import load

    inputs = [args.model, args.data, args.tokenizer]
    _json_target(args, inputs)
    _set_threads(args)
    cfg = EvalConfig(data=args.data, limit=args.limit, split=args.split, seq_len=args.seq_len, batch=args.batch,
                     tokenizer=args.tokenizer)
    res = evaluate(load(args.model), cfg)
    ppl = f", perplexity {res['perplexity']:.3f} per token over {res['bytes']} bytes" if "perplexity" in res else ""
    print(f"{args.model}: {res['metric']} = {res['value']:.4f} ({res['samples']} samples of {res['data']}{ppl})")
    _write_json(args, {k: res[k] for k in ("metric", "value", "samples", "perplexity", "bytes")
                       if k in res}, inputs)
    return 0


def cmd_compare(args) -> int:
    from mq_deploy.evaluate import EvalConfig
    from mq_deploy.quant.compare import BITS, RECIPES, CalibConfig, compare, parse_list

    inputs = [args.model, args.data, args.calib, args.tokenizer]
    _json_target(args, inputs)
    _set_threads(args)
    recipes = parse_list(args.recipes, RECIPES, "recipe")
    bits = parse_list(args.bits, tuple(BITS), "bit width")
    calib = CalibConfig(path=args.calib, samples=args.calib_samples, seed=args.seed, tokenizer=args.tokenizer,
                        seq_len=args.calib_seq_len)
    ev = EvalConfig(data=args.data, limit=args.limit, split=args.split, seq_len=args.seq_len, batch=args.batch,
                    tokenizer=args.tokenizer)
    print(f"{'recipe':19s} {'bits':5s} {'metric':14s} {'value':>9s} {'delta vs fp':>12s} {'95% interval':>20s}")

    def show(r):
        lo, hi = r["delta_ci95"]
        print(f"{r['recipe']:19s} {r['bits']:5s} {r['metric']:14s} {r['value']:9.4f} {r['delta']:+12.4f} "
              f"[{lo:+.4f}, {hi:+.4f}]", flush=True)
    kw = {"alpha": args.alpha, "observer": args.observer, "weight_rounding": args.weight_rounding,
          "klt_source": args.klt_source}
    if args.percentile is not None:
        kw["percentile"] = args.percentile
    modes = parse_list(args.ssm_scales, ("per_tensor", "grouped"), "scale granularity")
    kv = parse_list(args.kv_cache, KV_CACHE, "KV cache storage")
    table = compare(args.model, recipes, bits, calib, ev, progress=show, ssm_scales=modes, kv_cache=kv, **kw)
    for p in table["pairs"]:
        lo, hi = p["diff_ci95"]
        print(f"{p['a']} - {p['b']} at {p['bits']}: {p['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]")
    _write_json(args, table, inputs)
    return 0


def _progress():
    """progress(done, total, what) printing one line to stderr per step: the count, the rate and an ETA."""
    import time

    start = {}

    def show(done, total, what):
        t = time.monotonic()
        t0 = start.setdefault(what, (t, done))
        rate = (t - t0[0]) / (done - t0[1]) if done > t0[1] else None
        eta = f", about {rate * (total - done) / 60:.1f} min left" if rate is not None and done < total else ""
        print(f"  {what}: {done}/{total}{f', {rate:.1f} s each' if rate else ''}{eta}", file=sys.stderr, flush=True)
    return show


def cmd_quantize(args) -> int:
    from mq_deploy.quant.compare import CalibConfig
    from mq_deploy.quant.qcheckpoint import quantize_to_dir

    _set_threads(args)
    rcfg = _recipe_cfg(args, wbits=args.wbits, abits=args.abits, granularity=args.act_granularity,
                       ssm_scales=args.ssm_scales, kv_cache=args.kv_cache)
    res = quantize_to_dir(args.model, args.output, rcfg,
                          CalibConfig(path=args.calib, samples=args.calib_samples, seed=args.seed,
                                      tokenizer=args.tokenizer, seq_len=args.calib_seq_len),
                          overwrite=args.overwrite, seed=args.seed, stream=args.stream, progress=_progress(),
                          resume=args.resume)
    resumed = res["resumed_after_layers"]
    print(f"wrote {res['path']}: {res['recipe']} W{res['wbits']}A{res['abits']}, calibrated on "
          f"{res['calibration']['samples']} samples of {res['calibration']['source']}"
          + (f" (resumed after {resumed} finished layers)" if resumed is not None else ""))
    return 0


def cmd_inspect(args) -> int:
    from mq_deploy.quant.inspect import inspect_to_dir

    _set_threads(args)
    res = inspect_to_dir(args.model, args.output, recipe=args.recipe, alpha=args.alpha, calib=args.calib,
                         calib_samples=args.calib_samples, overwrite=args.overwrite, tokenizer=args.tokenizer,
                         calib_seq_len=args.calib_seq_len)
    print(f"wrote {res['path']}: {len(res['channels'])} plots and summary.md")
    points = {}
    for r in res["rows"]:
        points.setdefault(r["point"], {})[r["view"]] = r
    print(f"{'point':28s} {'view':14s} {'kurtosis':>9s} {'max/med max':>12s} {'max/med var':>12s}")
    for name, per_view in points.items():
        for view, r in per_view.items():
            print(f"{name:28s} {view:14s} {r['kurtosis']:9.2f} {r['max_median_channel_max']:12.2f} "
                  f"{r['max_median_channel_var']:12.2f}")
    return 0


def _ort_lib(args):
    """--custom-op-lib, or False (no library at all) with --no-native."""
    return False if getattr(args, "no_native", False) else args.custom_op_lib


STATE_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "int8": "int8"}    # --state-dtype -> config.STATE_DTYPES


def cmd_export(args) -> int:
    from mq_deploy.export.exporter import export

    _json_target(args, [args.model, args.output])
    info = export(args.model, args.output, step=args.decode_step, opset=args.opset, overwrite=args.overwrite,
                  tokenizer=args.tokenizer, quantize_head=args.quantize_head, int4_format=args.int4_format,
                  head_bits=args.head_bits, state_dtype=STATE_DTYPE_NAMES[args.state_dtype], stream=args.stream)
    ops = ", ".join(f"{k} {v}" for k, v in sorted(info["op_counts"].items(), key=lambda kv: -kv[1])[:8])
    print(f"wrote {info['path']}: {info['graph']} graph of the {info['architecture']} "
          f"({info['quant'] or 'float32'}), {info['nodes']} nodes, {info['bytes'] / 1e6:.2f} MB; {ops}")
    _write_json(args, info, [args.model, args.output])
    return 0


def cmd_verify(args) -> int:
    from mq_deploy.verify.verify import VERDICTS, VerifyConfig, format_report, verify_paths

    inputs = [args.artifact, args.reference, args.data, args.tokenizer]
    _json_target(args, inputs)
    _set_threads(args)
    cfg = VerifyConfig(data=args.data, limit=args.limit, seq_len=args.seq_len, batch=args.batch, atol=args.atol,
                       rtol=args.rtol, check_error_stat=args.check_error_stat, min_cosine=args.min_cosine,
                       min_top1_agreement=args.min_top1_agreement, max_metric_delta=args.max_metric_delta,
                       tokenizer=args.tokenizer)
    rep = verify_paths(args.artifact, args.reference, cfg, custom_op_library=_ort_lib(args),
                       plugins=args.plugins or (), threads=args.threads, stream=args.stream)
    print(format_report(rep, args.artifact, args.reference))
    _write_json(args, {k: rep[k] for k in ("outputs", "metrics", "checks", "passed", "verdict", "noise_floor")},
                inputs)
    return VERDICTS[rep["verdict"]]


def cmd_generate(args) -> int:
    from mq_deploy.backends.ort.runner import OrtRunner
    from mq_deploy.runtime.apps import generate_text, generate_texts, read_prompts

    _json_target(args, [args.model, args.tokenizer, args.prompts_file])
    prompt_ids = None
    if args.prompt_ids is not None:
        try:
            prompt_ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise MQUserError(f"--prompt-ids must be integers, got {args.prompt_ids!r}") from None
    prompts = read_prompts(args.prompts_file) if args.prompts_file else args.prompt
    runner = OrtRunner(args.model, custom_op_library=_ort_lib(args), threads=args.threads)
    if prompts is not None and (len(prompts) > 1 or args.prompts_file):
        results = generate_texts(runner, prompts=prompts, max_new_tokens=args.max_new_tokens,
                                 temperature=args.temperature, seed=args.seed, tokenizer=args.tokenizer)
        for p, r in zip(prompts, results):
            print(" ".join(str(t) for t in r["new_ids"]) if args.ids or r["text"] is None else p + r["text"])
        _write_json(args, {"results": [{k: v for k, v in r.items() if not (k == "text" and v is None)}
                                       for r in results]}, [args.model, args.tokenizer, args.prompts_file])
        return 0
    prompt = prompts[0] if prompts else None

    def write(piece):
        sys.stdout.write(piece)
        sys.stdout.flush()

    res = generate_text(runner, prompt=prompt if prompt_ids is None else None, prompt_ids=prompt_ids,
                        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                        tokenizer=args.tokenizer, write=write, echo_prompt=not args.ids, write_ids=args.ids)
    if res["text"] is None and not args.ids:   # no tokenizer and prompt ids: print the ids
        write(" ".join(str(t) for t in res["new_ids"]))
    sys.stdout.write("\n")
    _write_json(args, {k: res[k] for k in ("prompt_ids", "new_ids", "text", "stopped_at_eos")
                       if k in res and not (k == "text" and res[k] is None)}, [args.model, args.tokenizer])
    return 0


def cmd_run(args) -> int:
    from mq_deploy.runtime.apps import classify_path

    _json_target(args, [args.model, args.images])
    res = classify_path(args.model, args.images, limit=args.limit, batch=args.batch, custom_op_library=_ort_lib(args),
                        threads=args.threads, class_names=args.class_names.split(",") if args.class_names else None)
    pred, names, classes = res["predictions"], res["names"], res.get("classes")
    shown = len(pred) if args.show is None else min(args.show, len(pred))
    for name, p in list(zip(names, pred))[:shown]:
        print(f"{name}\t{p}" + (f"\t{classes[p]}" if classes else ""))
    if shown < len(pred):
        print(f"... ({len(pred) - shown} more; --show N prints more)")
    if "top1" in res:
        print(f"top-1 {res['top1'] * 100:.2f}% on {len(pred)} labelled images")
    _write_json(args, {k: res[k] for k in ("predictions", "names", "top1") if k in res}, [args.model, args.images])
    return 0


def cmd_build(args) -> int:
    stem = args.model[:-5] if args.model.endswith(".onnx") else args.model
    out = args.saveEngine or stem + (".ort.onnx" if args.backend == "onnxruntime" else ".engine")
    _json_target(args, [args.model, out])
    if args.backend == "onnxruntime" and args.kv_slot:
        raise MQUserError("--kv-slot is for TensorRT engines; `mq-deploy triton --backend onnxruntime` writes the "
                          "ONNX copy with the slot itself")
    if args.backend == "onnxruntime" and args.batch_states:
        raise MQUserError("--batch-states is for TensorRT engines; `mq-deploy triton --backend onnxruntime` writes "
                          "the ONNX copy with batch-first states itself")
    if args.backend == "onnxruntime":
        from mq_deploy.backends.ort.build import build_onnxruntime

        rep = build_onnxruntime(args.model, out, int8=args.int8, fp16=args.fp16, plugins=args.plugins or (),
                            min_shapes=args.minShapes, opt_shapes=args.optShapes, max_shapes=args.maxShapes,
                            overwrite=args.overwrite)
        v = rep["verify"]["outputs"].get("logits", {})
        print(f"wrote {rep['output']}: ONNX Runtime {rep['onnxruntime_version']} optimized model, "
              f"{rep['nodes_before']} -> {rep['nodes_after']} nodes, {rep['bytes'] / 1e6:.2f} MB, "
              f"{rep['build_seconds']:.2f} s")
        top = ", ".join(f"{k} {n}" for k, n in sorted(rep["op_counts"].items(), key=lambda kv: -kv[1])[:10])
        print(f"  ops: {top}")
        if v:
            print(f"  verified against {args.model} on {rep['verify']['feeds']}: logits cosine "
                  f"{v['cosine_mean']:.6f}, top-1 agreement {v.get('top1_agreement', 1.0) * 100:.2f}%, "
                  f"max abs {v['max_abs']:.3g}")
        if rep.get("requires_custom_op_library"):
            print(f"  needs the custom-op library {rep['requires_custom_op_library']} wherever it runs (its mq:: "
                  "ops are native nodes; recorded in its metadata as mq.custom_op_library); build without "
                  "--plugins for a file that runs in any ONNX Runtime")
        else:
            print("  runs in any ONNX Runtime: the mq:: ops' function bodies are inlined (no custom-op library)")
    else:
        from mq_deploy.backends.trt.build import EngineBuildConfig, build_engine, check_int8

        check_int8(args.model, args.int8)
        cfg = EngineBuildConfig(int8=args.int8, fp16=args.fp16, min_shapes=args.minShapes, opt_shapes=args.optShapes,
                                max_shapes=args.maxShapes, plugins=args.plugins or (),
                                timing_cache=args.timingCacheFile, overwrite=args.overwrite,
                                workspace=args.workspace_mib * 2 ** 20 if args.workspace_mib else None,
                                kv_slot=args.kv_slot, batch_states=args.batch_states)
        rep = build_engine(args.model, out, cfg)
        print(f"wrote {rep.get('engine')}: TensorRT {rep.get('tensorrt_version')}, "
              f"{rep.get('engine_bytes', 0) / 1e6:.2f} MB, {rep.get('build_seconds', 0):.1f} s, "
              f"{len(rep.get('layers', []))} layers, {rep.get('scan_nodes')} mq::SelectiveScan plugin nodes")
        precisions: dict = {}
        for layer in rep.get("layers", []):
            precisions[layer.get("precision")] = precisions.get(layer.get("precision"), 0) + 1
        print("  layer precisions: " + ", ".join(f"{k} {v}" for k, v in precisions.items()))
    _write_json(args, rep, [args.model, out])
    return 0


# ---- parser ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="mq-deploy", description="Quantize and deploy Mamba models (MambaQuant PTQ).")
    p.add_argument("--version", action="version", version=f"mq-deploy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    model_help = "checkpoint directory (mq-deploy, HF transformers, mamba-ssm) or Vim .pth"

    s = sub.add_parser("info", help="describe a model checkpoint (format, architecture, size)")
    s.add_argument("model", help=model_help)
    add_json(s, "the description")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("eval", help="end metric: bits per byte (LM) or top-1 (Vim)")
    s.add_argument("model", help=model_help + ", or a quantized checkpoint (fake quantization)")
    g = add_eval_data(s)
    g.add_argument("--split", default="test", choices=["test", "train", "calib"], help="Vim idx split")
    add_runtime(s, ort=False)
    add_json(s, '{"metric", "value", "samples"}')
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("quantize", help="transform + quantize a model, write a quantized checkpoint directory")
    s.add_argument("model", help=model_help)
    add_output(s, "OUTDIR")
    add_recipe(s)
    add_calib(s)
    s.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                   help="read the model layer by layer, one layer in memory at a time (language models, layer-wise "
                        "recipes): on, off, or auto (from 1 GiB of float32 weights up; default)")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted layer-streamed quantize from its last finished layer, kept in "
                        "OUTDIR.partial (same model, recipe, calibration and settings; implies --stream on)")
    add_runtime(s, ort=False)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("inspect", help="per-channel max/variance plots: raw, Hadamard, KLT·H, smoothing+rotation")
    s.add_argument("model", help=model_help)
    add_output(s, "DIR")
    s.add_argument("--recipe", choices=_LazyChoices(lambda: [r for r in _recipe_names() if r != "fp"]),
                   help="inspect after this recipe's transforms (default: the model as loaded)")
    s.add_argument("--alpha", type=finite_float, default=0.5)
    add_calib(s)
    add_runtime(s, ort=False)
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("compare", help="table of the end metric per PTQ recipe and bit width (fake quantization)")
    s.add_argument("model", help=model_help)
    s.add_argument("--recipes", default="fp,rtn,smoothquant,quarot,mambaquant")
    s.add_argument("--bits", default="w8a8,w4a8", help="comma-separated: w8a8,w4a8,w8a6,w4a6,w8a4 (fake quantization; "
                   "A6/A4 are evaluation only, export takes A8)")
    s.add_argument("--ssm-scales", default="per_tensor", metavar="LIST",
                   help="comma-separated granularities of the scan inputs' scales to compare: per_tensor,grouped "
                        "(grouped rows are labelled RECIPE/grouped)")
    s.add_argument("--kv-cache", default="fp32", metavar="LIST",
                   help="comma-separated storage of attention layers' KV caches to compare: fp32,int8 (int8 rows, a "
                        "scale per key/value head, are labelled RECIPE+kv-int8)")
    add_recipe(s, quantize=False)
    add_calib(s, seq_len_flag=False)      # --seq-len is the evaluation window here
    g = add_eval_data(s)
    g.add_argument("--split", default="test", choices=["test", "train", "calib"])
    add_runtime(s, ort=False)
    add_json(s, '{"rows": [{"recipe", "bits", "metric", "value", "ci95", "delta", "delta_ci95", ...}], "pairs": '
                '[mambaquant - quarot per bits, with diff_ci95]} (paired bootstrap, 1000 resamples)')
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("export", help="write an ONNX file (QDQ int8/int4 + mq::SelectiveScan, or float32)")
    s.add_argument("model", help="quantized checkpoint directory (mq-deploy quantize) or a float model")
    g = add_output(s, "MODEL.onnx")
    s.add_argument("--decode-step", action="store_true",
                   help="LM: the stateful graph (input_ids, conv_state, ssm_state -> logits, new states)")
    s.add_argument("--state-dtype", choices=tuple(STATE_DTYPE_NAMES), default="fp32",
                   help="--decode-step: how the SSM states are stored between calls. fp16; int8: the conv state on "
                        "its conv1d scale, the SSM state with a float16 scale per row, chosen at every step "
                        "(a quantized checkpoint; docs/results.md measures what it costs). Default fp32")
    s.add_argument("--opset", type=int, default=21, help="ONNX opset (>= 21; default 21)")
    s.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                   help="read the checkpoint a block at a time, each block's tensors written to MODEL.onnx.data as "
                        "they are made: on, off, or auto (language models from 1 GiB of float32 weights; default)")
    s.add_argument("--quantize-head", action="store_true",
                   help="LM: int8 per-channel lm_head weights with int8 activations per tensor at run time "
                        "(DynamicQuantizeLinear + MatMulInteger); the embedding stays float")
    s.add_argument("--head-bits", type=int, default=8, choices=[8, 4],
                   help="with --quantize-head: 4 stores the head int4 with a scale per block of 32 inputs and float "
                        "activations (written as --int4-format says), default 8")
    s.add_argument("--int4-format", default="qdq", choices=["qdq", "matmulnbits", "matmulnbits-a16"],
                   help="W4 checkpoints and int4 heads: qdq (int4 DequantizeLinear + MatMul: the TensorRT file, runs "
                        "anywhere), matmulnbits (ONNX Runtime's com.microsoft.MatMulNBits, int8 activations per "
                        "block at run time: the ONNX Runtime file) or matmulnbits-a16 (the same op with float "
                        "activations)")
    add_tokenizer(s)
    add_json(s, "the export summary", g)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("verify", help="run an ONNX file or TensorRT engine against the PyTorch reference",
                       description="Exit 0: PASSED; 1: FAILED; 3: WITHIN NOISE FLOOR (a gate failed, but the artifact "
                                   "deviates from the reference no more than 3x as much as the reference deviates from "
                                   "itself under another valid rounding order: the model is too sensitive for the "
                                   "gates); 2: bad input.")
    s.add_argument("artifact", help="model.onnx, or a TensorRT engine (.engine/.plan)")
    s.add_argument("--reference", required=True, metavar="DIR",
                   help="the checkpoint it came from (a quantized one runs with fake quantization)")
    s.add_argument("--stream", choices=("auto", "on", "off"), default="auto",
                   help="the reference reads its layers in one at a time as it runs: on, off, or auto (language "
                        "models from 1 GiB of float32 weights; default)")
    add_eval_data(s, seq_len=256, limit_help="LM windows (default 32) or images (default all)")
    g = s.add_argument_group("checks (polygraphy-style)")
    g.add_argument("--atol", type=nonneg_float)
    g.add_argument("--rtol", type=nonneg_float)
    g.add_argument("--check-error-stat", default="mean", choices=["max", "mean", "median"])
    g.add_argument("--min-cosine", type=finite_float, default=0.999)
    g.add_argument("--min-top1-agreement", type=finite_float, default=0.99)
    g.add_argument("--max-metric-delta", type=nonneg_float, default=0.002, help="relative; 0.002 = 0.2%%")
    add_runtime(s)
    s.add_argument("--plugins", nargs="*", metavar="SO", help="TensorRT plugin libraries (engines)")
    add_json(s, '{"outputs", "metrics", "checks", "passed", "verdict", "noise_floor"}')
    s.set_defaults(func=cmd_verify)

    s = sub.add_parser("generate", help="generate text with an exported decode-step graph in ONNX Runtime")
    s.add_argument("model", metavar="MODEL_STEP.onnx")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", metavar="TEXT", action="append",
                   help="repeat it for several prompts, decoded as one batch")
    g.add_argument("--prompt-ids", metavar="IDS", help="token ids (comma or space separated) instead of text")
    g.add_argument("--prompts-file", metavar="FILE", help="one prompt per line (UTF-8), decoded as one batch")
    s.add_argument("--max-new-tokens", type=int_range(0, _max_new_tokens), default=64, help="0 .. 4096 (default 64)")
    s.add_argument("--temperature", type=nonneg_float, default=0.0, help="0 = greedy")
    s.add_argument("--seed", type=seed_int, default=0)
    s.add_argument("--ids", action="store_true", help="print token ids instead of text")
    add_tokenizer(s)
    add_runtime(s)
    add_json(s, '{"prompt_ids", "new_ids"}; several prompts: {"results": [...]}')
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("run", help="classify images with an exported Vision Mamba in ONNX Runtime")
    s.add_argument("model", metavar="MODEL.onnx")
    s.add_argument("--images", required=True, metavar="PATH",
                   help="image file, directory of images, idx file / directory (Fashion-MNIST) or .npy uint8 array")
    s.add_argument("--limit", type=positive_int, metavar="N")
    s.add_argument("--show", type=int_range(0), default=20, metavar="N",
                   help="print the first N predictions (default 20)")
    s.add_argument("--class-names", metavar="A,B,...")
    s.add_argument("--batch", type=positive_int, default=64)
    add_runtime(s)
    add_json(s, '{"predictions", "names", "top1"}')
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("build", help="build a deployable engine: TensorRT (plugin) or an ORT-optimized model")
    s.add_argument("model", metavar="MODEL.onnx")
    s.add_argument("--backend", default="tensorrt", choices=["tensorrt", "onnxruntime"])
    s.add_argument("--int8", action="store_true", help="int8 build (the graph must carry Q/DQ nodes)")
    s.add_argument("--fp16", action="store_true", help="TensorRT: fp16 outside the int8 layers, fp16 scan output")
    g = s.add_argument_group("shapes (trtexec syntax: name:AxB[,name:...])")
    g.add_argument("--minShapes", metavar="SPEC")
    g.add_argument("--optShapes", metavar="SPEC", help="also the shapes the onnxruntime build verifies with")
    g.add_argument("--maxShapes", metavar="SPEC")
    s.add_argument("--plugins", nargs="*", metavar="SO",
                   help="TensorRT: libmq_scan_trt.so; onnxruntime: libmq_scan_ort.so custom-op library (the mq:: ops "
                        "stay native and the output needs that library; default: their bodies are inlined and the "
                        "output runs in any ONNX Runtime)")
    g = s.add_argument_group("output")
    g.add_argument("--saveEngine", metavar="PATH", help="default: MODEL.engine / MODEL.ort.onnx")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output, only if mq-deploy wrote it")
    add_json(s, "the build report", g)
    s.add_argument("--timingCacheFile", metavar="PATH")
    s.add_argument("--workspace-mib", type=positive_int, metavar="MIB", help="TensorRT builder workspace limit")
    s.add_argument("--kv-slot", action="store_true",
                   help="TensorRT, a hybrid's decode step: build from the copy whose KV caches carry Triton's start "
                        "slot, for `mq-deploy triton --backend tensorrt` (implicit state); the caches' profile "
                        "follows input_ids' shapes (length 1 to 1 + its longest)")
    s.add_argument("--batch-states", action="store_true",
                   help="TensorRT, a pure SSM decode step: build from the copy whose states are batch-first, so that "
                        "`mq-deploy triton --backend tensorrt` lets Triton batch the sequences' steps; the states' "
                        "batch follows input_ids' (give --minShapes input_ids:1x1 ... --maxShapes input_ids:Bx1)")
    s.set_defaults(func=cmd_build)

    for register in _extra_commands():
        register(sub)
    return p


def _extra_commands():
    """Subcommand groups that live beside their library (each a `register(subparsers)`)."""
    from mq_deploy.serve.cli import register as serve_commands  # triton, serve

    return [serve_commands]


def _return_freed_memory() -> None:
    """glibc raises its mmap threshold as large blocks are freed, up to 32 MiB, after which the model-sized
    temporaries of load / fold / calibration stay in the heap when freed and add up in RSS (a 1536-wide
    model quantized at 2.39 GB peak, 2.02 GB with a fixed 8 MiB threshold, same speed). A fixed threshold:
    unless the user set MALLOC_MMAP_THRESHOLD_ themselves; nothing on other C libraries."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if hasattr(libc, "gnu_get_libc_version"):
            libc.mallopt(-3, 8 << 20)     # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv=None) -> int:
    _return_freed_memory()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:        # usage errors (one line, see _Parser.error), --help, --version
        return e.code if isinstance(e.code, int) else 2
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
    except BrokenPipeError:   # `mq-deploy generate ... | head`: the reader left; not an error of ours
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except OSError as e:      # the system refused a read or write (permissions, read-only, disk full)
        where = f"{e.filename}: " if e.filename else ""
        print(f"mq-deploy {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
