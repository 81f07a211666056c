"""Recognise the transformer building blocks onnxq rewrites, on canonical graphs.

A *canonical* graph is what :class:`~onnxq.passes.canonicalize.CanonicalizePass`
leaves behind: ``LayerNormalization`` nodes, linear layers as ``MatMul`` with a
constant ``[K, N]`` weight (optionally followed by ``Add`` of a constant bias),
``Gelu`` nodes and ``Softmax`` attention.

The matchers here only read the graph; passes use them to find their sites.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from onnxq.passes._ir_utils import const_array

__all__ = [
    "AttentionMatMul",
    "LinearUnit",
    "NormSite",
    "const_array",
    "find_attention_matmuls",
    "find_linears",
    "find_norm_sites",
    "module_of",
    "reaches_softmax",
]

# Ops that only move or mask data between a Softmax and the P.V MatMul or between the
# score MatMul and the Softmax.
_PASS_THROUGH = {"Where", "Cast", "Mul", "Div", "Add", "Identity", "Reshape", "Transpose", "Clip"}


def is_const(value: ir.Value | None) -> bool:
    """True if ``value`` is a constant (initializer or Constant node output)."""
    if value is None or value.is_graph_input():
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def module_of(node: ir.Node) -> str:
    """The PyTorch module path recorded on ``node`` by the exporter, or its name."""
    return node.metadata_props.get("onnxq.module", "") or (node.name or "")


@dataclasses.dataclass
class LinearUnit:
    """``y = x @ W (+ b)`` with a constant ``W`` of shape ``[K, N]``."""

    matmul: ir.Node
    weight: ir.Value
    bias_add: ir.Node | None
    bias: ir.Value | None

    @property
    def input(self) -> ir.Value:
        return self.matmul.inputs[0]

    @property
    def output(self) -> ir.Value:
        return self.bias_add.outputs[0] if self.bias_add is not None else self.matmul.outputs[0]

    @property
    def module(self) -> str:
        return module_of(self.matmul)


# MatMuls that implement a rotation rather than a layer (an online Hadamard) are
# not linear layers: they stay in floating point and get no outlier treatment.
_NOT_LAYERS = {"OnlineHadamardPass", "QuambaPass"}


def _linear_from_matmul(node: ir.Node) -> LinearUnit | None:
    if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
        return None
    if node.metadata_props.get("onnxq.pass") in _NOT_LAYERS:
        return None
    x, w = node.inputs
    if x is None or w is None or is_const(x) or not is_const(w):
        return None
    if w.shape is not None and len(w.shape) != 2:
        return None
    weight = const_array(w)
    if weight is None or weight.ndim != 2 or not np.issubdtype(weight.dtype, np.floating):
        return None
    bias_add = None
    bias = None
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) == 1 and not out.is_graph_output():
        user = uses[0].node
        if user.op_type == "Add" and user.domain == "":
            other = user.inputs[1 - uses[0].idx]
            arr = const_array(other)
            if arr is not None and arr.size == weight.shape[1] and arr.ndim >= 1:
                bias_add, bias = user, other
    return LinearUnit(node, w, bias_add, bias)


def find_linears(graph: ir.Graph) -> list[LinearUnit]:
    """All linear units of ``graph`` in graph order."""
    found = []
    for node in graph:
        unit = _linear_from_matmul(node)
        if unit is not None:
            found.append(unit)
    return found


def reaches_softmax(value: ir.Value, depth: int = 4) -> bool:
    """True if ``value`` flows into a Softmax through at most ``depth`` pass-through ops."""
    frontier = [value]
    for _ in range(depth + 1):
        nxt = []
        for v in frontier:
            for use in v.uses():
                node = use.node
                if node.op_type == "Softmax":
                    return True
                if node.op_type in _PASS_THROUGH:
                    nxt.extend(node.outputs)
        frontier = nxt
    return False


def _from_softmax(value: ir.Value, depth: int = 3) -> bool:
    v = value
    for _ in range(depth + 1):
        node = v.producer()
        if node is None:
            return False
        if node.op_type == "Softmax":
            return True
        if node.op_type not in _PASS_THROUGH:
            return False
        # follow the first non-constant input
        nxt = [i for i in node.inputs if i is not None and not is_const(i)]
        if node.op_type == "Where":
            nxt = [i for i in node.inputs[1:] if i is not None and not is_const(i)]
        if len(nxt) != 1:
            return False
        v = nxt[0]
    return False


@dataclasses.dataclass
class AttentionMatMul:
    """A MatMul between two activations inside attention: ``kind`` is "qk" or "pv"."""

    node: ir.Node
    kind: str

    @property
    def module(self) -> str:
        return module_of(self.node)


def find_attention_matmuls(graph: ir.Graph) -> list[AttentionMatMul]:
    """The Q·Kᵀ and P·V MatMuls of every attention block, in graph order."""
    found = []
    for node in graph:
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
            continue
        a, b = node.inputs
        if a is None or b is None or is_const(a) or is_const(b):
            continue
        if reaches_softmax(node.outputs[0]):
            found.append(AttentionMatMul(node, "qk"))
        elif _from_softmax(a):
            found.append(AttentionMatMul(node, "pv"))
    return found


@dataclasses.dataclass
class NormSite:
    """A normalisation node whose output feeds linear layers (and perhaps a residual).

    ``kind`` is "layernorm" (γ, β) or "rmsnorm" (γ only). ``linears`` are the
    consumers that are linear units; ``others`` every other consumer (for a
    post-LN model the residual ``Add`` of the next block).
    """

    norm: ir.Node
    kind: str
    linears: list[LinearUnit]
    others: list[ir.Node]

    @property
    def output(self) -> ir.Value:
        return self.norm.outputs[0]

    @property
    def module(self) -> str:
        return module_of(self.norm)


def _norm_kind(node: ir.Node) -> str | None:
    if node.op_type == "LayerNormalization" and node.domain == "":
        return "layernorm"
    if node.op_type in ("RMSNormalization",) and node.domain == "":
        return "rmsnorm"
    if node.op_type == "SimplifiedLayerNormalization":
        return "rmsnorm"
    return None


def find_norm_sites(graph: ir.Graph) -> list[NormSite]:
    """Normalisation nodes (last axis) whose output feeds at least one linear unit."""
    linears = {id(u.matmul): u for u in find_linears(graph)}
    sites = []
    for node in graph:
        kind = _norm_kind(node)
        if kind is None:
            continue
        axis = node.attributes.get_int("axis", -1)
        if axis not in (-1,) and not (
            node.inputs[0].shape is not None and axis == len(node.inputs[0].shape) - 1
        ):
            continue
        out = node.outputs[0]
        lin: list[LinearUnit] = []
        others: list[ir.Node] = []
        for use in out.uses():
            unit = linears.get(id(use.node))
            if unit is not None and use.idx == 0:
                lin.append(unit)
            else:
                others.append(use.node)
        if lin:
            sites.append(NormSite(node, kind, lin, others))
    return sites


def iter_nodes(graph: ir.Graph, op_types: Iterable[str]) -> Iterator[ir.Node]:
    wanted = set(op_types)
    for node in graph:
        if node.op_type in wanted and node.domain == "":
            yield node
