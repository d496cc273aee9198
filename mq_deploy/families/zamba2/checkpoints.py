"""Zamba2 HF folders (transformers' Zamba2ForCausalLM): config parsing and the tensors of our layers.

transformers stores each of the num_mem_blocks shared transformer blocks once, under the first hybrid layer
that applies it (layers.{k}.shared_transformer; the other applications are tied to it), with the LoRA adapters
of every depth j that applies it in its adapter lists (index j counts hybrid layers). Each application of ours
holds merged weights, computed in float64 while loading:
- q/k/v: (W + B_j A_j) diag(w_in), w_in the shared input_layernorm's weight over [h, e] (the adapters exist with
  use_shared_attention_adapter; then key/value heads must equal the heads, as the adapters' outputs are
  2 x hidden_size wide);
- gate/up: the rows of (W_gate_up + B_j A_j) diag(w_ff), w_ff pre_ff_layernorm's weight (the MLP adapters are
  always there in transformers 5.25); gate the first intermediate_size rows (torch.chunk), up the rest;
- o_proj, down_proj: the shared ones; the per-depth `linear` and the Mamba2 mixer: that layer's own.
The shared block's norms are then weightless (Zamba2LayerConfig). Attention: head_dim 2 x hidden_size / heads,
scores scaled by (head_dim / 2) ** -0.5, RoPE over the whole head with use_mem_rope. Mamba2: conv bias always,
add_bias_linear for in_proj/out_proj, gated norm per group with eps 1e-5, dt clamped below at time_step_min."""

from __future__ import annotations

import os
import re

import torch

from mq_deploy.config import MambaLMConfig
from mq_deploy.errors import MQUserError
from mq_deploy.families.attention.config import AttentionConfig
from mq_deploy.families.mamba2.config import Mamba2Config
from mq_deploy.families.mlp.config import MLPConfig
from mq_deploy.families.zamba2.config import Zamba2LayerConfig
from mq_deploy.models.loaders import (
    TensorSource,
    config_for,
    eos_token,
    hf_tensor_source,
    json_flag,
    load_into,
    read_json,
    shown,
    with_tokenizer,
)

_SHARED = re.compile(r"model\.layers\.\d+\.shared_transformer\.")


def _kind(key: str) -> str:
    """A shared block's tensor name without its layer and adapter depth."""
    return re.sub(r"_list\.\d+\.", "_list.*.", _SHARED.sub("", key))


_KINDS = {"mamba": False, "linear_attention": False, "hybrid": True}
_ACTS = {"gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}   # transformers' ACT2FN names
_MAMBA = ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias", "in_proj.weight", "norm.weight",
          "out_proj.weight")


def default_layer_types() -> list:
    """transformers' Zamba2Config default (Zamba2-2.7B's 54 layers)."""
    return (["mamba"] + (["mamba"] * 5 + ["hybrid"]) * 7 + ["mamba"] * 4 + ["hybrid"] + ["mamba"] * 3
            + ["hybrid"] + ["mamba"] * 2)


def _int(c: dict, key: str, default, src: str, lo: int = 1) -> int:
    v = c.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise MQUserError(f"{shown(src)}: {key} must be an integer >= {lo}, got {v!r}")
    return v


def _rope_theta(c: dict, src: str) -> float:
    params = c.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise MQUserError(f"{shown(src)}: rope_parameters must be an object, got {params!r}")
    if params.get("rope_type", "default") != "default":
        raise MQUserError(f"{shown(src)}: rope_parameters.rope_type {params['rope_type']!r} is not supported "
                          "(default RoPE only)")
    return params.get("rope_theta", c.get("rope_theta", 10000.0))


