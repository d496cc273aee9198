"""A pure SSM decode-step graph whose states Triton can batch (`--backend onnxruntime`, max_batch_size > 0).

Triton's implicit state, with batching on, stacks each request's state along dimension 0 and hands the
model the batch there; our step graph's SSM states are [layers, batch, ...] (the layout every runner and the
fused step ops use). So the repository gets a copy whose every state input and output is batch-first,
[batch, layers, ...]: a Transpose (perm 1, 0, 2, ...) after each state input into the export's own graph, and
one after each state output. Every other node is the export's, so a batch of sequences gets what each
sequence alone gets, up to ONNX Runtime's blocking of its GEMMs for the batch size (tests/test_serve.py). The
copy says so in its metadata (`mq.state_layout: batch_first`); runners, `verify` and `triton` refuse it (they
take the export). A graph with KV caches keeps max_batch_size 0: Triton cannot stack caches of different
lengths.
"""

from __future__ import annotations

from mq_deploy.errors import MQUserError


def _swap01(value_info) -> None:
    dims = value_info.type.tensor_type.shape.dim
    if len(dims) < 2:
        raise MQUserError(f"state {value_info.name} has rank {len(dims)}; a stacked SSM state is [layers, batch, ...]")
    a, b = type(dims[0])(), type(dims[1])()
    a.CopyFrom(dims[1])
    b.CopyFrom(dims[0])
    dims[0].CopyFrom(a)
    dims[1].CopyFrom(b)


def batch_first_proto(proto, states) -> None:
    """Rewrite `proto` in place. states: [(input, output)] of the stacked SSM states ([layers, batch, ...])."""
    from onnx import helper

    from mq_deploy.serve.kv_sentinel import finish, rewire

    g = proto.graph
    rewire(proto, [(inp, out, f"{inp}__layers_first", f"{out}__layers_first") for inp, out in states],
           "make its batch the first axis")
    inputs = {i.name: i for i in g.input}
    outputs = {o.name: o for o in g.output}
    head, tail = [], []
    for inp, out in states:
        perm = [1, 0] + list(range(2, len(inputs[inp].type.tensor_type.shape.dim)))
        head.append(helper.make_node("Transpose", [inp], [f"{inp}__layers_first"], name=f"{inp}__to_layers_first",
                                     perm=perm))
        tail.append(helper.make_node("Transpose", [f"{out}__layers_first"], [out], name=f"{out}__to_batch_first",
                                     perm=perm))
        _swap01(inputs[inp])
        _swap01(outputs[out])
    finish(proto, head, tail, "mq.state_layout", "batch_first")


def write_batch_first_copy(src: str, dst: str, states) -> None:
    """The step graph `src` with batch-first states, written to `dst` (serve.kv_sentinel.write_copy)."""
    from mq_deploy.serve.kv_sentinel import write_copy

    write_copy(src, dst, batch_first_proto, states)
