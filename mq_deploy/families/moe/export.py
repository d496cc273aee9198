"""The MoE block's ONNX emitter.

Tokens are flattened to [T, d]. The router is float32 (MatMul, then the config's scoring: Softmax/TopK,
TopK/Softmax, or Sigmoid + correction bias + group mask (ScatterElements, Where) + TopK/GatherElements),
giving k (weight, expert) pairs per token. The experts then run in one of two forms, chosen at run time
by an `If` on the number of (token, expert) pairs:

- T * k <= experts (a decode step, a short prompt): **gathered**. The chosen experts' weights are
  Gathered per token ([T, k, out, in], int8 codes and their per-channel scales in a quantized graph,
  dequantized as Cast * scale, bitwise what DequantizeLinear computes) and applied as batched MatMuls:
  the cost is O(T * k) expert matrices, never O(experts).
- otherwise (a prefill): **dense over experts**, the fallback. Every expert runs on every token (up/gate
  as one MatMul [d, experts * d_ff]; down as a batched MatMul per expert) and the outputs are summed
  with the routing weights scattered into [T, experts] (zero for the experts not chosen): O(experts)
  compute per token. Why: the gathered form at large T copies T * k expert matrices (for a long prompt,
  gigabytes of weights), and the form that stays O(k) for many tokens, tokens grouped by expert, needs a
  Loop over experts with data-dependent shapes (NonZero, Gather, ScatterND) whose body ONNX Runtime runs
  expert after expert; it is not written here, and which of the two is faster at real sizes is not
  measured. Both written forms compute the same function (tests/test_moe.py runs both).

Quant points as in PyTorch: the experts' (and the shared expert's) input `in`, each expert's down
input `down_proj` after the online Hadamard, the shared expert's `shared_down`. Inside the If both forms
hold the experts' weights as int8 codes (W4: int4 codes in int8 tensors) with per-(expert, channel)
scales and dequantize them as Cast * scale, bitwise what DequantizeLinear computes: ONNX Runtime's QDQ
fusions look up a DequantizeLinear's weight among the initializers of its own graph, and an If branch
reads them from the outer graph, so a session would not load ("Missing required weight"). The cost is
that the routed experts' matmuls run in float32 on dequantized weights, not as int8 GEMMs. The router
and the shared expert sit outside the If, the shared expert in the standard QDQ form.
"""

from __future__ import annotations

import numpy as np

from mq_deploy.families.mlp.export import _act
from mq_deploy.models.points import weight_key

FUSED_STEP = False


def _route(g, mixer, h):
    """h [T, d] float -> (weights [T, k], expert indices [T, k] int64)."""
    b, cfg = g.b, mixer.cfg
    logits = b.op("MatMul", [h, b.f32(mixer.router.weight.t(), "router")], "router_logits")
    k = b.i64([cfg.top_k])
    if cfg.router == "softmax":
        w, idx = b.op("TopK", [b.op("Softmax", [logits], axis=-1), k], "topk", n_out=2, axis=-1)
    elif cfg.router == "topk_softmax":
        top, idx = b.op("TopK", [logits, k], "topk", n_out=2, axis=-1)
        w = b.op("Softmax", [top], axis=-1)
    else:
        scores = b.op("Sigmoid", [logits], "scores")
        choice = scores
        if mixer.e_score_correction_bias is not None:
            choice = b.op("Add", [scores, b.f32(mixer.e_score_correction_bias, "score_bias")])
        if cfg.n_group > 1:
            per = cfg.n_experts // cfg.n_group
            g3 = b.op("Reshape", [choice, b.i64([-1, cfg.n_group, per])])
            top2 = b.op("TopK", [g3, b.i64([2])], n_out=2, axis=-1)[0]
            gs = b.op("ReduceSum", [top2, b.i64([-1])], keepdims=0)                       # [T, groups]
            gi = b.op("TopK", [gs, b.i64([cfg.topk_group])], n_out=2, axis=-1)[1]
            zeros = b.op("Mul", [gs, b.f32(np.array(0.0), "zero")])
            ones = b.op("Add", [b.op("Mul", [b.op("Cast", [gi], to=1), b.f32(np.array(0.0), "zero")]),
                                b.f32(np.array(1.0), "one")])
            keep = b.op("ScatterElements", [zeros, gi, ones], axis=1)                    # [T, groups] 0/1
            keep = b.op("Expand", [b.op("Unsqueeze", [keep, b.i64([-1])]), b.op("Shape", [g3])])
            keep = b.op("Reshape", [keep, b.i64([-1, cfg.n_experts])])
            choice = b.op("Where", [b.op("Greater", [keep, b.f32(np.array(0.5), "half")]), choice,
                                    b.f32(np.array(-np.inf, dtype=np.float32), "neg_inf")])
        idx = b.op("TopK", [choice, k], "topk", n_out=2, axis=-1)[1]
        w = b.op("GatherElements", [scores, idx], axis=1)
    if cfg.norm_topk_prob:
        den = b.op("Add", [b.op("ReduceSum", [w, b.i64([-1])], keepdims=1), b.f32(np.array(1e-20), "eps")])
        w = b.op("Div", [w, den])
    if cfg.routed_scaling_factor != 1.0:
        w = b.op("Mul", [w, b.f32(np.array(cfg.routed_scaling_factor), "routed_scaling")])
    return w, idx


