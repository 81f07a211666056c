"""FP32-equivalent per-channel affine migration ``X̃ = (X − z) ⊘ s``, folded into weights.

Shared machinery of :mod:`onnxq.passes.outlier_suppression_plus` (Outlier
Suppression+, Wei et al., EMNLP 2023), :mod:`onnxq.passes.smooth_quant`
(SmoothQuant, Xiao et al., ICML 2023) and :mod:`onnxq.passes.ffn_scaling`.

Let ``X`` be an activation with channels on the last axis, ``z`` a per-channel
shift and ``s > 0`` a per-channel scale (both of length ``C``).  The migrated
activation is ``X̃ = (X − z) ⊘ s``.  Every reader of ``X`` must be rewritten so
that the network computes exactly the same function (up to float rounding):

Producer: a normalisation ``X = N(u) ⊙ γ + β`` (``LayerNormalization``)
    ``X̃ = N(u) ⊙ (γ ⊘ s) + (β − z) ⊘ s``, i.e. ``γ' = γ ⊘ s`` and
    ``β' = (β − z) ⊘ s``.  ``RMSNormalization`` / ``SimplifiedLayerNormalization``
    have no β, so they only take ``z = 0``: ``γ' = γ ⊘ s``.

Consumer: a linear layer ``y = X W + b`` with ``W`` of shape ``[K, N]`` (ONNX
``MatMul`` layout, row ``k`` = input channel ``k``)
    ``X W + b = (X̃ ⊙ s + z) W + b = X̃ (diag(s) W) + (b + z W)``, so
    ``W' = W ⊙ s[:, None]`` and ``b' = b + z W`` with the *original* ``W``.  A
    linear without bias gets a new ``Add`` when ``z ≠ 0``.

Any other consumer (the post-LN residual ``Add`` of BERT)
    reads ``X = X̃ ⊙ s + z`` through an explicit ``Mul(s)`` + ``Add(z)`` (the
    ``Add`` is omitted when ``z = 0``): the OS+ paper's channel-wise correction
    on the residual branch (Fig. 2b).

No producer to fold into (the FFN down-projection input after GELU)
    ``X̃ = X ⊙ (1/s) + (−z/s)`` is computed by an explicit ``Mul`` + ``Add`` that
    only the migrated linears read; see :func:`insert_explicit_transform`.

All functions edit an :class:`onnx_ir.Model` in place through onnx-ir only.  The
``check_*`` functions inspect without editing and return a reason string when a
rewrite is impossible (a weight shared with another node or overridable as a
graph input, a rewritten value that is a graph output, mismatched shapes); the
``fold_*`` functions call them first and return the same reason, without
touching the graph, when refusing.  :func:`fold_site` checks every part of a
site before changing any of it, so a site is rewritten completely or not at all.

Folded norms and linears are marked with ``metadata_props["onnxq.folded"]``
(value: the pass name); passes skip marked nodes so that running a migration
pass twice with the same statistics does not fold twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.passes._ir_utils import PASS_KEY, unique_name
from onnxq.passes._patterns import LinearUnit, const_array, module_of

__all__ = [
    "FOLDED_KEY",
    "ChannelFoldResult",
    "check_linear",
    "check_norm",
    "check_restore",
    "fold_into_linear",
    "fold_into_norm",
    "fold_site",
    "insert_explicit_transform",
    "is_folded",
    "mark_folded",
    "restore_for_consumers",
]

#: Metadata key marking a norm or linear whose input channels were already migrated.
FOLDED_KEY = "onnxq.folded"

_RMS_OPS = ("RMSNormalization", "SimplifiedLayerNormalization")


@dataclasses.dataclass
class ChannelFoldResult(ir.passes.PassResult):
    """Result of a migration pass.

    Attributes:
        sites: one dict per rewritten site (module, method, chosen t/alpha, max
            channel before/after, ...).
        skipped: one dict per candidate site left alone, with a ``reason``.
    """

    sites: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------- helpers
def is_folded(node: ir.Node) -> bool:
    """True if a migration pass already folded into ``node``."""
    return FOLDED_KEY in node.metadata_props


def mark_folded(node: ir.Node, pass_name: str) -> None:
    node.metadata_props[FOLDED_KEY] = pass_name


def _is_zero(z: np.ndarray | None) -> bool:
    return z is None or not np.any(np.asarray(z))


def _channels_of(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) == 0:
        return None
    last = shape[-1]
    return last if isinstance(last, int) else None


def _const_reason(value: ir.Value | None, what: str, *, allow_shared: bool) -> str | None:
    """Why ``value`` cannot be rewritten as a constant (None if it can)."""
    if value is None:
        return f"{what} is missing"
    if value.is_graph_input():
        return f"{what} {value.name!r} is a graph input (can be overridden at run time)"
    if value.is_graph_output():
        return f"{what} {value.name!r} is a graph output"
    if const_array(value) is None:
        return f"{what} {value.name!r} is not a constant"
    if not allow_shared and len(value.uses()) > 1:
        return f"{what} {value.name!r} is shared with another node"
    return None


def _set_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray, base: str) -> None:
    """Make input ``index`` of ``node`` the constant ``array``.

    An initializer read only by this node is updated in place (its name is kept);
    anything else (a shared initializer, a ``Constant`` output, an absent optional
    input) is replaced by a new initializer, leaving the original for other readers.
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if (
        old is not None
        and old.is_initializer()
        and not old.is_graph_input()
        and len(old.uses()) == 1
        and old.name in graph.initializers
    ):
        old.const_value = ir.tensor(np.ascontiguousarray(array), name=old.name)
        old.shape = ir.Shape(list(array.shape))
        return
    name = unique_name(graph, base)
    value = ir.Value(
        name=name,
        shape=ir.Shape(list(array.shape)),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(np.ascontiguousarray(array), name=name),
    )
    graph.register_initializer(value)
    if index < len(node.inputs):
        node.replace_input_with(index, value)
    else:
        # Absent optional trailing input (LayerNormalization's B).
        node.resize_inputs(index + 1)
        node.replace_input_with(index, value)
    if old is not None and not old.uses() and old.is_initializer() and not old.is_graph_input():
        graph.initializers.pop(old.name, None)


