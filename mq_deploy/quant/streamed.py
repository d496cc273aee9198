"""Layer-streamed quantize: a language model of any size with one layer in memory at a time.

The model is built on the meta device (load_model(lazy=True)); its tensors stay in the memory-mapped
checkpoint until a stage reads a module in (loaders.materialize) and gives it back (loaders.release).
What is held between layers is the calibration windows' residual stream, [windows, seq, d_model] float32
(and the embeddings, for a family whose blocks read them).

A layer-wise recipe (recipes.Recipe.layerwise) runs in its parts, each on the modules in memory:

  1. stats     passes over every layer that the rest needs first (MambaQuant: the residual stream's second
               moment for K); each pass reads the layers in one after another, with their norms fused
               when the recipe fuses norms, and runs the calibration batches through each.
  2. ends      the embedding, final norm and head are read in, transformed (norm_f fused into the head,
               the residual rotation) and written, a block of vocabulary rows at a time (_write_ends); the
               rotated embedding gives the stream's first input.
  3. layers    for each layer: read in, norms fused, the recipe's own transforms (their calibration passes
               run this one layer on the held stream), the activation calibration pass (and GPTQ's
               Hessians), the stream advanced by the transformed float layer, the weights rounded, the
               layer written as its own shard, released.

The same batches go through the same layers as in the whole-model path, so the result is the same but for
float rounding: in the whole-model path a recipe's calibration pass sees the layers before it rotated but
not yet folded, here fully transformed (the folds preserve the function in float64). tests/test_streamed.py
holds the two paths to that.

Every finished step is committed to the partial folder OUT.partial (quant.partial: the shards, the stats
context, the held stream and the scales so far), so an interrupted run continues with `--resume` from its last
finished block: the stream is restored bit for bit and each remaining block runs exactly as it would have, so the
output is byte-identical to an uninterrupted run's (tests/test_resume.py).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from mq_deploy.calib.collect import Window
from mq_deploy.errors import MQInternalError, MQUserError
from mq_deploy.models.loaders import materialize, read_rows, release
from mq_deploy.models.points import mixer_prefix
from mq_deploy.quant.partial import STATS

SHARD = "model-{:05d}-of-{:05d}.safetensors"
ENDS_ROW_BLOCKS = 4   # fold._update_rows blocks of vocabulary rows per block of the ends (8192 rows at d_model 4096)


class _Stream:
    """The calibration windows' residual stream between layers, and the loops that push it through layers."""

    def __init__(self, model, loop):
        if not hasattr(loop, "data"):
            raise MQUserError("a layer-streamed quantize takes a language model's token windows as calibration data")
        self.model, self.data, self.batch = model, loop.data, loop.batch
        self.samples = loop.samples
        self.reads_emb = any(layer.reads_embeddings for layer in model.layers)
        self.h = self.emb = None
        self.runs = 0           # passes of the current layer (layer_loop) so far

    def embed_rows(self, rows, start: int, last: bool):
        """The stream's first input (MambaLM._embed of the calibration tokens) from the embedding a block of rows at a
        time, in order: rows [start, start + len(rows)) of it; `last`: the final block (the embedding multiplier then
        applies, as in MambaLM._embed)."""
        with torch.no_grad():
            if start == 0:
                self.h = torch.zeros(*self.data.shape, rows.shape[1], dtype=rows.dtype)
            ids = self.data - start
            hit = (ids >= 0) & (ids < len(rows))
            self.h[hit] = rows[ids[hit]]
            if last:
                m = self.model.cfg.embedding_multiplier
                self.h = self.h if m == 1.0 else self.h * m
                self.emb = self.h.clone() if self.reads_emb else None

    def _run(self, layer, h):
        out = torch.empty_like(h)
        kw = {}
        with torch.no_grad():
            for i in range(0, len(h), self.batch):
                if self.reads_emb:
                    kw = {"emb": self.emb[i:i + self.batch]}
                out[i:i + self.batch] = layer(h[i:i + self.batch], **kw)
        return out

    def full_loop(self, on_load, say):
        """A calibration loop over every layer, each read in (on_load(model) then runs with it in memory), run
        on the stream and released (say(done, total, what) after each); the stream itself is left as it was."""
        def loop(model):
            h = self.h
            for i in range(len(model.layers)):
                layer = materialize(model, f"layers.{i}")
                model.stream_window = Window(frozenset({i}))
                try:
                    on_load(model)
                    hook_for = getattr(model, "calib_hook_for", None)
                    if hook_for is not None:
                        layer.mixer.act_hook = hook_for(mixer_prefix(i))
                    h = self._run(layer, h)
                finally:
                    layer.mixer.act_hook = None
                    model.stream_window = Window()
                    release(layer)
                say(i + 1, len(model.layers), "statistics pass")
        loop.samples = self.samples
        return loop

    def layer_loop(self, i):
        """A calibration loop running layer i (in memory) on the stream; its last output is kept (advance)."""
        def loop(model):
            self.out = self._run(model.layers[i], self.h)
            self.runs += 1
        loop.samples = self.samples
        self.runs, self.out = 0, None
        return loop

    def advance(self):
        self.h, self.out = self.out, None