def _activate(g, mixer, up, gate):
    act = mixer.cfg.act
    return _act(g.b, act, up) if gate is None else g.b.op("Mul", [_act(g.b, act, gate), up])


def _gathered_weight(g, experts, name, idx):
    """The chosen experts' weights [T, k, out, in] of a stacked projection."""
    b = g.b
    n, o, i = experts.n, experts.out_features, experts.in_features
    if g.quant is None:
        return b.op("Gather", [b.f32(experts.stacked(), "experts_w"), idx], axis=0)
    q, s = g.grid(name, experts.weight)
    qg = b.op("Gather", [b.const(np.ascontiguousarray(q.numpy().reshape(n, o, i)), "experts_q"), idx], axis=0)
    sg = b.op("Gather", [b.f32(s.reshape(n, o, 1), "experts_scale"), idx], axis=0)      # [T, k, out, 1]
    return b.op("Mul", [b.op("Cast", [qg], to=1), sg], "experts_dq")


def _gathered(g, mixer, prefix, x, w, idx):
    """O(k): x [T, d] -> [T, d] through each token's chosen experts."""
    b, cfg = g.b, mixer.cfg
    xc = b.op("Reshape", [x, b.i64([0, 1, cfg.d_model, 1])])                           # [T, 1, d, 1]

    def proj(experts, site, inp):
        wt = _gathered_weight(g, experts, weight_key(prefix, site), idx)
        return b.op("Squeeze", [b.op("MatMul", [wt, inp]), b.i64([-1])])

    up = proj(mixer.up_proj, "up_proj", xc)                                              # [T, k, d_ff]
    gate = proj(mixer.gate_proj, "gate_proj", xc) if mixer.gate_proj is not None else None
    y = _activate(g, mixer, up, gate)
    if mixer.out_rotation is not None:
        y = g.online_rotation(y, mixer.out_rotation)
    y = g.qdq(y, prefix + "down_proj")
    out = proj(mixer.down_proj, "down_proj", b.op("Unsqueeze", [y, b.i64([-1])]))       # [T, k, d]
    out = b.op("Mul", [out, b.op("Unsqueeze", [w, b.i64([-1])])])
    return b.op("ReduceSum", [out, b.i64([1])], keepdims=0)


def _stacked_weight(g, experts, name, transpose: bool):
    """A whole stacked projection, [experts * out, in] (or transposed): float, or int8 codes Cast * scale.
    Not DequantizeLinear: ONNX Runtime's QDQ fusions look for a DequantizeLinear's weight among the
    initializers of the graph the node is in, and inside an If branch it lives in the outer graph (the
    session then fails to load: "Missing required weight")."""
    b = g.b
    if g.quant is None:
        return b.f32(experts.weight.t() if transpose else experts.weight, "experts_w")
    q, s = g.grid(name, experts.weight)
    q, s = (q.t(), s.reshape(1, -1)) if transpose else (q, s.reshape(-1, 1))
    return b.op("Mul", [b.op("Cast", [b.const(np.ascontiguousarray(q.numpy()), "experts_q")], to=1),
                        b.f32(s, "experts_scale")], "experts_dq")