def layer_configs(c: dict, src: str) -> tuple:
    """(our layer configs, the hybrid layers' indices, num_mem_blocks, adapters on q/k/v) of a Zamba2 config."""
    n = _int(c, "num_hidden_layers", 54, src)
    types = c.get("layers_block_type", c.get("layer_types"))
    types = default_layer_types() if types is None else types
    if not isinstance(types, list) or any(t not in _KINDS for t in types):
        bad = next((t for t in types if t not in _KINDS), types) if isinstance(types, list) else types
        raise MQUserError(f"{shown(src)}: layers_block_type entry {bad!r}: Zamba2 layers are 'mamba' "
                          "('linear_attention') or 'hybrid'")
    if len(types) != n:
        raise MQUserError(f"{shown(src)}: layers_block_type lists {len(types)} layers, num_hidden_layers is {n}")
    d = _int(c, "hidden_size", 2560, src)
    eps = c.get("rms_norm_eps", 1e-5)
    heads = _int(c, "num_attention_heads", 32, src)
    kv = c.get("num_key_value_heads")
    kv = heads if kv is None else _int(c, "num_key_value_heads", None, src)
    if 2 * d % heads:
        raise MQUserError(f"{shown(src)}: num_attention_heads {heads} does not divide 2 x hidden_size {2 * d} "
                          "(the shared attention reads [hidden, embeddings])")
    head_dim = 2 * d // heads
    adapters = json_flag(c, "use_shared_attention_adapter", False, src)
    if adapters and kv != heads:
        raise MQUserError(f"{shown(src)}: num_key_value_heads {kv} != num_attention_heads {heads} with "
                          "use_shared_attention_adapter (the k/v adapters write all 2 x hidden_size channels)")
    if not json_flag(c, "use_shared_mlp_adapter", True, src):
        raise MQUserError(f"{shown(src)}: use_shared_mlp_adapter false is not what transformers computes (5.25 "
                          "always applies the MLP adapters)")
    act = c.get("hidden_act", "gelu")
    if act not in _ACTS:
        raise MQUserError(f"{shown(src)}: hidden_act {act!r} is not supported ({', '.join(_ACTS)})")
    rope = json_flag(c, "use_mem_rope", False, src)
    bias = json_flag(c, "add_bias_linear", False, src)
    theta = _rope_theta(c, src)
    mem_blocks = _int(c, "num_mem_blocks", 1, src)
    _int(c, "adapter_rank", 128, src)
    heads_m = _int(c, "n_mamba_heads", 8, src)
    expand = c.get("mamba_expand", 2)
    d_inner = int(expand * d) if not isinstance(expand, bool) and isinstance(expand, (int, float)) else None
    if d_inner is None or d_inner < 1 or d_inner % heads_m:
        raise MQUserError(f"{shown(src)}: mamba_expand {expand!r} x hidden_size {d} is not a multiple of "
                          f"n_mamba_heads {heads_m}")
    dt_min = c.get("time_step_min", 0.001)
    mamba = config_for(src, lambda: Mamba2Config(
        d_model=d, d_state=c.get("mamba_d_state", 64), d_conv=c.get("mamba_d_conv", 4),
        expand=max(1, d_inner // d), head_dim=d_inner // heads_m, n_groups=c.get("mamba_ngroups", 1),
        d_inner=d_inner, conv_bias=True, bias=bias, rmsnorm=True, norm_before_gate=False,
        norm_groups=c.get("mamba_ngroups", 1), norm_eps=1e-5, dt_min=dt_min, dt_max=None,
        chunk_size=c.get("chunk_size", 256)))
    attention = config_for(src, lambda: AttentionConfig(
        d_model=2 * d, n_heads=heads, n_kv_heads=kv, head_dim=head_dim, rope_dim=head_dim if rope else 0,
        rope_theta=theta, scaling=(head_dim / 2) ** -0.5))
    ff = c.get("intermediate_size") or 4 * d
    mlp = config_for(src, lambda: MLPConfig(d_model=d, d_ff=ff, act=_ACTS[act], gated=True, bias=bias))
    plain = config_for(src, lambda: Zamba2LayerConfig(d_model=d, mamba=mamba, shared_norm_eps=eps))
    shared = config_for(src, lambda: Zamba2LayerConfig(d_model=d, mamba=mamba, attention=attention, mlp=mlp,
                                                       shared_norm_eps=eps))
    layers = [shared if _KINDS[t] else plain for t in types]
    return layers, [i for i, t in enumerate(types) if _KINDS[t]], mem_blocks, adapters


class _Zamba2Tensors(TensorSource):
    """Our names over a Zamba2 file: each one a base tensor, or merged from several (module doc), computed when
    read; every shape is checked before anything is read, and every tensor of the file must be used."""

    def __init__(self, base: TensorSource, src: str):
        super().__init__()
        self.base, self.src, self.make, self.used = base, src, {}, set()

    def _need(self, key: str) -> tuple:
        if key not in self.base.shapes:
            raise MQUserError(f"{shown(self.src)}: missing tensor {key}")
        self.used.add(key)
        return tuple(self.base.shapes[key])

    def copy(self, ours: str, key: str) -> None:
        self._add(ours, self._need(key), key, lambda: self.base.get(key))

    def _add(self, ours, shape, key, fn):
        self.shapes[ours], self.dtypes[ours], self.origin[ours] = shape, self.base.dtypes[key], self.base.origin[key]
        self.make[ours] = fn

    def merged(self, ours: list, key: str, adapter: str | None, norm: str, parts: int = 1) -> None:
        """(W + B A) diag(w), W = `key`, A and B the adapter's `.0` / `.1` weights (none: W diag(w)), split into
        `parts` equal row blocks named `ours`."""
        out, inp = self._need(key)
        if self._need(norm) != (inp,):
            raise MQUserError(f"{shown(self.src)}: tensor {norm} has shape {self.base.shapes[norm]}, {key} reads "
                              f"{inp} channels")
        if adapter is not None:
            a, b = self._need(adapter + ".0.weight"), self._need(adapter + ".1.weight")
            if len(a) != 2 or len(b) != 2 or a[1] != inp or b[0] != out or a[0] != b[1]:
                raise MQUserError(f"{shown(self.src)}: adapter {adapter} has shapes {a} and {b}, {key} is {(out, inp)}")
        if out % parts:
            raise MQUserError(f"{shown(self.src)}: tensor {key} has {out} rows, not {parts} equal parts")

        def full():
            w = self.base.get(key).double()
            if adapter is not None:
                w = w + self.base.get(adapter + ".1.weight").double() @ self.base.get(adapter + ".0.weight").double()
            return w * self.base.get(norm).double()

        n = out // parts
        for p, name in enumerate(ours):
            self._add(name, (n, inp), key, lambda p=p: full()[p * n:(p + 1) * n])

    def split(self, ours: list, key: str) -> None:
        shape = self._need(key)
        n = shape[0] // len(ours)
        if shape[0] % len(ours):
            raise MQUserError(f"{shown(self.src)}: tensor {key} has {shape[0]} rows, not {len(ours)} equal parts")
        for p, name in enumerate(ours):
            self._add(name, (n,) + shape[1:], key, lambda p=p: self.base.get(key)[p * n:(p + 1) * n])

    def check_used(self) -> None:
        # a shared block's module holds the adapters of every depth that applies it, and untied (or both present)
        # copies hold them again: transformers leaves those unused, and so do we (a tensor of a kind no depth
        # reads, e.g. q/k/v adapters without use_shared_attention_adapter, is refused)
        kinds = {_kind(k) for k in self.used if _SHARED.match(k)}
        rest = sorted(k for k in self.base.shapes
                      if k not in self.used and not (_SHARED.match(k) and _kind(k) in kinds))
        if rest:
            raise MQUserError(f"{shown(self.src)}: {len(rest)} tensors a Zamba2 model of this config does not have "
                              f"(e.g. {', '.join(rest[:3])})")

    def get(self, name):
        return self.make[name]()


def _map(base: TensorSource, src: str, layers: list, hybrid: list, mem_blocks: int, adapters: bool,
         tied: bool) -> _Zamba2Tensors:
    t = _Zamba2Tensors(base, src)
    t.copy("embedding.weight", "model.embed_tokens.weight")
    t.copy("norm_f.weight", "model.final_layernorm.weight")
    if not tied:
        if "lm_head.weight" not in base.shapes:
            raise MQUserError(f"{shown(src)}: untied head (tie_word_embeddings false) but no lm_head.weight")
        t.copy("lm_head.weight", "lm_head.weight")
    elif "lm_head.weight" in base.shapes:
        t.used.add("lm_head.weight")          # the tied head (load_into reads the embedding)
    for i, cfg in enumerate(layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        mamba = hf + ("mamba_decoder.mamba." if cfg.shared else "mamba.")
        t.copy(ours + "norm.weight", hf + ("mamba_decoder.input_layernorm.weight" if cfg.shared
                                           else "input_layernorm.weight"))
        names = _MAMBA + (("in_proj.bias", "out_proj.bias") if cfg.mamba.bias else ())
        for p in names:
            t.copy(f"{ours}mixer.mamba.{p}", mamba + p)
        if not cfg.shared:
            continue
        j = hybrid.index(i)
        source = f"model.layers.{hybrid[j % mem_blocks]}.shared_transformer."

        def w(name, own=hf + "shared_transformer.", source=source):
            # transformers ties layer i's shared block to its source's, unless the file holds layer i's own
            # tensor (tie_word_embeddings false, or both present and different: then it does not tie them)
            return own + name if any(own + name + x in base.shapes for x in ("", ".0.weight")) else source + name

        t.copy(ours + "mixer.linear.weight", hf + "linear.weight")
        for p in "qkv":
            t.merged([f"{ours}mixer.self_attn.{p}_proj.weight"], w(f"self_attn.{p}_proj.weight"),
                     w(f"self_attn.linear_{p}_adapter_list.{j}") if adapters else None, w("input_layernorm.weight"))
        t.copy(ours + "mixer.self_attn.o_proj.weight", w("self_attn.o_proj.weight"))
        ff = ours + "mixer.feed_forward."
        t.merged([ff + "gate_proj.weight", ff + "up_proj.weight"], w("feed_forward.gate_up_proj.weight"),
                 w(f"feed_forward.gate_up_proj_adapter_list.{j}"), w("pre_ff_layernorm.weight"), parts=2)
        t.copy(ff + "down_proj.weight", w("feed_forward.down_proj.weight"))
        if cfg.mlp.bias:
            t.split([ff + "gate_proj.bias", ff + "up_proj.bias"], w("feed_forward.gate_up_proj.bias"))
            t.copy(ff + "down_proj.bias", w("feed_forward.down_proj.bias"))
    t.check_used()
    return t


def load_hf(path):
    cfg_path = os.path.join(path, "config.json")
    c = read_json(cfg_path)
    layers, hybrid, mem_blocks, adapters = layer_configs(c, cfg_path)
    tied = json_flag(c, "tie_word_embeddings", True, cfg_path)
    vocab = c.get("vocab_size", 32000)
    cfg = config_for(cfg_path, lambda: MambaLMConfig(
        d_model=layers[0].d_model, n_layer=len(layers), vocab_size=vocab, layers=layers,
        norm_eps=c.get("rms_norm_eps", 1e-5), residual_in_fp32=False, tie_embeddings=tied,
        eos_token_id=eos_token(c, vocab)))
    src, tensors = hf_tensor_source(path, "HF Zamba2")
    tensors = _map(tensors, src, layers, hybrid, mem_blocks, adapters, tied)
    with torch.no_grad():
        return load_into(cfg, tensors, src, cfg_path), cfg, with_tokenizer(path, {})
