"""Per-embedding-group (PEG) activation quantization as plain per-tensor W8A8 linears.

PEG (Bondarenko, Nagel, Blankevoort, EMNLP 2021) quantizes an activation with
``G`` scales instead of one: the hidden channels are ordered by their calibration
range ``r_j = max_t X_tj − min_t X_tj`` (``argsort``, stable) and cut into ``G``
contiguous groups of that order, so the few outlier channels share the last
group(s) and no longer stretch the grid of the others.  A scale that varies
along the reduction axis cannot feed one INT8 GEMM, so for a linear
``y = X W + b`` (``W`` of shape ``[K, N]``) this pass writes the product as the
sum of ``G`` ordinary linears::

    X_g = Gather(X, idx_g, axis=-1)          idx_g: int64 channel indices of group g
    y   = Sum_g (X_g @ W[idx_g, :])  (+ b)   (the bias Add is kept as it was)

Since ``{idx_g}`` partitions ``0..K-1``, ``Σ_g X_g W[idx_g] = Σ_k X_k W_k = X W``:
the rewrite is exact in real arithmetic and differs in float only by the
summation order of the reduction.  Each ``X_g`` is a tensor of its own and the
input of a ``MatMul`` with a constant weight, so :func:`~onnxq.calibration.runner.default_tensors`
calibrates it and :class:`~onnxq.passes.insert_qdq.InsertQDQPass` gives it its
own per-tensor Q/DQ (PEG's per-group scale); every weight slice gets its own
per-output-channel scales.  Everything is standard ONNX (``Gather``, ``MatMul``,
``Sum``) that onnxruntime and TensorRT run with per-tensor activation Q/DQ.

Groups: ``G' = min(groups, K)`` groups with sizes as equal as possible; when
``K % G'`` is not zero the *first* groups of the range order get one channel more,
so the last (widest-range) groups are the smallest.  Inside a group the indices
are sorted ascending (the order inside a group does not change the result).

Selection: every linear (``find_linears``) whose input has per-channel statistics
in ``stats`` with ``max_j max|X_j| / median_j max|X_j| ≥ min_outlier_ratio``
(:func:`~onnxq.passes.ffn_scaling.channel_outlier_ratio`), optionally restricted to
inputs produced by an op in ``producers``.  **Shared inputs**: all selected linears
reading the same tensor are split with the same groups and share one set of
``Gather`` nodes (Q, K and V of an attention block get the same ``G`` activation
scales, as one shared Q/DQ per group).  Other readers of ``X`` (the residual
``Add``) keep reading ``X``.

Names are deterministic: the group tensors are ``{X}_peg{g}`` (node
``{X}_peg{g}_Gather``, indices ``{X}_peg{g}_idx``), the partial products
``{mm_out}_peg{g}`` (node ``{matmul}_peg{g}``), the weight slices
``{W}_peg{g}``; the ``Sum`` takes over the MatMul output's name, so the bias
``Add`` and every other reader are untouched.  All new nodes carry
``onnxq.pass = "PerEmbeddingGroupPass"`` and the linear's metadata (its
``onnxq.module``, so reports still name e.g. ``encoder.layer.3.output.dense``);
the partial MatMuls are marked ``onnxq.peg`` so that running the pass again does
not split them a second time.  Statistics of the graph *before* the pass are
needed; calibrate again afterwards (the group tensors are new).

Cost per split linear: ``G`` Gather + ``G − 1`` extra MatMul + 1 Sum (a shared
input pays its Gathers once); the FLOPs of the MatMuls are unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import onnx_ir as ir

from onnxq.calibration.stats import Stats
from onnxq.passes._ir_utils import drop_if_dead, make_initializer, tag, unique_name
from onnxq.passes._patterns import LinearUnit, const_array, find_linears, module_of
from onnxq.passes.channel_fold import ChannelFoldResult
from onnxq.passes.ffn_scaling import channel_outlier_ratio

__all__ = ["PEG_KEY", "PerEmbeddingGroupPass", "peg_groups"]

logger = logging.getLogger(__name__)

PASS_TAG = "PerEmbeddingGroupPass"

#: Metadata key marking a partial MatMul made by this pass (value: the pass name).
PEG_KEY = "onnxq.peg"


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

    Args:
        stats: per-channel statistics (``ch_min``/``ch_max``) of the untransformed graph.
        groups: number of embedding groups ``G`` (PEG's default is 6); clamped to ``K``.
        min_outlier_ratio: required ``max/median`` of the input's per-channel absolute maxima.
        producers: op types whose outputs mark a linear input as a site (None: any).
    """

    def __init__(
        self,
        *,
        stats: Stats,
        groups: int = 6,
        min_outlier_ratio: float = 4.0,
        producers: Collection[str] | None = None,
    ) -> None:
        super().__init__()
        if int(groups) < 2:
            raise ValueError(f"groups must be at least 2, got {groups}")
        self.stats = stats
        self.groups = int(groups)
        self.min_outlier_ratio = min_outlier_ratio
        self.producers = None if producers is None else frozenset(producers)

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
                logger.info("PEG: %s split into %d groups (outlier ratio %.1f)",
                            info["module"], info["groups"], info["outlier_ratio"])
        return result

    def _site(self, value: ir.Value, units: list[LinearUnit], info: dict) -> str | None:
        if value.name not in self.stats:
            return "no statistics"
        obs = self.stats[value.name]
        channels = obs.channels
        k = const_array(units[0].weight).shape[0]
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
        info["nodes_added"] = _split(value, units, parts)
        return None


def _split(value: ir.Value, units: list[LinearUnit], parts: list[np.ndarray]) -> int:
    """Rewrite ``units`` (all reading ``value``) as per-group MatMuls + Sum; return node count."""
    graph = units[0].matmul.graph
    assert graph is not None
    base = value.name or "value"
    rank = len(value.shape) if value.shape is not None else None
    axis = rank - 1 if rank else -1
    first = units[0].matmul  # find_linears yields graph order
    gathers, xs = [], []
    for g, idx in enumerate(parts):
        idx_val = make_initializer(graph, f"{base}_peg{g}_idx", idx)
        out = ir.Value(name=unique_name(graph, f"{base}_peg{g}"),
                       shape=_group_shape(value, int(idx.size)), type=value.type)
        node = ir.node("Gather", [value, idx_val], {"axis": axis}, outputs=[out],
                       name=unique_name(graph, f"{base}_peg{g}_Gather"))
        tag(node, PASS_TAG)
        if module_of(first):
            node.metadata_props["onnxq.module"] = module_of(first)
        gathers.append(node)
        xs.append(out)
        graph.insert_before(first, node)
    added = len(gathers)
    for unit in units:
        added += _split_linear(graph, unit, parts, xs)
    return added


def _split_linear(graph: ir.Graph, unit: LinearUnit, parts: list[np.ndarray],
                  xs: list[ir.Value]) -> int:
    matmul = unit.matmul
    w_val = unit.weight
    w = const_array(w_val)
    mm_out = matmul.outputs[0]
    out_name = mm_out.name or unique_name(graph, f"{matmul.name or 'linear'}_out")
    mm_base = matmul.name or out_name
    w_base = w_val.name or f"{mm_base}_weight"
    out_shape = mm_out.shape
    new_nodes, partials = [], []
    for g, (idx, x_g) in enumerate(zip(parts, xs)):
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
