"""Pure ONNX graph surgery on exported models (no runtime involved): the TensorRT parser's view of
our custom ops, and the fp16 scan-output rewrite.

How TensorRT's ONNX parser meets our op. onnx-tensorrt (ModelImporter.cpp, FallbackPluginImporter in
onnxOpImporters.cpp) dispatches each node by op_type alone: a built-in importer first, then a
model-local function of that name (it inlines the body), and only then the plugin registry with
(name = node.op_type, version = attribute `plugin_version` or "1", namespace = attribute
`plugin_namespace` or ""). The node's ONNX domain plays no part. So a TensorRT build
  1. removes the FunctionProto bodies of the ops that have a plugin (mq::SelectiveScan, mq::SSDScan), or the
     parser would inline the float Scan body instead of calling the plugin;
  2. writes plugin_namespace="mq" and plugin_version="1" on those nodes, because the creator in
     libmq_scan_trt.so is registered in namespace "mq" (not "", which would let any other library's
     "SelectiveScan" v1 creator bind our nodes).
Other mq ops keep their bodies (mq::SelectiveScanFloat, mq::Hadamard have no plugin; the parser
imports them as local functions).
"""

from __future__ import annotations

from typing import Iterable

PLUGIN_DOMAIN = "mq"
PLUGIN_OPS = ("SelectiveScan", "SSDScan")          # mq ops implemented by libmq_scan_trt.so
OUT_DTYPE_OPS = ("SelectiveScan",)                  # those with an out_dtype attribute (the fp16 output)
PLUGIN_NAMESPACE = "mq"                  # creator namespace in selective_scan_plugin.h
PLUGIN_VERSION = "1"


def iter_nodes(graph):
    """Every node of a graph, including those of subgraphs (If/Loop/Scan bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from iter_nodes(attr.g)
            for g in attr.graphs:
                yield from iter_nodes(g)


def all_nodes(model):
    yield from iter_nodes(model.graph)
    for fn in model.functions:
        yield from fn.node


def op_counts(model) -> dict:
    counts: dict = {}
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain and n.domain != "ai.onnx" else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return counts


def count_plugin_nodes(model, *, domain: str = PLUGIN_DOMAIN, op_types: Iterable[str] = PLUGIN_OPS) -> int:
    ops = set(op_types)
    return sum(1 for n in all_nodes(model) if n.domain == domain and n.op_type in ops)


def strip_function_bodies(model, *, domain: str = PLUGIN_DOMAIN, op_types: Iterable[str] | None = PLUGIN_OPS,
                          plugin_namespace: str | None = PLUGIN_NAMESPACE,
                          plugin_version: str | None = PLUGIN_VERSION):
    """A copy of `model` for TensorRT's ONNX parser: the FunctionProtos of `domain` whose names are in
    `op_types` (all of the domain when None) removed, and plugin_namespace / plugin_version written on
    their nodes (existing values are kept). Returns (model copy, names of the removed functions).
    The input model is not modified."""
    import onnx
    from onnx import helper

    stripped = onnx.ModelProto()
    stripped.CopyFrom(model)
    wanted = None if op_types is None else set(op_types)
    keep = [fn for fn in stripped.functions if not (fn.domain == domain and (wanted is None or fn.name in wanted))]
    removed = [fn.name for fn in stripped.functions if fn not in keep]
    del stripped.functions[:]
    stripped.functions.extend(keep)
    removed_set = set(removed)
    for node in all_nodes(stripped):
        if node.domain != domain or node.op_type not in removed_set:
            continue
        have = {a.name for a in node.attribute}
        if plugin_namespace is not None and "plugin_namespace" not in have:
            node.attribute.append(helper.make_attribute("plugin_namespace", plugin_namespace))
        if plugin_version is not None and "plugin_version" not in have:
            node.attribute.append(helper.make_attribute("plugin_version", plugin_version))
    return stripped, removed


def set_scan_out_dtype(model, out_dtype: int) -> int:
    """Set out_dtype on every plugin scan node and drop the value_info of their y outputs (which
    declared the old type); returns how many nodes were changed. Modifies `model`."""
    from onnx import helper

    n, ys = 0, set()
    for node in all_nodes(model):
        if node.domain != PLUGIN_DOMAIN or node.op_type not in OUT_DTYPE_OPS:
            continue
        for attr in list(node.attribute):
            if attr.name == "out_dtype":
                node.attribute.remove(attr)
        node.attribute.append(helper.make_attribute("out_dtype", int(out_dtype)))
        if node.output:
            ys.add(node.output[0])
        n += 1
    keep = [vi for vi in model.graph.value_info if vi.name not in ys]
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return n