def _float_dtype(arr: np.ndarray | None) -> np.dtype:
    if arr is not None and np.issubdtype(arr.dtype, np.floating):
        return arr.dtype
    return np.dtype(np.float32)


# -------------------------------------------------------------------- norm
def check_norm(norm: ir.Node, z: np.ndarray | None, s: np.ndarray) -> str | None:
    """Why ``X̃ = (X − z) ⊘ s`` cannot be folded into ``norm`` (None if it can)."""
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    channels = s.size
    if not np.all(np.isfinite(s)) or np.any(s <= 0):
        return "scale must be finite and positive"
    if z is not None and (np.asarray(z).size != channels or not np.all(np.isfinite(z))):
        return "shift has the wrong size or is not finite"
    if norm.op_type == "LayerNormalization" and norm.domain == "":
        rms = False
    elif norm.op_type in _RMS_OPS:
        rms = True
    else:
        return f"{norm.op_type} is not a supported normalisation"
    if len(norm.outputs) > 1 and any(o.uses() for o in norm.outputs[1:]):
        return "the norm's mean/inv-std outputs are used"
    if rms and not _is_zero(z):
        return f"{norm.op_type} has no bias: the shift must be zero"
    reason = _const_reason(norm.inputs[1] if len(norm.inputs) > 1 else None,
                           "norm scale", allow_shared=True)
    if reason:
        return reason
    if const_array(norm.inputs[1]).size != channels:
        return f"norm scale has {const_array(norm.inputs[1]).size} entries, expected {channels}"
    if not rms and len(norm.inputs) > 2 and norm.inputs[2] is not None:
        reason = _const_reason(norm.inputs[2], "norm bias", allow_shared=True)
        if reason:
            return reason
        if const_array(norm.inputs[2]).size != channels:
            return "norm bias has the wrong size"
    out_channels = _channels_of(norm.outputs[0])
    if out_channels is not None and out_channels != channels:
        return f"norm output has {out_channels} channels, expected {channels}"
    if norm.outputs[0].is_graph_output():
        return f"norm output {norm.outputs[0].name!r} is a graph output"
    return None