def _float_kv(layer) -> None:
    """A layer's calibration runs with its KV cache in float, as in the whole model: layers whose attention config
    is one shared object (identical configs are) would otherwise see the int8 cache an earlier layer's
    quantization switched on, without scales of their own yet."""
    for m in layer.modules():
        cfg = getattr(m, "cfg", None)
        if hasattr(m, "set_kv_int8") and getattr(cfg, "kv_cache", None) == "int8" and "kv_scale" not in m._buffers:
            cfg.kv_cache = "fp32"


def _restore_config(partial, model, saved: dict) -> None:
    """Put the model config as the finished blocks left it (read back from the partial folder) onto the live
    config objects the unfinished layers share: an untied head, int8 KV caches. Validated by the one config
    reader; anything it cannot make equal is a damaged record."""
    import dataclasses

    from mq_deploy.config import config_from_dict

    try:
        want = config_from_dict(saved)
    except (MQUserError, TypeError) as e:
        raise partial._damaged(f"the model config it recorded is not valid ({e})") from None

    def assign(live, new):
        if type(live) is not type(new) or not dataclasses.is_dataclass(live):
            return
        for f in dataclasses.fields(live):
            a, b = getattr(live, f.name), getattr(new, f.name)
            if dataclasses.is_dataclass(a):
                assign(a, b)
            elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and \
                    all(dataclasses.is_dataclass(x) for x in a):
                for x, y in zip(a, b):
                    assign(x, y)
            elif f.init and a != b:
                setattr(live, f.name, b)
    assign(model.cfg, want)
    if json.loads(json.dumps(model.cfg.to_dict(), default=str)) != saved:
        raise partial._damaged("the model config it recorded does not fit this model")


def _scale_tensors(act_scales: dict, weight_scales: dict) -> dict:
    out = {f"act:{k}": v for k, v in act_scales.items()}
    out.update({f"weight:{k}": v for k, v in weight_scales.items()})
    return out


def _restore_rng(partial, st: dict) -> None:
    rng = st.get("rng.torch")
    if rng is not None:
        try:
            torch.set_rng_state(rng)
        except (RuntimeError, TypeError):
            raise partial._damaged("its RNG state is not torch's") from None


def _resume(partial, model, stream, act_scales, weight_scales):
    """The state after the last finished block: the held stream, the scales so far, torch's RNG; returns
    (flags, weight_map)."""
    st = partial.state()
    h = st.get("stream.h")
    shape = (len(stream.data), stream.data.shape[1], model.cfg.d_model)
    if h is None or tuple(h.shape) != shape or not h.is_floating_point() or stream.reads_emb != ("stream.emb" in st):
        raise partial._damaged(f"its state file {partial.rec['state']} does not hold this model's stream {list(shape)}")
    stream.h, stream.emb = h, st.get("stream.emb")
    for k, v in st.items():
        if k.startswith("act:"):
            act_scales[k[4:]] = v
        elif k.startswith("weight:"):
            weight_scales[k[7:]] = v
    _restore_rng(partial, st)
    _restore_config(partial, model, partial.rec["config"])
    flags = partial.rec["flags"]
    return (None if flags is None else dict(flags)), dict(partial.rec["weight_map"])


