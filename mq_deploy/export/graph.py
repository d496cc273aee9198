"""Float32 ONNX graphs of our Mamba LM and Vim, with mq::SelectiveScan nodes (function bodies included).

Batch and sequence length are dynamic; the graph does not depend on the sequence length. This is
the FP baseline export; QDQ quantization, the decode-step graph and the CLI come with issue 4.
"""

from __future__ import annotations

import numpy as np
import torch

from mq_deploy.export.scan_op import DOMAIN, OP, selective_scan_function
from mq_deploy.models.mamba import MambaLM

OPSET = 21
IR_VERSION = 10          # what ONNX Runtime >= 1.18 loads


class _Builder:
    """Collects nodes and initializers with unique names."""

    def __init__(self):
        self.nodes, self.inits, self._n = [], [], 0

    def name(self, hint):
        self._n += 1
        return f"{hint}_{self._n}"

    def const(self, array, hint="c"):
        from onnx import numpy_helper

        name = self.name(hint)
        array = np.asarray(array)
        self.inits.append(numpy_helper.from_array(array if array.flags.c_contiguous else array.copy(), name))
        return name

    def weight(self, t: torch.Tensor, hint):
        return self.const(t.detach().float().numpy(), hint)

    def op(self, op_type, inputs, hint=None, n_out=1, domain=None, **attrs):
        from onnx import helper

        outs = [self.name(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def i64(self, values, hint="i"):
        return self.const(np.asarray(values, dtype=np.int64), hint)

    # -- composites ----------------------------------------------------------------------------------
    def linear(self, x, lin):
        y = self.op("MatMul", [x, self.weight(lin.weight.t(), "w")])
        return self.op("Add", [y, self.weight(lin.bias, "b")]) if lin.bias is not None else y

    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def rms_norm(self, x, norm):
        ms = self.op("ReduceMean", [self.op("Mul", [x, x]), self.i64([-1])], keepdims=1)
        eps = self.const(np.array(norm.eps, dtype=np.float32), "eps")
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [ms, eps])])])
        return self.op("Mul", [self.op("Mul", [x, inv]), self.weight(norm.weight, "norm_w")])

    def flip_time(self, x):
        return self.op("Slice", [x, self.i64([-1]), self.i64([np.iinfo(np.int64).min]), self.i64([1]),
                                 self.i64([-1])], "flip")


def _branch(b: _Builder, mixer, x, z, s):
    from onnx import TensorProto, helper

    cfg = mixer.cfg
    conv = getattr(mixer, "conv1d" + s)
    k = cfg.d_conv
    xt = b.op("Transpose", [x], perm=[0, 2, 1])                    # [b, Di, L]
    conv_in = [xt, b.weight(conv.weight, "conv_w")] + ([b.weight(conv.bias, "conv_b")] if conv.bias is not None else [])
    xc = b.op("Conv", conv_in, group=cfg.d_inner, kernel_shape=[k], pads=[k - 1, 0])
    xc = b.silu(b.op("Transpose", [xc], perm=[0, 2, 1]))
    dt_low, Bm, Cm = b.op("Split", [b.linear(xc, getattr(mixer, "x_proj" + s)),
                                    b.i64([cfg.dt_rank, cfg.d_state, cfg.d_state])], n_out=3, axis=-1)
    dt_proj = getattr(mixer, "dt_proj" + s)
    dt = b.op("MatMul", [dt_low, b.weight(dt_proj.weight.t(), "dt_w")])
    A = -torch.exp(getattr(mixer, "A_b_log" if s else "A_log").detach().double()).float()
    # zero initial state [batch, Di, N] from the runtime batch size
    batch = b.op("Gather", [b.op("Shape", [x]), b.i64([0])], axis=0)
    h0 = b.op("ConstantOfShape", [b.op("Concat", [batch, b.i64([cfg.d_inner, cfg.d_state])], axis=0)],
              value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))
    y, _ = b.op(OP, [xc, dt, b.weight(A, "A"), Bm, Cm, b.weight(getattr(mixer, "D" + s), "D"), z,
                     b.weight(dt_proj.bias, "dt_bias"), h0], "scan", n_out=2, domain=DOMAIN)
    return y


