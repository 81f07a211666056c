"""Which graphs onnxq can convert: a clear refusal instead of a wrong or crashing result.

onnxq's passes understand graphs made of standard ONNX operators, as written by
``onnxq export``, Optimum or the PyTorch exporters (after canonicalization).
Graphs from other tools can hide the structures the passes rewrite inside
vendor operators: onnxruntime's transformer optimizer fuses the Q/K/V linears
into ``com.microsoft.Attention``, the residual Add + LayerNorm into
``SkipLayerNormalization`` and the bias + GELU into ``BiasGelu``/``FastGelu``;
those linears cannot be calibrated, folded or given Q/DQ, and TensorRT cannot
parse the ops at all. Graphs that are already quantized cannot be quantized
again. :func:`check_supported` refuses both with one line naming the nodes.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxq.errors import OnnxqError

__all__ = ["QUANTIZED_OPS", "STANDARD_DOMAINS", "UnsupportedModelError", "check_supported",
           "unsupported_nodes"]

#: Operator domains whose operators onnxq understands.
STANDARD_DOMAINS: frozenset[str] = frozenset({"", "ai.onnx"})

#: Standard operators that mean the graph is already quantized.
QUANTIZED_OPS: frozenset[str] = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearMatMul",
    "QLinearConv", "MatMulInteger", "ConvInteger",
})

_MAX_LISTED = 4


class UnsupportedModelError(OnnxqError):
    """The graph uses operators that onnxq cannot quantize."""


def unsupported_nodes(model: ir.Model) -> list[ir.Node]:
    """Nodes (subgraphs included, graph order) that onnxq's passes cannot handle.

    These are nodes outside the standard ONNX domain (unless they call a function
    defined in the model) and nodes of an already quantized graph.
    """
    functions = {(f.domain, f.name, f.overload) for f in model.functions.values()}
    found: list[ir.Node] = []
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain in STANDARD_DOMAINS:
            if node.op_type in QUANTIZED_OPS:
                found.append(node)
        elif (node.domain, node.op_type, node.overload) not in functions:
            found.append(node)
    return found


def _describe(node: ir.Node) -> str:
    domain = "" if node.domain in STANDARD_DOMAINS else f"{node.domain} "
    return f"{domain}{node.op_type}"


def check_supported(model: ir.Model) -> None:
    """Refuse a graph that onnxq cannot convert, with one line naming the nodes.

    Call it on the canonicalized graph, before calibration.

    Args:
        model: the model about to be converted.

    Raises:
        UnsupportedModelError: the graph holds operators outside the standard ONNX
            domain (e.g. onnxruntime's fused ``com.microsoft`` ``Attention``,
            ``SkipLayerNormalization``, ``EmbedLayerNormalization``, ``FastGelu``) or
            is already quantized (``QuantizeLinear``, ``QLinearMatMul``, ...).
    """
    nodes = unsupported_nodes(model)
    if not nodes:
        return
    first: dict[str, ir.Node] = {}
    counts: dict[str, int] = {}
    for node in nodes:
        key = _describe(node)
        first.setdefault(key, node)
        counts[key] = counts.get(key, 0) + 1
    parts = []
    for key, node in list(first.items())[:_MAX_LISTED]:
        more = f", {counts[key] - 1} more" if counts[key] > 1 else ""
        parts.append(f"{key} (node {node.name or '<unnamed>'}{more})")
    if len(first) > _MAX_LISTED:
        parts.append(f"and {len(first) - _MAX_LISTED} more operator types")
    listed = ", ".join(parts)
    if all(n.domain in STANDARD_DOMAINS for n in nodes):
        raise UnsupportedModelError(
            f"the graph is already quantized: it uses {listed}; "
            "onnxq converts floating-point graphs"
        )
    raise UnsupportedModelError(
        f"the graph uses {listed}, which onnxq cannot quantize; export with onnxq export "
        "or optimum without onnxruntime fusions"
    )