def fold_into_norm(norm: ir.Node, z: np.ndarray | None, s: np.ndarray) -> str | None:
    """Fold ``X̃ = (X − z) ⊘ s`` into a normalisation: γ' = γ/s, β' = (β − z)/s.

    Returns:
        None on success, else the reason for refusing (the graph is unchanged).
    """
    reason = check_norm(norm, z, s)
    if reason:
        return reason
    graph = norm.graph
    assert graph is not None
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    gamma = const_array(norm.inputs[1])
    _set_const(graph, norm, 1, (gamma.astype(np.float64).reshape(-1) / s)
               .reshape(gamma.shape).astype(_float_dtype(gamma)),
               f"{norm.inputs[1].name or 'norm'}_folded")
    if norm.op_type == "LayerNormalization":
        has_beta = len(norm.inputs) > 2 and norm.inputs[2] is not None
        beta = const_array(norm.inputs[2]) if has_beta else None
        zz = np.zeros_like(s) if z is None else np.asarray(z, np.float64).reshape(-1)
        if beta is None and _is_zero(zz):
            return None
        base = beta.astype(np.float64).reshape(-1) if beta is not None else np.zeros_like(s)
        new = ((base - zz) / s).astype(_float_dtype(beta if beta is not None else gamma))
        if beta is not None:
            new = new.reshape(beta.shape)
        name = (norm.inputs[2].name if has_beta else f"{norm.inputs[1].name or 'norm'}_bias")
        _set_const(graph, norm, 2, new, f"{name}_folded")
    return None


# ------------------------------------------------------------------ linear
def check_linear(unit: LinearUnit, z: np.ndarray | None, s: np.ndarray) -> str | None:
    """Why the migration cannot be folded into ``unit`` (None if it can)."""
    s = np.asarray(s).reshape(-1)
    reason = _const_reason(unit.weight, "weight", allow_shared=False)
    if reason:
        return reason
    w = const_array(unit.weight)
    if w.ndim != 2 or w.shape[0] != s.size:
        return f"weight {unit.weight.name!r} has shape {w.shape}, expected [{s.size}, N]"
    if z is not None and np.asarray(z).size != s.size:
        return "shift has the wrong size"
    if unit.bias is not None:
        reason = _const_reason(unit.bias, "bias", allow_shared=True)
        if reason:
            return reason
    return None


def fold_into_linear(
    unit: LinearUnit, z: np.ndarray | None, s: np.ndarray, *, pass_name: str = "channel_fold"
) -> str | None:
    """Fold ``X̃ = (X − z) ⊘ s`` into a linear: b' = b + z W, then W' = W ⊙ s[:, None].

    A linear without bias gets an ``Add`` of a new bias when ``z ≠ 0``; the
    MatMul's output is renamed and the ``Add`` takes over its name (and graph
    output slot), so consumers are unaffected.  ``unit`` is updated in place.

    Returns:
        None on success, else the reason for refusing (the graph is unchanged).
    """
    reason = check_linear(unit, z, s)
    if reason:
        return reason
    graph = unit.matmul.graph
    assert graph is not None
    s64 = np.asarray(s, dtype=np.float64).reshape(-1)
    w = const_array(unit.weight)
    w64 = w.astype(np.float64)
    wname = unit.weight.name or "weight"
    if not _is_zero(z):
        shift = np.asarray(z, dtype=np.float64).reshape(-1) @ w64  # original W
        if unit.bias is not None:
            b = const_array(unit.bias)
            idx = list(unit.bias_add.inputs).index(unit.bias)
            new_b = (b.astype(np.float64).reshape(-1) + shift).reshape(b.shape)
            _set_const(graph, unit.bias_add, idx, new_b.astype(_float_dtype(b)),
                       f"{unit.bias.name or wname}_folded")
        else:
            _add_bias(graph, unit, shift.astype(_float_dtype(w)), pass_name)
    _set_const(graph, unit.matmul, 1, (w64 * s64[:, None]).astype(w.dtype), f"{wname}_folded")
    return None


def _add_bias(graph: ir.Graph, unit: LinearUnit, bias: np.ndarray, pass_name: str) -> None:
    mm_out = unit.matmul.outputs[0]
    name = mm_out.name or "linear"
    bias_name = unique_name(graph, f"{name}_bias")
    bias_val = ir.Value(
        name=bias_name, shape=ir.Shape(list(bias.shape)),
        type=ir.TensorType(ir.DataType.from_numpy(bias.dtype)),
        const_value=ir.tensor(np.ascontiguousarray(bias), name=bias_name),
    )
    graph.register_initializer(bias_val)
    out = ir.Value(name=None, shape=mm_out.shape, type=mm_out.type)
    add = ir.node(
        "Add", [mm_out, bias_val], outputs=[out],
        name=unique_name(graph, f"{name}_bias_Add"),
        metadata_props={PASS_KEY: pass_name, "onnxq.module": module_of(unit.matmul)},
    )
    mm_out.replace_all_uses_with(out, replace_graph_outputs=True)
    # add's own input was just rewired to itself; point it back at the MatMul.
    add.replace_input_with(0, mm_out)
    mm_out.name = unique_name(graph, f"{name}_nobias")
    out.name = name
    graph.insert_after(unit.matmul, add)
    unit.bias_add, unit.bias = add, bias_val


