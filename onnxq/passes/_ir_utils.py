"""Small onnx-ir helpers shared by the canonicalization passes.

Everything here reads or edits an :class:`onnx_ir.Model` through the onnx-ir API
only (no protobuf helpers).  Helpers are deliberately tiny; pattern matching
lives in the passes themselves.
"""

from __future__ import annotations

__all__ = [
    "PASS_KEY",
    "const_array",
    "drop_if_dead",
    "make_initializer",
    "opset",
    "scalar",
    "single_consumer",
    "tag",
    "unique_name",
]

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

#: Metadata key naming the onnxq pass that created a node.
PASS_KEY = "onnxq.pass"


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """Return the constant numpy value of ``value``, or None.

    A value is constant when it is an initializer that is not also a graph input
    (graph inputs can be overridden at run time) or the output of an ONNX-domain
    ``Constant`` node.

    Args:
        value: The value to inspect; None (an omitted optional input) is allowed.

    Returns:
        The array, or None when the value is not a known constant.
    """
    if value is None or value.is_graph_input():
        return None
    # Not ir.convenience.get_const_tensor: in onnx-ir 1.1 it renames the tensor held
    # by a Constant node's attribute, an edit that would break "no match, no change".
    tensor = value.const_value
    if tensor is None:
        tensor = _constant_node_tensor(value)
    if tensor is None:
        return None
    try:
        return tensor.numpy()
    except Exception:  # e.g. external data that cannot be read
        return None


_CONSTANT_DTYPES = {
    "value_float": np.float32,
    "value_floats": np.float32,
    "value_int": np.int64,
    "value_ints": np.int64,
}


def _constant_node_tensor(value: ir.Value) -> ir.TensorProtocol | None:
    """The tensor of the ``Constant`` node producing ``value``, read without edits."""
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.attributes) != 1:
        return None
    name, attr = next(iter(node.attributes.items()))
    if attr.is_ref():
        return None
    if name == "value":
        return attr.as_tensor()
    if name in _CONSTANT_DTYPES:
        return ir.tensor(np.array(attr.value, dtype=_CONSTANT_DTYPES[name]))
    return None


def scalar(value: ir.Value | None) -> float | None:
    """Return the float of a one-element constant ``value``, or None."""
    array = const_array(value)
    if array is None or array.size != 1 or array.dtype.kind not in "fiu":
        return None
    return float(array.reshape(()))


def opset(model: ir.Model) -> int:
    """Return the default-domain (``ai.onnx``) opset version imported by ``model``."""
    imports = model.opset_imports
    version = imports.get("", imports.get("ai.onnx"))
    return int(version) if version is not None else 0


def _taken_names(graph: ir.Graph) -> set[str]:
    names: set[str] = set()
    for value in (*graph.inputs, *graph.initializers.values()):
        if value.name:
            names.add(value.name)
    for node in ir.traversal.RecursiveGraphIterator(graph):
        if node.name:
            names.add(node.name)
        names.update(out.name for out in node.outputs if out.name)
    return names


def unique_name(graph_or_model: ir.Graph | ir.Model, base: str) -> str:
    """Return ``base``, or ``base_1``, ``base_2``…, whichever is first unused.

    Value names and node names share one namespace here, so the result is safe
    for either.  The scan is linear in the graph size.

    Args:
        graph_or_model: The graph (or the model whose main graph) to check.
        base: The preferred name, derived from the source value or node.

    Returns:
        A name not used by any value or node of the graph or its subgraphs.
    """
    graph = graph_or_model.graph if isinstance(graph_or_model, ir.Model) else graph_or_model
    taken = _taken_names(graph)
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def make_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph`` under a unique name.

    Args:
        graph: The graph that owns the initializer.
        name: The preferred name (made unique with :func:`unique_name`).
        array: The data; its dtype becomes the value's element type.

    Returns:
        The new initializer value.
    """
    name = unique_name(graph, name)
    tensor = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(
        name=name,
        shape=ir.Shape(tensor.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def single_consumer(value: ir.Value) -> ir.Node | None:
    """Return the only node reading ``value``, or None.

    None is returned when the value is a graph output, is read by no node, or is
    read by more than one node.  A node reading it twice (``Mul(x, x)``) counts
    once.
    """
    if value.is_graph_output():
        return None
    consumers = value.consumers()
    if len(consumers) != 1:
        return None
    return consumers[0]


def drop_if_dead(values: Iterable[ir.Value | None]) -> None:
    """Remove constants among ``values`` that nothing reads any more.

    Initializers are unregistered; ``Constant`` nodes are removed from their
    graph.  Graph inputs and outputs are never touched.
    """
    for value in values:
        if value is None or value.uses() or value.is_graph_output() or value.is_graph_input():
            continue
        if value.is_initializer():
            graph = value.graph
            if graph is not None and value.name in graph.initializers:
                graph.initializers.pop(value.name)
            continue
        producer = value.producer()
        if (
            producer is not None
            and producer.op_type == "Constant"
            and producer.domain == ""
            and producer.graph is not None
        ):
            producer.graph.remove(producer, safe=True)


def tag(node: ir.Node, pass_name: str, source: ir.Node | None = None) -> ir.Node:
    """Copy ``source``'s metadata onto ``node`` and mark it as made by ``pass_name``.

    Args:
        node: The inserted node.
        pass_name: The class name of the pass, stored under :data:`PASS_KEY`.
        source: The replaced node whose metadata (e.g. ``onnxq.module``) is kept.

    Returns:
        ``node``, for chaining.
    """
    if source is not None:
        node.metadata_props.update(source.metadata_props)
    node.metadata_props[PASS_KEY] = pass_name
    return node