def quantize_layers(loaded, loop, cfg, tmp: str, partial, progress=None):
    """Quantize the lazily loaded LM `loaded` (load_model(lazy=True)) with the layer-wise recipe of `cfg`,
    writing its weights into folder `tmp` as shards and their index; return (scales, layer flags) as
    qcheckpoint.QuantizedCheckpoint.write takes them. `loop`: a text calibration loop
    (collect.text_forward_loop). `partial`: the run's partial folder (quant.partial.Partial), which receives
    each finished block and, when it was resumed, says where to continue. progress(done, total, what): called
    after each stage's step."""
    from mq_deploy.quant.qcheckpoint import layer_flags
    from mq_deploy.quant.recipes import calibrate_activations, get_recipe, quantize_calibrated
    from mq_deploy.transforms import fold

    model = loaded.model
    recipe = get_recipe(cfg.recipe)
    if not recipe.layerwise:
        raise MQUserError(f"recipe {cfg.recipe!r} is not layer-wise (register_recipe(layerwise=True)): it cannot "
                          "run layer by layer")
    n = len(model.layers)
    stream = _Stream(model, loop)
    say = progress or (lambda done, total, what: None)
    fuse = fold.fuse_layer_norms if recipe.fuses_norms else (lambda m: None)
    model.stream_window = Window()
    weight_map, act_scales, weight_scales, flags = {}, {}, {}, None

    def shard(k):
        return SHARD.format(k + 1, n + 1)

    def commit(done):
        tensors = _scale_tensors(act_scales, weight_scales)
        tensors["stream.h"] = stream.h
        if stream.emb is not None:
            tensors["stream.emb"] = stream.emb
        partial.commit(tensors, done=done, flags=flags, weight_map=weight_map, config=model.cfg.to_dict())

    # 1. stats: passes over every layer on the untransformed stream
    ctx = None
    if recipe.stats is not None:
        if partial.rec["stats"]:
            ctx = _stats_from(partial)
            if not partial.done:
                _restore_rng(partial, partial.state())
        else:
            _embed_checkpoint(model, stream)
            ctx = recipe.stats(model, stream.full_loop(fuse, say), cfg)
            partial.write(STATS, _stats_tensors(ctx))
            partial.commit({}, stats=True)
    if partial.done:
        flags, weight_map = _resume(partial, model, stream, act_scales, weight_scales)
        say(partial.done - 1, n, "layers")
    else:
        # 2. the ends: read in, transformed, written, released; the stream starts from the embedding as written
        weight_map.update(_write_ends(model, recipe, ctx, stream, partial, shard(0)))
        commit(1)
    # 3. each layer
    for i in range(partial.done - 1, n):
        layer = materialize(model, f"layers.{i}")
        model.stream_window = Window(frozenset({i}))
        _float_kv(layer)
        fuse(model)
        layer_loop = stream.layer_loop(i)
        recipe.layers(model, layer_loop, cfg, ctx)
        stream.runs = 0
        cal = calibrate_activations(model, layer_loop, cfg)
        if stream.runs == 0:         # (no calibration pass was needed) the stream goes on through the
            layer_loop(model)        # transformed float layer, as the calibration pass would have taken it
        stream.advance()
        scales = quantize_calibrated(model, cal, cfg.quant, cfg.weight_rounding)
        act_scales.update(scales["act_scales"])
        weight_scales.update(scales["weight_scales"])
        flags = layer_flags(model, flags)
        prefix = f"layers.{i}."
        tensors = {prefix + k: v for k, v in layer.state_dict().items()}
        partial.write(shard(i + 1), tensors, metadata={"format": "pt"})
        weight_map.update({k: shard(i + 1) for k in tensors})
        del tensors         # (it would hold this layer's weights through the next layer's calibration)
        model.stream_window = Window()
        release(layer)
        commit(i + 2)
        say(i + 1, n, "layers")
    # 4. the finished shards go into the output
    names = sorted(set(weight_map.values()))
    partial.link_into(names, tmp)
    total = sum(os.path.getsize(os.path.join(tmp, f)) for f in names)
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1, sort_keys=True)
        f.write("\n")
    return {"act_scales": act_scales, "weight_scales": weight_scales}, flags


def _vocab_blocks(model):
    """(start, stop) of the blocks of vocabulary rows the ends go through, in order (ENDS_ROW_BLOCKS of fold's float64
    row blocks each; the embedding is on the meta device here: only its shape is read)."""
    from mq_deploy.transforms import fold

    vocab, width = model.embedding.weight.shape
    rows = ENDS_ROW_BLOCKS * fold.row_block(width)
    return [(start, min(vocab, start + rows)) for start in range(0, vocab, rows)]