# ----------------------------------------------------------------- restore
def check_restore(value: ir.Value, consumers: Sequence[ir.Node]) -> str | None:
    """Why ``value`` cannot be restored for ``consumers`` (None if it can)."""
    if not consumers:
        return None
    if value.is_graph_output():
        return f"{value.name!r} is a graph output"
    graph = value.graph if value.graph is not None else (
        value.producer().graph if value.producer() is not None else None)
    for node in consumers:
        if node.graph is None or (graph is not None and node.graph is not graph):
            return f"consumer {node.name!r} is in a subgraph"
    return None


def _const_value(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    name = unique_name(graph, base)
    value = ir.Value(
        name=name, shape=ir.Shape(list(array.shape)),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(np.ascontiguousarray(array), name=name),
    )
    graph.register_initializer(value)
    return value


def _insert_mul_add(
    graph: ir.Graph, source: ir.Value, mul: np.ndarray, add: np.ndarray | None,
    base: str, pass_name: str, module: str, *, before: ir.Node | None = None,
) -> ir.Value:
    """Insert ``source * mul (+ add)`` after ``source``'s producer (or before ``before``)."""
    dtype = source.dtype.numpy() if source.dtype is not None else np.dtype(np.float32)
    meta = {PASS_KEY: pass_name}
    if module:
        meta["onnxq.module"] = module
    m_val = _const_value(graph, f"{base}_scale", mul.astype(dtype))
    m_out = ir.Value(name=unique_name(graph, f"{base}_mul" if add is not None else base),
                     shape=source.shape, type=source.type)
    nodes = [ir.node("Mul", [source, m_val], outputs=[m_out],
                     name=unique_name(graph, f"{base}_Mul"), metadata_props=dict(meta))]
    out = m_out
    if add is not None:
        a_val = _const_value(graph, f"{base}_shift", add.astype(dtype))
        out = ir.Value(name=unique_name(graph, base), shape=source.shape, type=source.type)
        nodes.append(ir.node("Add", [m_out, a_val], outputs=[out],
                             name=unique_name(graph, f"{base}_Add"),
                             metadata_props=dict(meta)))
    if before is not None:
        graph.insert_before(before, nodes)
    elif source.producer() is not None:
        graph.insert_after(source.producer(), nodes)
    else:  # a graph input: put the nodes first
        first = next(iter(graph), None)
        if first is None:
            graph.extend(nodes)
        else:
            graph.insert_before(first, nodes)
    return out


def _rewire(node: ir.Node, old: ir.Value, new: ir.Value) -> None:
    for i, inp in enumerate(node.inputs):
        if inp is old:
            node.replace_input_with(i, new)


def _residual_bias(add: ir.Node, value: ir.Value, channels: int) -> ir.Value | None:
    """The constant bias of the linear on the other side of residual ``add``, or None."""
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    if sum(inp is value for inp in add.inputs) != 1:
        return None
    other = add.inputs[1] if add.inputs[0] is value else add.inputs[0]
    node = other.producer() if other is not None else None
    if (node is None or node.op_type != "Add" or node.domain not in ("", "ai.onnx")
            or len(other.uses()) != 1 or other.is_graph_output()):
        return None
    for i, bias in enumerate(node.inputs):
        peer = node.inputs[1 - i]
        src = peer.producer() if peer is not None else None
        if (bias is None or bias.const_value is None or bias.producer() is not None
                or bias.is_graph_input()
                or len(bias.uses()) != 1 or src is None or src.op_type != "MatMul"):
            continue
        arr = const_array(bias)
        if arr.ndim == 1 and arr.size == channels and arr.dtype.kind == "f":
            return bias
    return None


def restore_for_consumers(
    value: ir.Value, consumers: Sequence[ir.Node], z: np.ndarray | None, s: np.ndarray,
    *, pass_name: str = "channel_fold",
) -> str | None:
    """Give ``consumers`` back the original ``X = X̃ ⊙ s + z`` of the migrated ``value``.

    Inserts ``Mul(s)`` then ``Add(z)`` (no ``Add`` when ``z == 0``) right after
    ``value``'s producer and rewires only ``consumers``.

    When the only consumer is a residual ``Add`` whose other operand is a linear's
    bias ``Add`` (``Add(MatMul(·), b)`` read by nothing else, ``b`` a constant of
    ``C`` channels used once), ``z`` is folded into that bias instead
    (``b ← b + z``): the Post-LN residual restore then costs one ``Mul``, and the
    ``Add`` → LayerNorm chain stays the shape onnxruntime fuses into
    ``SkipLayerNormalization``.

    Returns:
        None on success (also when ``consumers`` is empty), else the reason for refusing.
    """
    reason = check_restore(value, consumers)
    if reason or not consumers:
        return reason
    graph = value.graph or value.producer().graph
    producer = value.producer()
    module = module_of(producer) if producer is not None else ""
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    add = None if _is_zero(z) else np.asarray(z, dtype=np.float64).reshape(-1)
    if add is not None and len(consumers) == 1:
        bias = _residual_bias(consumers[0], value, add.size)
        if bias is not None:
            new = (const_array(bias).astype(np.float64) + add).astype(const_array(bias).dtype)
            bias.const_value = ir.tensor(np.ascontiguousarray(new), name=bias.name)
            bias_add = next(iter(bias.uses())).node
            bias_add.metadata_props[PASS_KEY] = pass_name  # its output now carries + z
            add = None
    restored = _insert_mul_add(graph, value, s, add, f"{value.name or 'value'}_restored",
                               pass_name, module)
    for node in consumers:
        _rewire(node, value, restored)
    return None


# ---------------------------------------------------------------- explicit
def insert_explicit_transform(
    value: ir.Value, units: Sequence[LinearUnit], z: np.ndarray | None, s: np.ndarray,
    *, pass_name: str = "channel_fold",
) -> str | None:
    """Compute ``X̃ = X ⊙ (1/s) + (−z/s)`` explicitly for ``units`` and fold into them.

    Only the linears in ``units`` read the new ``Mul``/``Add`` output; every other
    reader keeps ``value``.  Each unit is folded with :func:`fold_into_linear`.

    Returns:
        None on success, else the reason for refusing (the graph is unchanged).
    """
    for unit in units:
        if unit.input is not value:
            return f"{unit.module!r} does not read {value.name!r}"
        reason = check_linear(unit, z, s)
        if reason:
            return reason
    if not units:
        return "no linear to migrate"
    graph = units[0].matmul.graph
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    add = None if _is_zero(z) else -np.asarray(z, dtype=np.float64).reshape(-1) / s
    first = min(units, key=lambda u: list(graph).index(u.matmul)).matmul
    base = f"{value.name or 'value'}_migrated"
    new = _insert_mul_add(graph, value, 1.0 / s, add, base, pass_name,
                          module_of(units[0].matmul), before=first)
    for unit in units:
        _rewire(unit.matmul, value, new)
        fold_into_linear(unit, z, s, pass_name=pass_name)
        mark_folded(unit.matmul, pass_name)
    return None


# -------------------------------------------------------------------- site
def fold_site(
    norm: ir.Node, linears: Sequence[LinearUnit], others: Sequence[ir.Node],
    z: np.ndarray | None, s: np.ndarray, *, pass_name: str,
) -> str | None:
    """Fold a migration into a norm, all its linear consumers, and restore the rest.

    Everything is checked first; on refusal nothing is changed.  Folded nodes are
    marked with :data:`FOLDED_KEY`.

    Returns:
        None on success, else the reason for refusing.
    """
    value = norm.outputs[0]
    reason = check_norm(norm, z, s)
    for unit in linears:
        reason = reason or check_linear(unit, z, s)
    reason = reason or check_restore(value, others)
    if reason:
        return reason
    if not _is_zero(z) or np.any(np.asarray(s) != 1.0):
        fold_into_norm(norm, z, s)
        for unit in linears:
            fold_into_linear(unit, z, s, pass_name=pass_name)
        restore_for_consumers(value, others, z, s, pass_name=pass_name)
    mark_folded(norm, pass_name)
    for unit in linears:
        mark_folded(unit.matmul, pass_name)
    return None
