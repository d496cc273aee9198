"""The attention block's ONNX emitter: q/k/v projections, RoPE from the cache's length, the KV cache
concatenated along time (float32, or int8 with a QuantizeLinear / DequantizeLinear per head at its ends:
AttentionConfig.kv_cache), grouped-query scores with the causal mask, softmax, values, o_proj. Standard ops
only (MatMul, Softmax, Trilu), so every runtime runs it; the graph does not grow with the length."""

from __future__ import annotations

import numpy as np

from mq_deploy.models.points import weight_key

FUSED_STEP = False


def _heads(b, t, n, hd):
    return b.op("Transpose", [b.op("Reshape", [t, b.i64([0, 0, n, hd])])], perm=[0, 2, 1, 3])   # [b, n, L, hd]


def _rope(b, t, cos, sin, cfg):
    r = cfg.rope_dim
    if r < cfg.head_dim:
        t, rest = b.op("Split", [t, b.i64([r, cfg.head_dim - r])], n_out=2, axis=-1)
    x1, x2 = b.op("Split", [t, b.i64([r // 2, r // 2])], n_out=2, axis=-1)
    rotated = b.op("Concat", [b.op("Neg", [x2]), x1], axis=-1)
    out = b.op("Add", [b.op("Mul", [t, cos]), b.op("Mul", [rotated, sin])])
    return out if r == cfg.head_dim else b.op("Concat", [out, rest], axis=-1)


def projections(mixer, prefix) -> list:
    """[(linear, weight name)] of q, k and v, in that order (what emit's `qkv` holds the outputs of)."""
    return [(getattr(mixer, n), weight_key(prefix, n)) for n in ("q_proj", "k_proj", "v_proj")]


def emit(g, mixer, prefix, h, state=None, qkv=None):
    """h (the block norm's output) -> (o_proj output, (present key, present value) or (None, None)).
    state: None (full graph) or ((past_key, past_value), None): this layer's caches [b, kv_heads, T, hd].
    qkv: the q, k, v projections of h computed by the caller (a parallel block's one MatMul), or None."""
    from onnx import TensorProto, helper

    b, cfg = g.b, mixer.cfg
    H, K, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    q, k, v = qkv if qkv is not None else g.linears(g.qdq(h, prefix + "qkv"), projections(mixer, prefix))
    q, k, v = _heads(b, q, H, hd), _heads(b, k, K, hd), _heads(b, v, K, hd)
    past_k, past_v = state[0] if state is not None else (None, None)
    L = b.op("Shape", [h], start=1, end=2)     # [1]; of h: a second reader of x stops ORT fusing its int8 MatMul
    T = b.op("Shape", [past_k], start=2, end=3) if past_k is not None else b.i64([0])
    if cfg.rope_dim:
        pos = b.op("Cast", [b.op("Range", [b.op("Squeeze", [T]), b.op("Squeeze", [b.op("Add", [T, L])]),
                                           b.const(np.array(1, dtype=np.int64), "one")])], to=1)
        inv = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.rope_dim, 2, dtype=np.float64) / cfg.rope_dim))
        freqs = b.op("Mul", [b.op("Unsqueeze", [pos, b.i64([1])]), b.f32(inv[None, :], "rope_inv_freq")])
        emb = b.op("Concat", [freqs, freqs], axis=-1)                              # [L, rope_dim]
        cos, sin = b.op("Cos", [emb]), b.op("Sin", [emb])
        q, k = _rope(b, q, cos, sin, cfg), _rope(b, k, cos, sin, cfg)
    if cfg.kv_cache == "int8":      # the cache holds int8 (a scale per head, axis 1); attention reads it dequantized
        params = [[b.f32(mixer.kv_scale[j], "kv_scale"), b.const(np.zeros(K, dtype=np.int8), "kv_zp")]
                  for j in (0, 1)]
        k, v = (b.op("QuantizeLinear", [t, *params[j]], "kv_q", axis=1) for j, t in enumerate((k, v)))
    if past_k is not None:
        k = b.op("Concat", [past_k, k], axis=2)
        v = b.op("Concat", [past_v, v], axis=2)
    present = (k, v)
    if cfg.kv_cache == "int8":
        k, v = (b.op("DequantizeLinear", [t, *params[j]], "kv_dq", axis=1) for j, t in enumerate((k, v)))
    rep = H // K
    kr, vr = k, v
    if rep > 1:                            # each key/value head serves `rep` query heads
        kr, vr = (b.op("Reshape", [b.op("Expand", [b.op("Unsqueeze", [t, b.i64([2])]), b.i64([1, 1, rep, 1, 1])]),
                                   b.i64([0, H, -1, hd])]) for t in (k, v))
    scores = b.op("Mul", [b.op("MatMul", [q, b.op("Transpose", [kr], perm=[0, 1, 3, 2])]),
                          b.f32(np.array(cfg.score_scale), "attn_scale")])          # [b, H, L, T+L]
    total = b.op("Add", [T, L])
    ones = b.op("ConstantOfShape", [b.op("Concat", [L, total], axis=0)],
                value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]))
    visible = b.op("Cast", [b.op("Trilu", [ones, b.op("Squeeze", [T])], upper=0)], to=TensorProto.BOOL)  # j <= i+T
    scores = b.op("Where", [visible, scores, b.f32(np.array(-np.inf), "neg_inf")])
    y = b.op("MatMul", [b.op("Softmax", [scores], axis=-1), vr])                    # [b, H, L, hd]
    y = b.op("Reshape", [b.op("Transpose", [y], perm=[0, 2, 1, 3]), b.i64([0, 0, H * hd])])
    if mixer.out_rotation is not None:
        y = g.online_rotation(y, mixer.out_rotation)
    out = g.linear(g.qdq(y, prefix + "o_proj"), mixer.o_proj, weight_key(prefix, "o_proj"))
    return out, (present if past_k is not None else (None, None))


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    return []
