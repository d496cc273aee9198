"""A hybrid's decode-step graph as Triton's implicit state can carry it (`--backend onnxruntime`).

Triton keeps a variable-size state (a KV cache, `dims: [1, kv_heads, -1, head_dim]`) itself, but it starts
every sequence with each variable dimension set to 1 (triton-inference-server/core, SequenceStates::
Initialize: "Convert the variable dimensions to 1 for the first request"); an `initial_state` cannot say 0.
Fed to our step graph, that zero slot would be one more key, attended at every step.

So the repository gets a copy of the step graph whose every KV cache carries one leading slot that is never
attended: the graph reads `past[:, :, 1:]` as the cache, and writes `concat(past[:, :, :1], present)`.
Triton's first request feeds the length-1 zeros, i.e. an empty cache; each later request feeds back what
the last one wrote. Everything else, the SSM states included, is the export's own graph, node for node, so
the logits are the export's bit for bit (tests/test_serve.py runs both). The copy says so in its metadata
(`mq.kv_cache: sentinel`): OrtRunner and `generate` start its caches at one slot, `verify` refuses it.
"""

from __future__ import annotations

from mq_deploy.errors import MQUserError

INT64_MAX = 2 ** 63 - 1


def _subgraph_inputs(node) -> set:
    """Names read inside a node's subgraphs (If/Loop/Scan bodies), recursively."""
    import onnx

    out = set()
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
        for g in graphs:
            for n in g.node:
                out.update(n.input)
                out |= _subgraph_inputs(n)
    return out


def rewire(proto, pairs, why: str) -> None:
    """A repository copy's common step: for each (input, output, inner input name, inner output name) of
    `pairs`, the graph's own nodes read the input as `inner input` and write (and read) the output as `inner
    output`, so that nodes put before and after them (finish) connect the graph's inputs and outputs. why:
    what the copy does, for the one line when a name is missing or read inside a subgraph."""
    g = proto.graph
    inputs = {i.name for i in g.input}
    outputs = {o.name for o in g.output}
    inner = set().union(*(_subgraph_inputs(n) for n in g.node))   # names read inside If/Loop/Scan bodies
    for inp, out, inp_inner, out_inner in pairs:
        if inp not in inputs or out not in outputs:
            raise MQUserError(f"the step graph has no {inp} input / {out} output its metadata implies; export it again")
        if inp in inner or out in inner:
            raise MQUserError(f"the step graph reads {inp} inside a subgraph; cannot {why}")
        for n in g.node:
            for k, name in enumerate(n.input):
                if name == inp:
                    n.input[k] = inp_inner
                elif name == out:
                    n.input[k] = out_inner
            for k, name in enumerate(n.output):
                if name == out:
                    n.output[k] = out_inner


def finish(proto, head, tail, key: str, value: str) -> None:
    """The rewired graph between `head` and `tail` nodes, and its metadata key set to value (what runners read)."""
    g = proto.graph
    nodes = head + list(g.node) + tail
    del g.node[:]
    g.node.extend(nodes)
    meta = {p.key: p for p in proto.metadata_props}
    if key in meta:
        meta[key].value = value
    else:
        proto.metadata_props.add(key=key, value=value)


def write_copy(src: str, dst: str, rewrite, *args) -> None:
    """The step graph `src` rewritten in place by rewrite(proto, *args), written to `dst` (external data stays
    referenced by the same relative names; the repository copies those files beside it)."""
    import onnx

    proto = onnx.load(src, load_external_data=False)
    rewrite(proto, *args)
    onnx.save(proto, dst)


def sentinel_proto(proto, caches) -> None:
    """Rewrite `proto` in place. caches: [(input, output, axis)] of every growing state (axis: its length)."""
    import numpy as np
    from onnx import helper, numpy_helper

    g = proto.graph
    rewire(proto, [(inp, out, f"{inp}__cache", f"{out}__fresh") for inp, out, _ in caches],
           "give it Triton's cache slot")
    head, tail = [], []
    for inp, out, axis in caches:
        cache, fresh, slot = f"{inp}__cache", f"{out}__fresh", f"{inp}__slot"
        consts = {f"{inp}__c{v}": v for v in (0, 1, INT64_MAX)}
        consts[f"{inp}__axis"] = axis
        for name, v in consts.items():
            g.initializer.append(numpy_helper.from_array(np.asarray([v], np.int64), name))
        head.append(helper.make_node("Slice", [inp, f"{inp}__c1", f"{inp}__c{INT64_MAX}", f"{inp}__axis"], [cache],
                                     name=f"{inp}__drop_slot"))
        head.append(helper.make_node("Slice", [inp, f"{inp}__c0", f"{inp}__c1", f"{inp}__axis"], [slot],
                                     name=f"{inp}__keep_slot"))
        tail.append(helper.make_node("Concat", [slot, fresh], [out], name=f"{out}__with_slot", axis=axis))
    finish(proto, head, tail, "mq.kv_cache", "sentinel")


def write_sentinel_copy(src: str, dst: str, caches) -> None:
    """The step graph `src` with Triton's cache slot, written to `dst` (write_copy)."""
    write_copy(src, dst, sentinel_proto, caches)
