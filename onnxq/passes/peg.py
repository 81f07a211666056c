"""Per-embedding-group (PEG) activation quantization as plain per-tensor W8A8 linears.

PEG (Bondarenko, Nagel, Blankevoort, EMNLP 2021) quantizes an activation with
``G`` scales instead of one: the hidden channels are ordered by their calibration
range ``r_j = max_t X_tj − min_t X_tj`` (``argsort``, stable) and cut into ``G``
contiguous groups of that order, so the few outlier channels share the last
group(s) and no longer stretch the grid of the others.  A scale that varies
along the reduction axis cannot feed one INT8 GEMM, so for a linear
``y = X W + b`` (``W`` of shape ``[K, N]``) this pass writes the product as the
sum of ``G`` ordinary linears::

    y = Sum_g (X_g @ W[idx_g, :])  (+ b)   idx_g: channel indices of group g
                                           (the bias Add is kept as it was)

Since ``{idx_g}`` partitions ``0..K-1``, ``Σ_g X_g W[idx_g] = Σ_k X_k W_k = X W``:
the rewrite is exact in real arithmetic and differs in float only by the
summation order of the reduction.  Each ``X_g`` is a tensor of its own and the
input of a ``MatMul`` with a constant weight, so :func:`~onnxq.calibration.runner.default_tensors`
calibrates it and :class:`~onnxq.passes.insert_qdq.InsertQDQPass` gives it its
own per-tensor Q/DQ (PEG's per-group scale); every weight slice gets its own
per-output-channel scales.  Everything is standard ONNX (``Split`` or ``Gather``,
``MatMul``, ``Sum``) that onnxruntime and TensorRT run with per-tensor activation Q/DQ.

Two layouts produce the group tensors ``X_g`` (recorded per site as ``layout``):

``"split"`` (contiguous groups, preferred)
    When ``X`` comes from a linear through per-channel elementwise ops only
    (``MatMul(W_up) → Add(b_up) → Gelu``; also Relu, Mul/Add/Sub/Div by a scalar or
    per-channel constant, FastGelu/BiasGelu… see ``_ELEMENTWISE``), every value of
    that chain read by one node only, and every reader of ``X`` is a linear split
    at this site, the channels are permuted offline into the group order
    ``perm = concat(idx_0, …, idx_{G-1})``: the producer's weight columns
    ``W_up[:, perm]`` and every per-channel constant of the chain (``b_up[perm]``…)
    are permuted, so ``X`` itself comes out permuted and group ``g`` is the
    contiguous channel range ``[o_g, o_g + |idx_g|)``.  One ``Split`` (axis −1,
    explicit ``split`` sizes) then yields all ``X_g``; the weight slices are
    ``W[idx_g, :]`` exactly as in the Gather layout, so the math is the same
    (a permutation plus the same partition).  A producer that this pass already
    split (a PEG ``Sum`` of partial MatMuls) is permuted in every partial weight.
    A constant read by other nodes too is not edited: the node gets a permuted
    copy ``{name}_peg_perm`` instead.  The chain keeps its value names, but those
    tensors now hold permuted channels: every node whose output moved carries
    ``onnxq.peg.perm`` (:data:`PERM_KEY`, ``out[..., j] = original[..., perm[j]]``)
    so that a comparison with the FP32 graph can undo it.
``"gather"`` (fallback)
    Otherwise (``X`` is a graph input or output, comes from a LayerNorm, a
    reshape or a non-elementwise op, a chain value has several readers, or ``X``
    has readers that are not split here, such as a residual ``Add``), each group
    is ``X_g = Gather(X, idx_g, axis=-1)`` with an int64 index list; the site
    records why in ``layout_reason``.

Groups: ``G' = min(groups, K)`` groups with sizes as equal as possible; when
``K % G'`` is not zero the *first* groups of the range order get one channel more,
so the last (widest-range) groups are the smallest.  Inside a group the indices
are sorted ascending (the order inside a group does not change the result).

Selection: every linear (``find_linears``) whose input has per-channel statistics
in ``stats`` with ``max_j max|X_j| / median_j max|X_j| ≥ min_outlier_ratio``
(:func:`~onnxq.passes.ffn_scaling.channel_outlier_ratio`), optionally restricted to
inputs produced by an op in ``producers``.  **Shared inputs**: all selected linears
reading the same tensor are split with the same groups and share one ``Split`` (or
one set of ``Gather`` nodes): Q, K and V of an attention block get the same ``G``
activation scales, as one shared Q/DQ per group.  Other readers of ``X`` (the
residual ``Add``) keep reading ``X`` (and force the Gather layout).

Names are deterministic: the group tensors are ``{X}_peg{g}`` in both layouts;
Split layout: node ``{X}_peg_Split``, sizes initializer ``{X}_peg_split``;
Gather layout: nodes ``{X}_peg{g}_Gather``, indices ``{X}_peg{g}_idx``.  The
partial products are ``{mm_out}_peg{g}`` (node ``{matmul}_peg{g}``), the weight
slices ``{W}_peg{g}``; the ``Sum`` (node ``{matmul}_peg_Sum``) takes over the
MatMul output's name, so the bias ``Add`` and every other reader are untouched.
Permuted producer constants keep their names (edited in place) unless shared.
All new nodes carry ``onnxq.pass = "PerEmbeddingGroupPass"`` and the linear's
metadata (its ``onnxq.module``, so reports still name e.g.
``encoder.layer.3.output.dense``); the partial MatMuls are marked ``onnxq.peg`` so
that running the pass again does not split them a second time.  Statistics of
the graph *before* the pass are needed; calibrate again afterwards (the group
tensors are new, and in the Split layout the chain tensors are permuted).

Cost per split linear: ``G − 1`` extra MatMul + 1 Sum, plus per site one ``Split``
(Split layout) or ``G`` Gathers (Gather layout); the FLOPs of the MatMuls are
unchanged and the permutation is free at run time.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection

import numpy as np
import onnx_ir as ir

from onnxq.calibration.stats import Stats
from onnxq.passes._ir_utils import drop_if_dead, make_initializer, tag, unique_name
from onnxq.passes._patterns import LinearUnit, const_array, find_linears, is_const, module_of
from onnxq.passes.channel_fold import ChannelFoldResult
from onnxq.passes.ffn_scaling import channel_outlier_ratio

__all__ = ["PEG_KEY", "PERM_KEY", "PerEmbeddingGroupPass", "peg_groups"]

logger = logging.getLogger(__name__)

PASS_TAG = "PerEmbeddingGroupPass"

#: Metadata key marking a partial MatMul made by this pass (value: the pass name).
PEG_KEY = "onnxq.peg"

#: Metadata key on every node whose output channels the Split layout permuted
#: (value: ``perm`` as comma-separated ints, ``out[..., j] = original[..., perm[j]]``).
PERM_KEY = "onnxq.peg.perm"

# Ops that act per element, every input either the chain value itself or a
# constant that broadcasts along the channel axis (scalar, or last dim 1 or N):
# permuting the channels of the input (and of such constants) permutes the output.
_ELEMENTWISE: dict[str, frozenset[str]] = {
    "": frozenset({
        "Identity", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Clip", "PRelu",
        "Relu", "LeakyRelu", "Elu", "Selu", "Celu", "ThresholdedRelu", "Gelu", "Sigmoid",
        "HardSigmoid", "HardSwish", "Tanh", "Erf", "Softplus", "Softsign", "Mish", "Exp",
        "Log", "Sqrt", "Reciprocal", "Abs", "Neg", "Sign", "Floor", "Ceil", "Round",
    }),
    "com.microsoft": frozenset({"Gelu", "FastGelu", "BiasGelu", "QuickGelu"}),
}
_ELEMENTWISE["ai.onnx"] = _ELEMENTWISE[""]

# MatMuls that implement a rotation rather than a layer (see onnxq.passes._patterns).
_NOT_LAYERS = {"OnlineHadamardPass", "QuambaPass"}

_MAX_CHAIN = 16

# One planned constant edit: (node, input index, new array).
_Edit = tuple[ir.Node, int, np.ndarray]


@dataclasses.dataclass
class _Plan:
    """A channel permutation to apply: constant edits and the nodes whose outputs move."""

    perm: np.ndarray
    edits: list[_Edit]
    nodes: list[ir.Node]


def peg_groups(ch_min: np.ndarray, ch_max: np.ndarray, groups: int) -> list[np.ndarray]:
    """PEG's range-based grouping of ``K`` channels.

    Channels are ordered by ``r_j = ch_max_j − ch_min_j`` (stable argsort, widest
    last) and cut into ``min(groups, K)`` contiguous pieces whose sizes differ by at
    most one (the larger pieces first).

    Returns:
        One ascending int64 index array per group; together a partition of ``0..K-1``.
    """
    r = np.asarray(ch_max, np.float64).reshape(-1) - np.asarray(ch_min, np.float64).reshape(-1)
    k = r.size
    g = max(1, min(int(groups), k))
    order = np.argsort(r, kind="stable")
    return [np.sort(part).astype(np.int64) for part in np.array_split(order, g)]


def _group_shape(value: ir.Value, size: int) -> ir.Shape | None:
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    return ir.Shape([*list(shape)[:-1], size])


class PerEmbeddingGroupPass(ir.passes.InPlacePass):
    """Split linears with outlier input channels into ``groups`` per-group linears + ``Sum``.

    The group tensors come from one ``Split`` of the input after an offline
    channel permutation of its producer when the producer chain allows it, from
    ``G`` ``Gather`` nodes otherwise (see the module docstring); each site of the
    result records ``layout`` (``"split"`` or ``"gather"``).

    Args:
        stats: per-channel statistics (``ch_min``/``ch_max``) of the untransformed graph.
        groups: number of embedding groups ``G`` (PEG's default is 6); clamped to ``K``.
        min_outlier_ratio: required ``max/median`` of the input's per-channel absolute maxima.
        producers: op types whose outputs mark a linear input as a site (None: any).
        contiguous: use the Split layout where the producer chain allows it (False:
            always Gather, the layout of earlier versions).
    """

    def __init__(
        self,
        *,
        stats: Stats,
        groups: int = 6,
        min_outlier_ratio: float = 4.0,
        producers: Collection[str] | None = None,
        contiguous: bool = True,
    ) -> None:
        super().__init__()
        if int(groups) < 2:
            raise ValueError(f"groups must be at least 2, got {groups}")
        self.stats = stats
        self.groups = int(groups)
        self.min_outlier_ratio = min_outlier_ratio
        self.producers = None if producers is None else frozenset(producers)
        self.contiguous = bool(contiguous)

    def call(self, model: ir.Model) -> ChannelFoldResult:
        result = ChannelFoldResult(model, False)
        by_input: dict[int, list[LinearUnit]] = {}
        for unit in find_linears(model.graph):
            if self.producers is not None:
                producer = unit.input.producer()
                if producer is None or producer.op_type not in self.producers:
                    continue
            by_input.setdefault(id(unit.input), []).append(unit)
        for units in by_input.values():
            value = units[0].input
            fresh = [u for u in units if PEG_KEY not in u.matmul.metadata_props]
            info = {"module": ",".join(u.module for u in (fresh or units)), "method": "peg",
                    "tensor": value.name}
            reason = "already split" if not fresh else self._site(value, fresh, info)
            if reason:
                info["reason"] = reason
                result.skipped.append(info)
            else:
                result.sites.append(info)
                result.modified = True
                logger.info("PEG: %s split into %d groups (outlier ratio %.1f, %s layout)",
                            info["module"], info["groups"], info["outlier_ratio"],
                            info["layout"])
        return result

    def _site(self, value: ir.Value, units: list[LinearUnit], info: dict) -> str | None:
        if value.name not in self.stats:
            return "no statistics"
        obs = self.stats[value.name]
        channels = obs.channels
        # the MatMul's current weight (an earlier site may have replaced it)
        k = const_array(units[0].matmul.inputs[1]).shape[0]
        if channels != k:
            return f"statistics have {channels} channel(s), the linear reads {k}"
        last = value.shape[-1] if value.shape is not None and len(value.shape) else None
        if isinstance(last, int) and last != k:
            return f"input has {last} channel(s), the weight {k} rows"
        ratio = channel_outlier_ratio(obs.ch_absmax)
        info["outlier_ratio"] = ratio
        if not ratio >= self.min_outlier_ratio:
            return f"outlier ratio {ratio:.2f} below {self.min_outlier_ratio}"
        parts = peg_groups(obs.ch_min, obs.ch_max, self.groups)
        if len(parts) < 2:
            return "a single input channel cannot be split"
        r = obs.ch_max - obs.ch_min
        info.update(
            groups=len(parts),
            group_sizes=[int(p.size) for p in parts],
            group_ranges=[float(r[p].max()) for p in parts],
            range_before=float(r.max()),
            widest_group=[int(i) for i in parts[-1]],
            linears=[u.module for u in units],
        )
        if self.contiguous:
            plan, why = _permutation_plan(value, units, np.concatenate(parts))
        else:
            plan, why = None, "contiguous layout disabled"
        if plan is not None:
            info["layout"] = "split"
            info["permuted"] = _apply_plan(plan)
            xs, added = _split_groups(value, units, parts)
        else:
            info["layout"] = "gather"
            info["layout_reason"] = why
            xs, added = _gather_groups(value, units, parts)
        for unit in units:
            added += _split_linear(unit, parts, xs)
        info["nodes_added"] = added
        return None


# ------------------------------------------------------------- permutation
def _permutation_plan(
    value: ir.Value, units: list[LinearUnit], perm: np.ndarray
) -> tuple[_Plan | None, str | None]:
    """How to permute the channels of ``value`` by ``perm`` through its producer chain.

    Returns ``(plan, None)`` when ``value`` is produced by a linear through
    per-channel elementwise ops only and read by ``units`` only, else
    ``(None, reason)``.  Nothing is changed here.
    """
    n = perm.size
    if value.is_graph_output():
        return None, "the input is a graph output"
    matmuls = {id(u.matmul) for u in units}
    for use in value.uses():
        if id(use.node) not in matmuls or use.idx != 0:
            return None, (f"the input is also read by {use.node.op_type} "
                          f"{use.node.name or ''}".rstrip())
    edits: list[_Edit] = []
    chain: list[ir.Node] = []
    v = value
    for _ in range(_MAX_CHAIN):
        node = v.producer()
        if node is None:
            kind = "graph input" if v.is_graph_input() else "constant"
            return None, f"the input is a {kind}, not produced by a linear"
        linear = _linear_column_edits(node, perm)
        if linear is not None:
            nodes = [*chain, *(e[0] for e in linear)]
            if node is not linear[0][0]:  # a PEG Sum of partial MatMuls
                nodes.append(node)
            return _Plan(perm, edits + linear, nodes), None
        if node.op_type not in _ELEMENTWISE.get(node.domain, ()) or len(node.outputs) != 1:
            return None, (f"{node.op_type} {node.name or ''} between the producing linear "
                          "and the input is not a per-channel elementwise op")
        nxt = None
        for i, inp in enumerate(node.inputs):
            if inp is None:
                continue
            arr = const_array(inp)
            if arr is None:
                if is_const(inp):
                    return None, f"constant {inp.name} of {node.op_type} cannot be read"
                if nxt is not None and inp is not nxt:
                    return None, f"{node.op_type} {node.name or ''} has two activation inputs"
                nxt = inp
                continue
            if arr.ndim == 0 or arr.shape[-1] == 1:
                continue  # broadcasts over the channels: nothing to permute
            if arr.shape[-1] != n:
                return None, (f"constant {inp.name} of {node.op_type} {node.name or ''} has "
                              f"{arr.shape[-1]} channel(s), the input {n}")
            edits.append((node, i, np.ascontiguousarray(arr[..., perm])))
        chain.append(node)
        if nxt is None:
            return None, f"{node.op_type} {node.name or ''} has no activation input"
        if nxt.is_graph_output() or len(nxt.consumers()) != 1:
            return None, f"{nxt.name} in the producer chain has other readers"
        v = nxt
    return None, f"no linear within {_MAX_CHAIN} elementwise ops"


def _column_edit(node: ir.Node, perm: np.ndarray) -> _Edit | None:
    """``node`` as a MatMul with a constant ``[K, N]`` float weight: its column edit."""
    if (node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2
            or node.metadata_props.get("onnxq.pass") in _NOT_LAYERS):
        return None
    x, w_val = node.inputs
    if x is None or const_array(x) is not None:
        return None
    w = const_array(w_val)
    if (w is None or w.ndim != 2 or w.shape[1] != perm.size
            or not np.issubdtype(w.dtype, np.floating)):
        return None
    return (node, 1, np.ascontiguousarray(w[:, perm]))


def _linear_column_edits(node: ir.Node, perm: np.ndarray) -> list[_Edit] | None:
    """Edits permuting the output channels of a linear, or of a PEG ``Sum`` of partials."""
    edit = _column_edit(node, perm)
    if edit is not None:
        return [edit]
    if node.op_type != "Sum" or node.metadata_props.get("onnxq.pass") != PASS_TAG:
        return None
    edits = []
    for p in node.inputs:
        mm = p.producer() if p is not None else None
        if (mm is None or PEG_KEY not in mm.metadata_props or p.is_graph_output()
                or len(p.uses()) != 1):
            return None
        edit = _column_edit(mm, perm)
        if edit is None:
            return None
        edits.append(edit)
    return edits or None


def _apply_plan(plan: _Plan) -> list[str]:
    """Write the permuted constants and mark the moved nodes; return the constants' names.

    A constant read by this node only is edited in place (it keeps its name);
    a shared one is replaced, for this node only, by a new ``{name}_peg_perm``.
    Every node whose output channels move gets :data:`PERM_KEY` (composed with an
    earlier permutation if it had one), so tools comparing with the FP32 graph can
    undo it.
    """
    for node in plan.nodes:
        perm = plan.perm
        earlier = node.metadata_props.get(PERM_KEY)
        if earlier:
            perm = np.array([int(i) for i in earlier.split(",")], np.int64)[perm]
        node.metadata_props[PERM_KEY] = ",".join(str(int(i)) for i in perm)
    names = []
    for node, idx, arr in plan.edits:
        old = node.inputs[idx]
        graph = node.graph
        assert old is not None and graph is not None
        if (old.is_initializer() and len(old.uses()) == 1 and not old.is_graph_output()
                and old.name in graph.initializers):
            old.const_value = ir.tensor(arr, name=old.name)
            names.append(old.name)
            continue
        new = make_initializer(graph, f"{old.name or 'constant'}_peg_perm", arr)
        node.replace_input_with(idx, new)
        drop_if_dead([old])
        names.append(new.name)
    return names


# ------------------------------------------------------------------ groups
def _tag_group_node(node: ir.Node, first: ir.Node) -> None:
    tag(node, PASS_TAG)
    if module_of(first):
        node.metadata_props["onnxq.module"] = module_of(first)


def _split_groups(value: ir.Value, units: list[LinearUnit],
                  parts: list[np.ndarray]) -> tuple[list[ir.Value], int]:
    """One ``Split`` of the (permuted) ``value`` into the contiguous group ranges."""
    graph = units[0].matmul.graph
    assert graph is not None
    base = value.name or "value"
    first = units[0].matmul  # find_linears yields graph order
    sizes = np.array([p.size for p in parts], dtype=np.int64)
    xs = [ir.Value(name=unique_name(graph, f"{base}_peg{g}"),
                   shape=_group_shape(value, int(s)), type=value.type)
          for g, s in enumerate(sizes)]
    name = unique_name(graph, f"{base}_peg_Split")
    opset = graph.opset_imports.get("", graph.opset_imports.get("ai.onnx", 0))
    if opset and opset < 13:  # Split-2/11: sizes as an attribute
        node = ir.node("Split", [value], {"axis": -1, "split": [int(s) for s in sizes]},
                       outputs=xs, name=name)
    else:
        sizes_val = make_initializer(graph, f"{base}_peg_split", sizes)
        node = ir.node("Split", [value, sizes_val], {"axis": -1}, outputs=xs, name=name)
    _tag_group_node(node, first)
    graph.insert_before(first, node)
    return xs, 1


def _gather_groups(value: ir.Value, units: list[LinearUnit],
                   parts: list[np.ndarray]) -> tuple[list[ir.Value], int]:
    """``G`` ``Gather`` nodes picking the channels of each group from ``value``."""
    graph = units[0].matmul.graph
    assert graph is not None
    base = value.name or "value"
    rank = len(value.shape) if value.shape is not None else None
    axis = rank - 1 if rank else -1
    first = units[0].matmul  # find_linears yields graph order
    xs = []
    for g, idx in enumerate(parts):
        idx_val = make_initializer(graph, f"{base}_peg{g}_idx", idx)
        out = ir.Value(name=unique_name(graph, f"{base}_peg{g}"),
                       shape=_group_shape(value, int(idx.size)), type=value.type)
        node = ir.node("Gather", [value, idx_val], {"axis": axis}, outputs=[out],
                       name=unique_name(graph, f"{base}_peg{g}_Gather"))
        _tag_group_node(node, first)
        xs.append(out)
        graph.insert_before(first, node)
    return xs, len(xs)


def _split_linear(unit: LinearUnit, parts: list[np.ndarray], xs: list[ir.Value]) -> int:
    """Replace ``unit``'s MatMul by per-group MatMuls on ``xs`` + ``Sum``; return node count.

    The weight slices are ``W[idx_g, :]`` in both layouts: in the Split layout group
    ``g`` of the permuted input holds the original channels ``idx_g`` in that order.
    """
    matmul = unit.matmul
    graph = matmul.graph
    assert graph is not None
    w_val = matmul.inputs[1]  # not unit.weight: a permutation may have replaced it
    w = const_array(w_val)
    mm_out = matmul.outputs[0]
    out_name = mm_out.name or unique_name(graph, f"{matmul.name or 'linear'}_out")
    mm_base = matmul.name or out_name
    w_base = w_val.name or f"{mm_base}_weight"
    out_shape = mm_out.shape
    new_nodes, partials = [], []
    for g, (idx, x_g) in enumerate(zip(parts, xs, strict=True)):
        w_g = make_initializer(graph, f"{w_base}_peg{g}", np.ascontiguousarray(w[idx, :]))
        p = ir.Value(name=unique_name(graph, f"{out_name}_peg{g}"), shape=out_shape,
                     type=mm_out.type)
        node = ir.node("MatMul", [x_g, w_g], outputs=[p],
                       name=unique_name(graph, f"{mm_base}_peg{g}"))
        tag(node, PASS_TAG, matmul)
        node.metadata_props[PEG_KEY] = PASS_TAG
        new_nodes.append(node)
        partials.append(p)
    total = ir.Value(name=None, shape=out_shape, type=mm_out.type)
    sum_node = ir.node("Sum", partials, outputs=[total],
                       name=unique_name(graph, f"{mm_base}_peg_Sum"))
    tag(sum_node, PASS_TAG, matmul)
    new_nodes.append(sum_node)
    graph.insert_before(matmul, new_nodes)
    mm_out.replace_all_uses_with(total, replace_graph_outputs=True)
    graph.remove(matmul, safe=True)
    total.name = out_name
    drop_if_dead([w_val])
    return len(new_nodes) - 1  # the original MatMul is gone