def _mixer(b: _Builder, mixer, h):
    if mixer.gate_scale is not None:
        raise NotImplementedError("the float32 export has no Smooth-Fused gate yet (issue 4)")
    x, z = b.op("Split", [b.linear(h, mixer.in_proj), b.i64([mixer.cfg.d_inner] * 2)], n_out=2, axis=-1)
    y = _branch(b, mixer, x, z, "")
    if mixer.cfg.bimamba:
        y_b = b.flip_time(_branch(b, mixer, b.flip_time(x), b.flip_time(z), "_b"))
        y = b.op("Mul", [b.op("Add", [y, y_b]), b.const(np.array(0.5, dtype=np.float32), "half")])
    if mixer.out_rotation is not None:
        y = b.op("MatMul", [y, b.weight(mixer.out_rotation, "out_rot")])
    return b.linear(y, mixer.out_proj)


def _layers(b: _Builder, model, h):
    for layer in model.layers:
        h = b.op("Add", [h, _mixer(b, layer.mixer, b.rms_norm(h, layer.norm))], "residual")
    return b.rms_norm(h, model.norm_f)


def build_fp_model(model):
    """ModelProto of a float32 MambaLM (input_ids -> logits) or Vim (images -> logits)."""
    from onnx import TensorProto as T
    from onnx import helper

    b = _Builder()
    if isinstance(model, MambaLM):
        h = b.op("Gather", [b.weight(model.embedding.weight, "embedding"), "input_ids"], axis=0)
        logits = b.op("MatMul", [_layers(b, model, h), b.weight(model.lm_head.weight.t(), "lm_head")], "logits")
        inputs = [helper.make_tensor_value_info("input_ids", T.INT64, ["batch", "seq"])]
        out_shape = ["batch", "seq", model.cfg.vocab_size]
    else:
        cfg = model.cfg
        conv = model.patch_embed.proj
        p = b.op("Conv", ["images", b.weight(conv.weight, "patch_w"), b.weight(conv.bias, "patch_b")],
                 kernel_shape=[cfg.patch_size] * 2, strides=[cfg.stride] * 2)
        p = b.op("Transpose", [b.op("Reshape", [p, b.i64([0, cfg.d_model, -1])])], perm=[0, 2, 1])   # [b, M, d]
        pos = model.token_position
        batch = b.op("Gather", [b.op("Shape", ["images"]), b.i64([0])], axis=0)
        cls = b.op("Expand", [b.weight(model.cls_token, "cls"), b.op("Concat", [batch, b.i64([1, cfg.d_model])],
                                                                        axis=0)])
        head = b.op("Slice", [p, b.i64([0]), b.i64([pos]), b.i64([1])])
        tail = b.op("Slice", [p, b.i64([pos]), b.i64([cfg.num_patches]), b.i64([1])])
        h = b.op("Add", [b.op("Concat", [head, cls, tail], axis=1), b.weight(model.pos_embed, "pos_embed")])
        feat = b.op("Gather", [_layers(b, model, h), b.i64(pos)], axis=1)
        logits = b.linear(feat, model.head)
        inputs = [helper.make_tensor_value_info("images", T.FLOAT,
                                                ["batch", cfg.in_chans, cfg.img_size, cfg.img_size])]
        out_shape = ["batch", cfg.num_classes]
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    graph = helper.make_graph(b.nodes, "mq_deploy_fp", inputs,
                              [helper.make_tensor_value_info("logits", T.FLOAT, out_shape)], initializer=b.inits)
    return helper.make_model(graph, functions=[selective_scan_function(OPSET)], ir_version=IR_VERSION,
                             opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)],
                             producer_name="mq-deploy")
