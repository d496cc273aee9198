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

    from mq_deploy.serve.kv_sentinel import _subgraph_inputs

    g = proto.graph
    inputs = {i.name: i for i in g.input}
    outputs = {o.name: o for o in g.output}
    inner = set().union(*(_subgraph_inputs(n) for n in g.node))
    head, tail = [], []
    for inp, out in states:
        if inp not in inputs or out not in outputs:
            raise MQUserError(f"the step graph has no {inp} input / {out} output its metadata implies; export it again")
        if inp in inner or out in inner:
            raise MQUserError(f"the step graph reads {inp} inside a subgraph; cannot make its batch the first axis")
        rank = len(inputs[inp].type.tensor_type.shape.dim)
        perm = [1, 0] + list(range(2, rank))
        layered, fresh = f"{inp}__layers_first", f"{out}__layers_first"
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == inp:
                    n.input[k] = layered
                elif name == out:
                    n.input[k] = fresh
            for k, name in enumerate(n.output):
                if name == out:
                    n.output[k] = fresh
        head.append(helper.make_node("Transpose", [inp], [layered], name=f"{inp}__to_layers_first", perm=perm))
        tail.append(helper.make_node("Transpose", [fresh], [out], name=f"{out}__to_batch_first", perm=perm))
        _swap01(inputs[inp])
        _swap01(outputs[out])
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    meta = {p.key: p for p in proto.metadata_props}
    if "mq.state_layout" in meta:
        meta["mq.state_layout"].value = "batch_first"
    else:
        proto.metadata_props.add(key="mq.state_layout", value="batch_first")


def write_batch_first_copy(src: str, dst: str, states) -> None:
    """The step graph `src` with batch-first states, written to `dst` (external data stays referenced by the
    same relative names; the repository copies those files beside it)."""
    import onnx

    proto = onnx.load(src, load_external_data=False)
    batch_first_proto(proto, states)
    onnx.save(proto, dst)
