"""Quantized checkpoint directory: what `mq-deploy quantize` writes and `eval` / `export` read.

    config.json        our model config + "quant" (recipe, bits, which runtime transforms exist)
    model.safetensors  transformed weights, already rounded to the integer grid (dequantized fp32),
                       plus the runtime buffers (online rotation before out_proj, gate smoothing)
    scales.safetensors "act/<point>" per-tensor activation scales, "weight/<param>" per-channel scales
    manifest.json      recipe, bits, calibration source and size, seed, what the result depends on
                       (tool versions, torch threads), and the time it was written

`QuantizedCheckpoint` is the only code that reads or writes scales and the manifest.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field

import torch

from mq_deploy import __version__
from mq_deploy.calib.collect import resident_layers
from mq_deploy.config import EXPORT_ABITS, EXPORT_WBITS  # noqa: F401  (the bit widths a deployable checkpoint has)
from mq_deploy.errors import MQUserError

_ACT, _WEIGHT = "act/", "weight/"


@dataclass
class QuantizedCheckpoint:
    path: str
    quant: dict                                        # config.json "quant"
    act_scales: dict = field(default_factory=dict)     # point -> 0-d float tensor
    weight_scales: dict = field(default_factory=dict)  # parameter name -> per-channel float tensor
    manifest: dict = field(default_factory=dict)

    @property
    def wbits(self) -> int:
        return int(self.quant["wbits"])

    @property
    def abits(self) -> int:
        return int(self.quant["abits"])

    @property
    def act_granularity(self) -> str:
        return self.quant.get("act_granularity", "per_tensor")

    def act_scale_floats(self) -> dict:
        """{point: float} for per-tensor scales, {point: [floats]} for per-group ones (ssm_scales grouped)."""
        return {k: float(v) if v.numel() == 1 else [float(x) for x in v.reshape(-1)]
                for k, v in self.act_scales.items()}

    @property
    def ssm_scales(self) -> str:
        return self.quant.get("ssm_scales", "per_tensor")

    # ---- reading ------------------------------------------------------------------------------
    @staticmethod
    def is_quantized(loaded) -> bool:
        return bool((loaded.extra or {}).get("quant"))

    @classmethod
    def read(cls, loaded) -> "QuantizedCheckpoint":
        """The scales and manifest of a loaded quantized checkpoint (mq_deploy.models.loaders.load_model)."""
        from mq_deploy.models.loaders import read_safetensors

        quant = (loaded.extra or {}).get("quant")
        if not quant:
            raise MQUserError(f"{loaded.path}: not a quantized checkpoint (no \"quant\" in config.json)")
        for key in ("wbits", "abits"):
            if not isinstance(quant.get(key), int):
                raise MQUserError(f"{os.path.join(loaded.path, 'config.json')}: quant.{key} must be an integer")
        path = os.path.join(loaded.path, "scales.safetensors")
        flat = read_safetensors(path)
        act = {k[len(_ACT):]: v.reshape(()) if v.numel() == 1 else v.reshape(-1) for k, v in flat.items()
               if k.startswith(_ACT)}
        weight = {k[len(_WEIGHT):]: v for k, v in flat.items() if k.startswith(_WEIGHT)}
        for name, v in list(act.items()) + list(weight.items()):
            if not v.is_floating_point() or not torch.isfinite(v).all() or (v <= 0).any():
                raise MQUserError(f"{path}: scale {name} must be finite and positive")
        if quant.get("act_granularity", "per_tensor") == "per_tensor" and not act:
            raise MQUserError(f"{path}: no activation scales")
        manifest = {}
        mpath = os.path.join(loaded.path, "manifest.json")
        if os.path.isfile(mpath):
            try:
                with open(mpath) as f:
                    manifest = json.load(f)
            except ValueError as e:
                raise MQUserError(f"{mpath}: not valid JSON ({e})") from None
        return cls(loaded.path, dict(quant), act, weight, manifest)

    # ---- writing ------------------------------------------------------------------------------
    @staticmethod
    def write(model, out_dir: str, recipe_cfg, scales: dict | None, calib_info: dict, source_extra: dict,
              source_path: str, overwrite: bool = False, inputs=(), tokenizer_json: str | None = None,
              weights=None) -> str:
        """tokenizer_json: the LM's tokenizer.json text, written into the folder (which then needs nothing
        beside it, as a hub folder). weights: None (the whole model's weights go to model.safetensors, with
        `scales`), or weights(tmp_dir) -> (scales, layer flags) writing them itself (quant.streamed: shards
        and their index, layer by layer); config.json is then written from the model as it left it."""
        from mq_deploy.models.io import FORMAT_KEY, atomic_write_dir, model_state_dict

        quant = {"recipe": recipe_cfg.recipe, "wbits": recipe_cfg.quant.wbits, "abits": recipe_cfg.quant.abits,
                 "act_granularity": recipe_cfg.quant.act_granularity}
        if recipe_cfg.quant.ssm_scales != "per_tensor":
            quant["ssm_scales"] = recipe_cfg.quant.ssm_scales
        if recipe_cfg.quant.kv_cache != "fp32":    # informative: each attention config's kv_cache decides
            quant["kv_cache"] = recipe_cfg.quant.kv_cache
        out_abs = os.path.abspath(out_dir)
        src_dir = source_path if os.path.isdir(source_path) else os.path.dirname(source_path)
        # the source model's default eval/calibration data stay reachable: through `source`, and only the
        # paths the source's own config declares inside its folder (LoadedModel.data_path)
        extra = {}
        if any(k in (source_extra or {}) for k in ("eval_data", "calib_data")):
            extra["source"] = os.path.relpath(os.path.abspath(src_dir), out_abs)
        if tokenizer_json is not None:
            extra["tokenizer"] = "tokenizer.json"
        settings = {k: getattr(recipe_cfg, k) for k in ("alpha", "percentile", "observer", "weight_rounding",
                                                         "klt_source") if hasattr(recipe_cfg, k)}
        manifest = {"recipe": recipe_cfg.recipe, "wbits": recipe_cfg.quant.wbits, "abits": recipe_cfg.quant.abits,
                    "act_granularity": recipe_cfg.quant.act_granularity, **settings,
                    "source_model": os.path.abspath(source_path), "calibration": calib_info,
                    # the artifacts are byte-identical for the same inputs, seed and these:
                    "depends_on": {"mq_deploy": __version__, "torch": torch.__version__,
                                   "python": platform.python_version(), "torch_threads": torch.get_num_threads()},
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

        def write(tmp):
            from safetensors.torch import save_file

            if weights is None:
                flags = layer_flags(model)
                save_file(model_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
                sc = scales
            else:
                sc, flags = weights(tmp)
            flat = {f"{_ACT}{k}": v.reshape(-1).float() for k, v in sc["act_scales"].items()}
            flat.update({f"{_WEIGHT}{k}": v.float() for k, v in sc["weight_scales"].items()})
            cfg = model.cfg.to_dict()       # after the recipe: an untied head is recorded as such
            cfg.update({FORMAT_KEY: 1, "mq_deploy_version": __version__, "quant": {**quant, **flags}, "extra": extra})
            save_file(flat, os.path.join(tmp, "scales.safetensors"))
            for name, obj in (("config.json", cfg), ("manifest.json", manifest)):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(obj, f, indent=2, sort_keys=True)
                    f.write("\n")
            if tokenizer_json is not None:
                with open(os.path.join(tmp, "tokenizer.json"), "w", encoding="utf-8") as f:
                    f.write(tokenizer_json)

        return atomic_write_dir(out_dir, write, overwrite=overwrite, inputs=inputs, kind="quantized checkpoint")


def layer_flags(model, flags: dict | None = None) -> dict:
    """The quant flags of the layers in memory (the online rotation before out_proj, each family's own runtime
    buffers: Mamba1's gate smoothing), merged into `flags` (a layer-streamed quantize adds each layer's)."""
    _check_out_rotations(model)
    flags = {"online_out_rotation": False} if flags is None else flags
    for _, layer in resident_layers(model):
        m = layer.mixer
        flags["online_out_rotation"] = flags["online_out_rotation"] or m.out_rotation is not None
        flags.update(m.family.module().quant_flags(m))
    return flags


def save_quantized(model, out_dir: str, recipe_cfg, scales: dict, calib_info: dict, source_extra: dict,
                   source_path: str, overwrite: bool = False) -> str:
    return QuantizedCheckpoint.write(model, out_dir, recipe_cfg, scales, calib_info, source_extra, source_path,
                                     overwrite=overwrite, inputs=(source_path,))


def load(path: str, lazy: bool = False):
    """load_model, plus activation fake-quant when `path` is a quantized checkpoint. lazy: an LM read layer by
    layer as it runs (load_model(lazy=True); its embedding, final norm and head in memory)."""
    from mq_deploy.models.loaders import load_model, materialize_ends
    from mq_deploy.quant.fakequant import QuantConfig, attach_activation_quant

    loaded = load_model(path, lazy=lazy)
    if lazy:
        materialize_ends(loaded.model)
    if not QuantizedCheckpoint.is_quantized(loaded):
        return loaded
    ckpt = QuantizedCheckpoint.read(loaded)
    qcfg = QuantConfig(ckpt.wbits, ckpt.abits, ckpt.act_granularity, ckpt.ssm_scales)
    attach_activation_quant(loaded.model, ckpt.act_scales, qcfg)
    return loaded


def quantize_to_dir(model_path: str, out_dir: str, recipe_cfg, calib_cfg, *, overwrite: bool = False,
                    seed: int = 0, progress=None, stream: str = "auto", resume: bool = False) -> dict:
    """`mq-deploy quantize`: load, calibrate, apply the recipe, write the quantized checkpoint.
    Every output check happens before the work starts. stream: layer_streamed's mode (layer by layer, with
    one layer in memory, or the whole model). progress(done, total, what): after each streamed step.
    A layer-streamed run keeps its finished blocks in OUT.partial (quant.partial) until OUT is in place; resume:
    continue from them (the run is then layer-streamed; refused with stream "off"). Without resume an existing
    OUT.partial is refused, or replaced with overwrite."""
    from mq_deploy import fileio
    from mq_deploy.models.loaders import load_model
    from mq_deploy.quant.compare import calibration_loop
    from mq_deploy.quant.recipes import apply_recipe, get_recipe

    if not get_recipe(recipe_cfg.recipe).quantized:
        raise MQUserError(f"--recipe {recipe_cfg.recipe}: quantize writes a quantized checkpoint and this recipe "
                          "rounds nothing; the float model is the input itself (use it with eval / export directly, "
                          "or compare it with `mq-deploy compare --recipes fp,...`)")
    if recipe_cfg.quant.abits not in EXPORT_ABITS or recipe_cfg.quant.wbits not in EXPORT_WBITS:
        raise MQUserError(f"W{recipe_cfg.quant.wbits}A{recipe_cfg.quant.abits} cannot be deployed (the int8 scan "
                          f"and the export take W{'/'.join(map(str, EXPORT_WBITS))} A"
                          f"{'/'.join(map(str, EXPORT_ABITS))}); lower activation bits are for evaluation only: "
                          "`mq-deploy compare --bits ...`")
    if resume and stream == "off":
        raise MQUserError("--resume continues a layer-streamed quantize, and --stream off quantizes the whole model "
                          "at once: drop --stream off")
    inputs = [model_path] + ([calib_cfg.path] if calib_cfg.path else [])
    fileio.check_target(out_dir, overwrite, inputs, "output folder", folder=True)
    torch.manual_seed(seed)
    try:
        streamed = layer_streamed(model_path, recipe_cfg, "on" if resume else stream)
    except MQUserError as e:
        if not resume:
            raise
        raise MQUserError(f"--resume continues a layer-streamed quantize, and this one cannot stream: "
                          f"{str(e).removeprefix('--stream on: ')}") from None
    if streamed:
        from mq_deploy.quant import partial as partial_dir

        partial_dir.precheck(out_dir, inputs, resume, overwrite)
    loaded = load_model(model_path, lazy=streamed)
    if getattr(calib_cfg, "tokenizer", None):
        inputs.append(calib_cfg.tokenizer)
    loop = calibration_loop(loaded, calib_cfg)
    inputs.append(loop.source)
    codec = getattr(loop, "codec", None)
    tokenizer_json = None   # the checkpoint carries the tokenizer it was calibrated with (a copy, not a path)
    if codec is not None and codec.kind == "tokenizers":
        tokenizer_json = codec.json
        inputs.append(codec.source)
    fileio.check_target(out_dir, overwrite, inputs, "output folder", folder=True)
    if recipe_cfg.quant.kv_cache != "fp32":
        from mq_deploy.families.attention.config import attention_configs

        if loaded.architecture != "mamba_lm" or not attention_configs(loaded.config):
            raise MQUserError(f"--kv-cache {recipe_cfg.quant.kv_cache}: {model_path} has no attention layer, so no "
                              "KV cache to store as int8")
    calib_info = {"source": os.path.abspath(loop.source), "samples": loop.samples, "seed": seed}
    if loaded.architecture == "mamba_lm":
        calib_info["seq_len"] = calib_cfg.seq_len
        calib_info["tokenizer"] = "bytes" if tokenizer_json is None else os.path.abspath(codec.source)
    weights, scales, partial, resumed = None, None, None, None
    if streamed:
        from mq_deploy.quant.streamed import quantize_layers

        partial = partial_dir.Partial.open(out_dir, inputs, partial_dir.fingerprint(model_path, loop, recipe_cfg, seed),
                                           len(loaded.model.layers) + 1, resume=resume, overwrite=overwrite)
        if partial.resumed:
            resumed = max(partial.done - 1, 0)

        def weights(tmp):
            return quantize_layers(loaded, loop, recipe_cfg, tmp, partial, progress)
    else:
        scales = apply_recipe(loaded.model, loop, recipe_cfg)
    try:
        out = QuantizedCheckpoint.write(loaded.model, out_dir, recipe_cfg, scales, calib_info, loaded.extra,
                                        model_path, overwrite=overwrite, inputs=inputs, tokenizer_json=tokenizer_json,
                                        weights=weights)
    except BaseException:
        if partial is not None:
            partial.after_failure(model_path)
        raise
    if partial is not None:
        partial.discard()
    return {"path": out, "recipe": recipe_cfg.recipe, "wbits": recipe_cfg.quant.wbits,
            "abits": recipe_cfg.quant.abits, "calibration": calib_info, "layer_streamed": streamed,
            "resumed_after_layers": resumed}


def layer_streamed(model_path: str, recipe_cfg, mode: str = "auto") -> bool:
    """Whether quantize reads `model_path` layer by layer (quant.streamed): loaders.streams, for a layer-wise
    recipe."""
    from mq_deploy.models.loaders import streams
    from mq_deploy.quant.recipes import get_recipe

    why = None if get_recipe(recipe_cfg.recipe).layerwise else f"recipe {recipe_cfg.recipe!r} is not layer-wise"
    return streams(model_path, mode, why)


def _check_out_rotations(model) -> None:
    """The online rotations are not written with the weights: the loader rebuilds them as the Hadamard
    matrix of out_proj's input width (models.loaders._set_out_rotations). Anything else cannot be recorded
    that way."""
    from mq_deploy.errors import MQInternalError
    from mq_deploy.ops.hadamard import hadamard_matrix

    layers = resident_layers(model)
    rots = [layer.mixer.out_rotation for _, layer in layers]
    if all(r is None for r in rots):
        return
    for (i, layer), r in zip(layers, rots):
        if r is None and layer.mixer.out_linear is None:
            continue
        H = torch.from_numpy(hadamard_matrix(layer.mixer.out_linear.in_features)).to(torch.float32)
        if r is None or not torch.equal(r.to(torch.float32), H):
            raise MQInternalError(f"layer {i}: the online out_proj rotation is not the Hadamard matrix of d_inner; "
                                  "a quantized checkpoint records only that one")