def _dense(g, mixer, prefix, x, w, idx):
    """O(experts): every expert on every token, weighted by the routing weights (0 where not chosen)."""
    b, cfg = g.b, mixer.cfg
    n, f, d = cfg.n_experts, cfg.d_ff, cfg.d_model

    def split(t):
        return b.op("Reshape", [t, b.i64([0, n, f])])                                  # [T, experts, d_ff]

    def proj(experts, site):
        return split(b.op("MatMul", [x, _stacked_weight(g, experts, weight_key(prefix, site), transpose=True)]))

    up = proj(mixer.up_proj, "up_proj")
    gate = proj(mixer.gate_proj, "gate_proj") if mixer.gate_proj is not None else None
    y = _activate(g, mixer, up, gate)
    if mixer.out_rotation is not None:
        y = g.online_rotation(y, mixer.out_rotation)
    y = g.qdq(y, prefix + "down_proj")
    wd = b.op("Reshape", [_stacked_weight(g, mixer.down_proj, weight_key(prefix, "down_proj"), transpose=False),
                          b.i64([n, d, f])])
    out = b.op("MatMul", [wd, b.op("Transpose", [y], perm=[1, 2, 0])])                   # [experts, d, T]
    dense_w = b.op("ScatterElements", [b.op("Mul", [b.op("Slice", [x, b.i64([0]), b.i64([1]), b.i64([1])]),
                                                    b.f32(np.zeros((1, n)), "zeros_e")]), idx, w], axis=1)
    out = b.op("Mul", [out, b.op("Unsqueeze", [b.op("Transpose", [dense_w], perm=[1, 0]), b.i64([1])])])
    return b.op("Transpose", [b.op("ReduceSum", [out, b.i64([0])], keepdims=0)], perm=[1, 0])


def _branch_graph(g, fn, name):
    """fn() emitted into a graph of its own (an If branch; it reads the outer graph's values)."""
    from onnx import TensorProto, helper

    b = g.b
    outer, b.nodes = b.nodes, []
    try:
        out = fn()
        nodes = b.nodes
    finally:
        b.nodes = outer
    res = b.name(name + "_out")
    nodes.append(helper.make_node("Identity", [out], [res]))
    return helper.make_graph(nodes, b.name(name), [], [helper.make_tensor_value_info(res, TensorProto.FLOAT, None)])


def _shared(g, mixer, prefix, x):
    b, cfg = g.b, mixer.cfg
    if mixer.shared_gate is not None:    # one MatMul for both (graph._Graph.linears)
        up, gate = g.linears(x, [(mixer.shared_up, weight_key(prefix, "shared_up")),
                                 (mixer.shared_gate, weight_key(prefix, "shared_gate"))])
        y = b.op("Mul", [_act(b, cfg.shared_act, gate), up])
    else:
        y = _act(b, cfg.shared_act, g.linear(x, mixer.shared_up, weight_key(prefix, "shared_up")))
    if mixer.shared_rotation is not None:
        y = g.online_rotation(b.op("Unsqueeze", [y, b.i64([0])]), mixer.shared_rotation)
        y = b.op("Squeeze", [y, b.i64([0])])
    return g.linear(g.qdq(y, prefix + "shared_down"), mixer.shared_down, weight_key(prefix, "shared_down"))


def emit(g, mixer, prefix, h, state=None):
    b, cfg = g.b, mixer.cfg
    h2 = b.op("Reshape", [h, b.i64([-1, cfg.d_model])], "moe_tokens")                  # [T, d]
    w, idx = _route(g, mixer, h2)
    x = g.qdq(h2, prefix + "in")
    pairs = b.op("Mul", [b.op("Shape", [h2], start=0, end=1), b.i64([cfg.top_k])])
    few = b.op("LessOrEqual", [pairs, b.i64([cfg.n_experts])])
    few = b.op("Squeeze", [few, b.i64([0])])
    out = b.op("If", [few], "experts",
               then_branch=_branch_graph(g, lambda: _gathered(g, mixer, prefix, x, w, idx), "gathered"),
               else_branch=_branch_graph(g, lambda: _dense(g, mixer, prefix, x, w, idx), "dense"))
    if mixer.shared_down is not None:
        out = b.op("Add", [out, _shared(g, mixer, prefix, x)])
    return b.op("Reshape", [out, b.op("Shape", [h])], "moe_out"), ()


def functions(mixer_cfg, quantized: bool, op_types: set, opset: int) -> list:
    return []