def _embed_checkpoint(model, stream):
    """The stream's first input from the checkpoint's embedding, a block of rows at a time (the statistics passes start
    from it: a vocabulary of 256000 x 4096 is 4 GiB in float32)."""
    blocks = _vocab_blocks(model)
    for start, stop in blocks:
        stream.embed_rows(read_rows(model, "embedding.weight", start, stop), start, last=stop == blocks[-1][1])


def _write_ends(model, recipe, ctx, stream, partial, name: str) -> dict:
    """The ends (embedding, final norm, head) read in, transformed, written as shard `name` and released, a block of
    vocabulary rows at a time; the stream starts from the embedding as written. Returns their weight map.

    Every transform of the ends acts on each row of the [vocab, d_model] matrices alone (the norm fused into the
    head's columns, the residual rotation h -> h Q), so each block goes through the recipe's own ends transforms as the
    whole matrices would, with a fresh copy of norm_f (fusing sets it to ones), and the rows come out as they would
    whole: the blocks are a multiple of fold's float64 row blocks, so the same products run (tests/test_streamed.py).
    What is held is one block of each end, not the float32 embedding and head (Mamba2-8B's vocabulary of 256000:
    7.8 GiB)."""
    from mq_deploy.transforms import fold

    blocks = _vocab_blocks(model)
    vocab, width = model.embedding.weight.shape       # (on the meta device: only the shape is read)
    tied = model.cfg.tie_embeddings
    meta = {"embedding": model.embedding.weight, "lm_head": model.lm_head.weight}
    shapes = None
    with contextlib.ExitStack() as stack:
        for start, stop in blocks:
            model.cfg.tie_embeddings = tied           # (fuse_end_norm unties it, a block at a time)
            materialize(model, "norm_f")              # the checkpoint's, for every block
            model.embedding.weight = torch.nn.Parameter(read_rows(model, "embedding.weight", start, stop),
                                                        requires_grad=False)
            model.lm_head.weight = (model.embedding.weight if tied else
                                    torch.nn.Parameter(read_rows(model, "lm_head.weight", start, stop),
                                                       requires_grad=False))
            model.stream_window = Window(ends=True)
            if recipe.fuses_norms:
                fold.fuse_end_norm(model)
            if recipe.ends is not None:
                recipe.ends(model, ctx)
            ends = {"embedding.weight": model.embedding.weight}
            if not model.cfg.tie_embeddings:
                ends["lm_head.weight"] = model.lm_head.weight
            if shapes is None:
                shapes = {k: (vocab, width) for k in ends}
                shapes["norm_f.weight"] = tuple(model.norm_f.weight.shape)
                put = stack.enter_context(partial.write_rows(name, shapes, metadata={"format": "pt"}))
            elif set(ends) | {"norm_f.weight"} != set(shapes):
                raise MQInternalError("the ends transforms tied or untied the head in one block of rows only")
            for k, v in ends.items():
                put(k, start, v)
            stream.embed_rows(model.embedding.weight, start, last=stop == vocab)
            if stop == vocab:
                put("norm_f.weight", 0, model.norm_f.weight)
            model.embedding.weight, model.lm_head.weight = meta["embedding"], meta["lm_head"]
            release(model.norm_f)
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.embedding.weight
    return {k: name for k in shapes}


def _stats_tensors(ctx) -> dict:
    """The recipe's stats context as tensors to record: None, a tensor, or a dict of tensors."""
    if ctx is None:
        return {}
    if isinstance(ctx, torch.Tensor):
        return {"ctx": ctx}
    if isinstance(ctx, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ctx.items()):
        return {f"ctx.{k}": v for k, v in ctx.items()}
    raise MQInternalError(f"a recipe's stats context must be None, a tensor or a dict of tensors to be recorded "
                          f"for --resume, got {type(ctx).__name__}")


def _stats_from(partial):
    t = partial.load_tensors(STATS)
    if not t:
        return None
    if set(t) == {"ctx"}:
        return t["ctx"]
    if all(k.startswith("ctx.") for k in t):
        return {k[4:]: v for k, v in t.items()}
    raise partial._damaged(f"{STATS} holds {sorted(t)[:3]}, not a recipe's stats context")


__all__ = ["quantize_layers"]
