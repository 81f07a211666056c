"""Offline rotation of the residual stream (QuaRot's R1; Ashkboos et al., 2024), fused into weights.

Let ``Q`` be orthogonal (``Q Qᵀ = I``; here the randomised Hadamard
``diag(s) · H_d / √d`` of the hidden size ``d``, see :mod:`onnxq.passes.hadamard`).
A pre-norm decoder keeps a residual stream ``r`` that starts at the embedding
lookup and is only ever read by normalisations and written by residual ``Add`` s
of linear outputs.  Rotating every residual value ``r ↦ r Q`` leaves the function
unchanged when:

* embedding (and any other table added into the stream): ``E ← E Q``;
* writers (``o_proj``, ``down_proj``: ``y = h W + b`` added into the stream):
  ``W ← W Q``, ``b ← b Q``;
* readers: an RMSNorm ``n(r) = r / rms(r) ⊙ γ`` followed by linears ``h W``.
  First fold γ into the linears (``W ← diag(γ) W``, ``γ ← 1``); then
  ``rms(r Q) = rms(r)`` (``Q`` preserves the norm and the width) so
  ``n(r Q) = n(r) Q`` and ``W ← Qᵀ diag(γ) W`` restores ``n(r) diag(γ) W``.
  The final norm and ``lm_head`` are one more reader.

LayerNorm subtracts the mean, and ``mean(r Q) ≠ mean(r) Q``.  A pre-LN model is
made rotation-invariant first, as in SliceGPT / QuaRot (``convert_layernorm``):

* centre the stream: every embedding table and writer gets ``C = I − 11ᵀ/d``
  (``E ← E C``, ``W ← W C``, ``b ← b C``), so ``mean(r) = 0`` everywhere;
  LayerNorm is shift-invariant, so its outputs do not change;
* fold γ and β into the reader linears (``W ← diag(γ) W``, ``b ← b + β W``; a
  bias ``Add`` is created if needed);
* replace each LayerNorm (now γ = 1, β = 0, zero-mean input) by
  ``RMSNormalization`` with the same epsilon: ``var(r) = mean(r²)`` when
  ``mean(r) = 0``.  This needs opset ≥ 23; older graphs are refused.

and is then rotated as above (``C`` and ``Q`` are applied together).

Refused (with the reason): graphs whose residual stream cannot be fully mapped
(a stream value read by anything but a norm, a residual ``Add`` or a ``Shape``;
a norm output read by something other than linears, e.g. post-LN BERT/OPT-350m
where the norm output *is* the stream; a tied ``lm_head`` reading the embedding
table; non-constant weights; a hidden size without a Hadamard matrix).  A
refusal leaves the graph untouched (``modified=False``) and records the reason in
``result.skipped``.

Rotated nodes (embedding ``Gather``, norms, linears) are marked with
``metadata_props["onnxq.rotated"]``; a graph with marks is not rotated again.
Weights are rewritten in float64 and cast back to their dtype.  On RMSNorm graphs
the pass adds no nodes; the LayerNorm conversion replaces each LayerNorm by an
RMSNormalization and adds a bias ``Add`` to reader linears that had none (β ≠ 0),
all tagged ``onnxq.pass``.  Note that the per-token outputs of the stream change (e.g. a hidden-state
graph output would be rotated), which is why such graphs are refused.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from onnxq.passes._ir_utils import PASS_KEY, drop_if_dead, opset, unique_name
from onnxq.passes._patterns import LinearUnit, const_array, find_linears, module_of
from onnxq.passes.channel_fold import ChannelFoldResult, _set_const, fold_into_linear
from onnxq.passes.hadamard import is_supported, kron_factors, rotate_last

__all__ = ["ROTATED_KEY", "RotateResidualPass", "map_residual_stream"]

#: Metadata key marking nodes whose weights a rotation pass rewrote.
ROTATED_KEY = "onnxq.rotated"

_RMS_OPS = ("RMSNormalization", "SimplifiedLayerNormalization")
_SHAPE_ONLY = ("Shape", "Size")


@dataclasses.dataclass
class ResidualStream:
    """The mapped residual stream: where it starts, who reads and who writes it."""

    hidden: int
    embeddings: list[ir.Node]  # Gather nodes of constant tables added into the stream
    readers: list[tuple[ir.Node, list[LinearUnit]]]  # (norm, its linear consumers)
    writers: list[LinearUnit]
    adds: list[ir.Node]


def _is_table_gather(node: ir.Node) -> bool:
    if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
        return False
    table = const_array(node.inputs[0])
    return (table is not None and table.ndim == 2 and np.issubdtype(table.dtype, np.floating)
            and const_array(node.inputs[1]) is None)


def _norm_kind(node: ir.Node) -> str | None:
    if node.op_type == "LayerNormalization" and node.domain == "":
        return "layernorm"
    if node.op_type in _RMS_OPS:
        return "rmsnorm"
    return None


def map_residual_stream(graph: ir.Graph) -> ResidualStream | str:
    """Map the residual stream of ``graph``, or return why it cannot be mapped."""
    by_output: dict[int, LinearUnit] = {id(u.output): u for u in find_linears(graph)}
    by_matmul: dict[int, LinearUnit] = {id(u.matmul): u for u in by_output.values()}
    gathers = [n for n in graph if _is_table_gather(n)]
    gather_outs = {id(n.outputs[0]) for n in gathers}

    def starts_stream(node: ir.Node) -> bool:
        for use in node.outputs[0].uses():
            if _norm_kind(use.node) is not None:
                return True
            if use.node.op_type == "Add" and any(
                    id(i) in gather_outs for i in use.node.inputs if i is not node.outputs[0]):
                return True
        return False

    sources = [n for n in gathers if starts_stream(n)]
    if not sources:
        return "no embedding Gather feeding a normalisation or a residual Add was found"
    start = sources[0]
    hidden = const_array(start.inputs[0]).shape[1]
    embeddings = [start]
    readers: list[tuple[ir.Node, list[LinearUnit]]] = []
    writers: list[LinearUnit] = []
    adds: list[ir.Node] = []
    stream_ids = {id(start.outputs[0])}
    todo = [start.outputs[0]]
    while todo:
        value = todo.pop(0)
        if value.is_graph_output():
            return f"residual stream value {value.name!r} is a graph output"
        for use in value.uses():
            node = use.node
            kind = _norm_kind(node)
            if node.op_type in _SHAPE_ONLY:
                continue
            if kind is not None:
                if use.idx != 0:
                    return f"residual stream feeds {node.name!r} as its scale"
                axis = node.attributes.get_int("axis", -1)
                if axis != -1 and not (value.shape is not None and axis == len(value.shape) - 1):
                    return f"norm {node.name!r} does not normalise the last axis"
                if len(node.outputs) > 1 and any(o.uses() for o in node.outputs[1:]):
                    return f"norm {node.name!r} has used auxiliary outputs"
                out = node.outputs[0]
                if out.is_graph_output():
                    return f"norm output {out.name!r} is a graph output"
                lins = []
                for nuse in out.uses():
                    if nuse.node.op_type in _SHAPE_ONLY:
                        continue
                    unit = by_matmul.get(id(nuse.node))
                    if unit is None or nuse.idx != 0:
                        return (f"norm output {out.name!r} is read by {nuse.node.op_type} "
                                f"{nuse.node.name!r}, not a linear layer")
                    lins.append(unit)
                if not lins:
                    return f"norm {node.name!r} feeds no linear layer"
                readers.append((node, lins))
                continue
            if node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2:
                other = node.inputs[1 - use.idx]
                if other is None or id(other) in stream_ids or other is value:
                    return f"residual Add {node.name!r} adds two stream values"
                producer = other.producer()
                if id(other) in by_output:
                    writers.append(by_output[id(other)])
                elif producer is not None and _is_table_gather(producer):
                    embeddings.append(producer)
                else:
                    return (f"residual Add {node.name!r} adds {other.name!r}, which is neither a "
                            "linear layer's output nor an embedding lookup")
                adds.append(node)
                stream_ids.add(id(node.outputs[0]))
                todo.append(node.outputs[0])
                continue
            return (f"residual stream value {value.name!r} is read by {node.op_type} "
                    f"{node.name!r}")
    if not readers or not writers:
        return "no pre-norm residual block (norm → linears, linear → residual Add) was found"
    # every node touching the stream must agree on the width
    for gather in embeddings:
        if const_array(gather.inputs[0]).shape[1] != hidden:
            return f"embedding {gather.name!r} has width != {hidden}"
    for node, lins in readers:
        gamma = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if gamma is None or gamma.size != hidden:
            return f"norm {node.name!r} has no constant scale of size {hidden}"
        if _norm_kind(node) == "layernorm" and len(node.inputs) > 2 and node.inputs[2] is not None:
            beta = const_array(node.inputs[2])
            if beta is None or beta.size != hidden:
                return f"norm {node.name!r} has no constant bias of size {hidden}"
        for unit in lins:
            if const_array(unit.weight).shape[0] != hidden:
                rows = const_array(unit.weight).shape[0]
                return f"linear {unit.module!r} reads the stream but has {rows} rows"
    for unit in writers:
        if const_array(unit.weight).shape[1] != hidden:
            cols = const_array(unit.weight).shape[1]
            return f"linear {unit.module!r} writes the stream but has {cols} columns"
    # weights and tables must be rewritable constants
    for gather in embeddings:
        table = gather.inputs[0]
        if table.is_graph_output():
            return f"embedding table {table.name!r} is a graph output"
        if any(u.node is not gather for u in table.uses()):
            return (f"embedding table {table.name!r} is shared with another node (tied "
                    "embeddings): untie it first")
    rotated_ids: set[int] = set()
    for unit in [u for _, lins in readers for u in lins] + writers:
        if id(unit.matmul) in rotated_ids:
            return f"linear {unit.module!r} both reads and writes the stream"
        rotated_ids.add(id(unit.matmul))
        if unit.weight.is_graph_output():
            return f"weight {unit.weight.name!r} is a graph output"
    return ResidualStream(hidden, embeddings, readers, writers, adds)


class RotateResidualPass(ir.passes.InPlacePass):
    """Rotate the residual stream of an RMSNorm decoder by a randomised Hadamard ``Q``.

    Args:
        seed: seed of the random signs of ``Q = diag(s) · H_d / √d`` (None: plain
            Hadamard, no signs).
        convert_layernorm: make pre-LN LayerNorm models rotation-invariant first
            (SliceGPT/QuaRot: centre the writers, fold γ/β into the readers, replace
            LayerNorm by RMSNormalization, which needs opset ≥ 23); when False
            LayerNorm graphs are refused.
    """

    def __init__(self, *, seed: int | None = 0, convert_layernorm: bool = True) -> None:
        super().__init__()
        self.seed = seed
        self.convert_layernorm = convert_layernorm

    def call(self, model: ir.Model) -> ChannelFoldResult:
        graph = model.graph
        result = ChannelFoldResult(model, False)
        stream = map_residual_stream(graph)
        if isinstance(stream, str):
            result.skipped.append({"module": "", "reason": stream})
            return result
        touched = [*stream.embeddings, *(n for n, _ in stream.readers),
                   *(u.matmul for _, lins in stream.readers for u in lins),
                   *(u.matmul for u in stream.writers)]
        if any(ROTATED_KEY in n.metadata_props for n in touched):
            result.skipped.append({"module": "",
                                   "reason": "the residual stream is already rotated"})
            return result
        layernorms = [n for n, _ in stream.readers if _norm_kind(n) == "layernorm"]
        if layernorms:
            reason = None
            if not self.convert_layernorm:
                reason = "conversion disabled (convert_layernorm=False)"
            elif opset(model) < 23:
                reason = f"the model imports opset {opset(model)}; RMSNormalization needs 23"
            if reason:
                result.skipped.append({"module": "", "reason": (
                    f"{layernorms[0].name!r} is a LayerNormalization: its mean subtraction does "
                    "not commute with a rotation and the conversion to a rotation-invariant "
                    f"RMSNorm model was not done: {reason}")})
                return result
        d = stream.hidden
        if not is_supported(d):
            result.skipped.append({"module": "", "reason": f"no Hadamard matrix of order {d}"})
            return result
        name = type(self).__name__
        seed = self.seed

        def set_weight(node: ir.Node, index: int, array: np.ndarray, like: np.ndarray) -> None:
            base = f"{node.inputs[index].name or 'weight'}_rotated"
            _set_const(graph, node, index, array.astype(like.dtype).reshape(like.shape), base)

        centre = bool(layernorms)

        def rotate_out(x: np.ndarray) -> np.ndarray:  # x ↦ x (C) Q on the last axis
            x = np.asarray(x, np.float64)
            if centre:
                x = x - x.mean(axis=-1, keepdims=True)
            return rotate_last(x, seed=seed)

        for gather in stream.embeddings:
            table = const_array(gather.inputs[0])
            set_weight(gather, 0, rotate_out(table), table)
        for norm, lins in stream.readers:
            gamma = const_array(norm.inputs[1])
            g64 = gamma.astype(np.float64).reshape(-1)
            beta = None
            if _norm_kind(norm) == "layernorm" and len(norm.inputs) > 2:
                beta = const_array(norm.inputs[2])
            for unit in lins:
                # γ (and β, as b ← b + β W) into the linear, then W ← Qᵀ W
                fold_into_linear(unit, None if beta is None else beta.reshape(-1), g64,
                                 pass_name=name)
                w = const_array(unit.weight)
                set_weight(unit.matmul, 1, rotate_last(w.astype(np.float64).T, seed=seed).T, w)
            set_weight(norm, 1, np.ones_like(g64), gamma)
        for unit in stream.writers:
            w = const_array(unit.weight)
            set_weight(unit.matmul, 1, rotate_out(w), w)
            if unit.bias is not None:
                b = const_array(unit.bias)
                idx = list(unit.bias_add.inputs).index(unit.bias)
                set_weight(unit.bias_add, idx, rotate_out(b.reshape(-1)), b)
        converted = [_to_rmsnorm(graph, n, name) for n in layernorms]
        touched = [n for n in touched if n not in layernorms] + converted
        for node in touched:
            node.metadata_props[ROTATED_KEY] = name
        result.modified = True
        result.sites.append({
            "module": "residual",
            "method": "hadamard",
            "hidden": d,
            "factors": kron_factors(d),
            "seed": seed,
            "embeddings": [module_of(n) or n.name for n in stream.embeddings],
            "norms": [module_of(n) for n, _ in stream.readers],
            "readers": [u.module for _, lins in stream.readers for u in lins],
            "writers": [u.module for u in stream.writers],
            "layernorms_converted": len(layernorms),
        })
        return result


def _to_rmsnorm(graph: ir.Graph, ln: ir.Node, pass_name: str) -> ir.Node:
    """Replace a (γ = 1, β folded away) LayerNormalization by RMSNormalization.

    Exact when its input has zero mean over the last axis (centred stream):
    ``var = mean(x²)`` then, with the same epsilon.
    """
    eps = ln.attributes.get_float("epsilon", 1e-5)
    old = ln.outputs[0]
    out = ir.Value(name=None, shape=old.shape, type=old.type)
    rms = ir.node("RMSNormalization", [ln.inputs[0], ln.inputs[1]],
                  {"axis": -1, "epsilon": eps}, outputs=[out],
                  name=unique_name(graph, f"{ln.name or 'norm'}_rms"),
                  metadata_props={**ln.metadata_props, PASS_KEY: pass_name})
    graph.insert_before(ln, rms)
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    name = old.name
    beta = ln.inputs[2] if len(ln.inputs) > 2 else None
    graph.remove(ln, safe=True)
    drop_if_dead([beta])
    out.name = name
    return rms
