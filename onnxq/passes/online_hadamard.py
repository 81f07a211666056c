"""Hadamard rotation of linear inputs that cannot be rotated offline (QuaRot, Quamba, HALO).

For a linear ``y = x W + b`` (``W`` is ``[n, N]``, rows are inputs) and any
orthogonal ``Q`` (``Q Qᵀ = I``)::

    y = (x Q)(Qᵀ W) + b

so inserting ``x ← x Q`` and folding ``W ← Qᵀ W`` leaves the function unchanged,
while the quantized activation ``x Q`` has its outlier channels spread over all
``n`` channels.  ``Q = diag(s) · H_n / √n`` (random signs ``s`` from ``seed``,
none when ``seed`` is None; see :mod:`onnxq.passes.hadamard`).

Two variants:

``"down_proj"`` (or any module glob such as ``"*.mlp.down_proj"``): online
    Quamba's out_proj and QuaRot's down_proj input: the producer is a nonlinearity
    (``SiLU(gate) · up``, ``Gelu``), so ``Q`` is computed in the graph.  No ONNX
    Hadamard op exists (methods §0.2): for ``n ≤ max_dense`` one ``MatMul`` with the
    ``n × n`` constant; otherwise ``H_n = H_a ⊗ H_b`` (``kron_factors``) with ``x``
    reshaped row-major to ``(…, a, b)``: ``x H_n = vec(H_aᵀ X H_b)``, i.e.
    ``[Mul(s)] → Reshape(…, a, b) → MatMul(X, H_b) → MatMul(H_aᵀ, ·) → Reshape(…, n)``,
    ``O(n(a + b))`` per row instead of ``O(n²)`` and two tiny constants, so that
    11008 = 172 · 64 and 5120 = 80 · 64 work.  Inserted nodes carry
    ``onnxq.module = "<linear module>.online_hadamard"``: keep them in floating
    point (``InsertQDQPass(keep_fp=["*.online_hadamard"])``) — their own input is
    the unrotated activation.

``"attention_out"``: offline, per head (QuaRot's ``H_head`` on V/O)
    The attention output of head ``h`` is ``P_h V_g`` with ``V_g = x W_v[:, g] + b_v[g]``
    for its key/value head ``g`` (GQA), and ``o_proj`` reads the concatenated heads.
    With the block-diagonal ``Q = I ⊗ Q_d`` over ``head_dim``:
    ``W_v[:, g] ← W_v[:, g] Q_d``, ``b_v[g] ← b_v[g] Q_d`` for every kv head and
    ``W_o[h rows] ← Q_dᵀ W_o[h rows]`` for every query head; softmax and the
    head layout are untouched, so no online op is needed.  The v_proj / o_proj
    pair is found structurally (PV ``MatMul`` ← Reshape/Transpose/Expand/Concat ←
    v_proj; PV → Transpose/Reshape → o_proj).  With a KV cache the cached values
    are stored rotated (consistent for a cache the rotated graph wrote).

Folded linears are marked ``metadata_props["onnxq.hadamard"]`` and skipped on
later runs (idempotence).  A candidate that cannot be rewritten (non-constant or
graph-input weight, unknown input rank, unsupported size) is recorded in
``result.skipped`` with the reason, and the graph is left as it was for it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxq.passes._ir_utils import PASS_KEY, make_initializer, unique_name
from onnxq.passes._patterns import (
    LinearUnit,
    const_array,
    find_attention_matmuls,
    find_linears,
    is_const,
)
from onnxq.passes.channel_fold import ChannelFoldResult, _set_const
from onnxq.passes.hadamard import (
    hadamard_matrix,
    is_supported,
    kron_factors,
    random_signs,
    rotate_last,
)

__all__ = ["HADAMARD_KEY", "OnlineHadamardPass", "fold_hadamard_into_rows", "insert_online_hadamard"]

#: Metadata key marking linears into which a Hadamard rotation was folded.
HADAMARD_KEY = "onnxq.hadamard"

_ACTIVATIONS = {"Gelu", "Relu", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus", "HardSwish",
                "Swish", "Mish"}
_V_PATH = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze", "Concat", "Identity",
           "Cast", "Tile"}
_O_PATH = {"Transpose", "Reshape", "Identity", "Cast"}


def fold_hadamard_into_rows(w: np.ndarray, seed: int | None) -> np.ndarray:
    """``Qᵀ W`` for a ``[n, N]`` weight, ``Q = diag(s) H_n / √n`` (float64)."""
    return rotate_last(np.asarray(w, np.float64).T, seed=seed).T


def insert_online_hadamard(
    graph: ir.Graph,
    node: ir.Node,
    n: int,
    *,
    seed: int | None,
    dense: bool,
    metadata: dict[str, str],
    base: str | None = None,
    matrix_suffix: str = "hadamard",
) -> tuple[list[ir.Node], tuple[int, ...]]:
    """Rotate input 0 of ``node`` in the graph: ``x ← x Q``, ``Q = diag(s) H_n / √n``.

    ``dense``: one ``MatMul`` with the ``n × n`` constant ``Q`` (initializer
    ``<base>_<matrix_suffix>``); otherwise the Kronecker form ``H_n = H_a ⊗ H_b``,
    ``[Mul(s)] → Reshape(…, a, b) → MatMul(·, H_b) → MatMul(H_aᵀ, ·) → Reshape(…, n)``,
    which needs the rank of ``x`` (the caller checks it is known).  Every inserted node
    carries a copy of ``metadata``; value and initializer names start with ``base``
    (default: ``x``'s name, else ``"x"``).  Folding ``Qᵀ`` into the weight is left
    to the caller.

    Returns:
        The inserted nodes (in order) and the factors: ``(n,)`` dense, ``(a, b)`` otherwise.
    """
    x = node.inputs[0]
    base = base or x.name or "x"
    dtype = x.dtype.numpy() if x.dtype is not None else np.dtype(np.float32)
    nodes: list[ir.Node] = []

    def new_out(suffix: str, shape: ir.Shape | None = None) -> ir.Value:
        return ir.Value(name=unique_name(graph, f"{base}_{suffix}"), type=x.type, shape=shape)

    def add(op: str, inputs: list[ir.Value], out: ir.Value) -> ir.Value:
        nodes.append(ir.node(op, inputs, outputs=[out],
                             name=unique_name(graph, f"{out.name}_{op}"),
                             metadata_props=dict(metadata)))
        return out

    if dense:
        h = make_initializer(graph, f"{base}_{matrix_suffix}",
                             hadamard_matrix(n, seed=seed).astype(dtype))
        y = add("MatMul", [x, h], new_out("hadamard", x.shape))
        factors: tuple[int, ...] = (n,)
    else:
        a, b = kron_factors(n)
        cur = x
        if seed is not None:
            sv = make_initializer(graph, f"{base}_hadamard_signs",
                                  random_signs(n, seed).astype(dtype))
            cur = add("Mul", [cur, sv], new_out("hadamard_signed", x.shape))
        lead = [0] * (len(x.shape) - 1)
        shp = make_initializer(graph, f"{base}_hadamard_shape",
                               np.array(lead + [a, b], dtype=np.int64))
        cur = add("Reshape", [cur, shp], new_out("hadamard_ab"))
        hb = make_initializer(graph, f"{base}_hadamard_b", hadamard_matrix(b).astype(dtype))
        cur = add("MatMul", [cur, hb], new_out("hadamard_b"))
        hat = make_initializer(graph, f"{base}_hadamard_aT",
                               hadamard_matrix(a).T.astype(dtype).copy())
        cur = add("MatMul", [hat, cur], new_out("hadamard_ab_rot"))
        back = make_initializer(graph, f"{base}_hadamard_back",
                                np.array(lead + [n], dtype=np.int64))
        y = add("Reshape", [cur, back], new_out("hadamard", x.shape))
        factors = (a, b)
    graph.insert_before(node, nodes)
    node.replace_input_with(0, y)
    return nodes, factors


def _weight_reason(unit: LinearUnit) -> str | None:
    w = unit.weight
    if w.is_graph_input():
        return f"weight {w.name!r} is a graph input"
    if w.is_graph_output():
        return f"weight {w.name!r} is a graph output"
    if const_array(w) is None:
        return f"weight {w.name!r} is not a constant"
    return None


def _is_ffn_down(unit: LinearUnit) -> bool:
    producer = unit.input.producer()
    if producer is None:
        return False
    if producer.op_type in _ACTIVATIONS:
        return True
    if producer.op_type == "Mul" and producer.domain == "":
        return all(i is not None and not is_const(i) for i in producer.inputs)
    return False


class OnlineHadamardPass(ir.passes.InPlacePass):
    """Hadamard-rotate linear inputs: online before FFN down-projections, offline per head on V/O.

    Args:
        targets: one or more of ``"down_proj"`` (linears fed by a nonlinearity or a
            gated product), ``"attention_out"`` (per-head fold into v_proj/o_proj),
            or module-path globs (``"*.mlp.down_proj"``) selecting linears for the
            online rotation.
        seed: random-sign seed (None: plain Hadamard).
        max_dense: widths up to this use one dense ``MatMul``; wider ones the
            Kronecker pair of MatMuls.
        head_dim: head size for ``"attention_out"``; inferred from the graph if None.
    """

    def __init__(
        self,
        *,
        targets: str | Sequence[str] = "down_proj",
        seed: int | None = None,
        max_dense: int = 512,
        head_dim: int | None = None,
    ) -> None:
        super().__init__()
        self.targets = (targets,) if isinstance(targets, str) else tuple(targets)
        self.seed = seed
        self.max_dense = max_dense
        self.head_dim = head_dim

    # ----------------------------------------------------------- call
    def call(self, model: ir.Model) -> ChannelFoldResult:
        result = ChannelFoldResult(model, False)
        graph = model.graph
        name = type(self).__name__
        # the Hadamard MatMuls this pass inserted are linears too: never rotate them
        units = [u for u in find_linears(graph) if u.matmul.metadata_props.get(PASS_KEY) != name]
        patterns = [t for t in self.targets if t not in ("down_proj", "attention_out")]
        online = [u for u in units
                  if ("down_proj" in self.targets and _is_ffn_down(u))
                  or any(fnmatch.fnmatchcase(u.module, p) for p in patterns)]
        for unit in online:
            if HADAMARD_KEY in unit.matmul.metadata_props:
                continue
            reason = self._online(graph, unit, result)
            if reason:
                result.skipped.append({"module": unit.module, "reason": reason})
        if "attention_out" in self.targets:
            self._attention(graph, units, result)
        return result

    # --------------------------------------------------------- online
    def _online(self, graph: ir.Graph, unit: LinearUnit, result: ChannelFoldResult) -> str | None:
        reason = _weight_reason(unit)
        if reason:
            return reason
        w = const_array(unit.weight)
        n = w.shape[0]
        if not is_supported(n):
            return f"no Hadamard matrix of order {n}"
        x = unit.input
        dense = n <= self.max_dense
        if not dense and x.shape is None:
            return f"input {x.name!r} has unknown rank (needed for the Kronecker reshape)"
        name = type(self).__name__
        module = f"{unit.module or unit.matmul.name}.online_hadamard"
        nodes, factors = insert_online_hadamard(
            graph, unit.matmul, n, seed=self.seed, dense=dense,
            metadata={PASS_KEY: name, "onnxq.module": module})
        _set_const(graph, unit.matmul, 1,
                   fold_hadamard_into_rows(w, self.seed).astype(w.dtype),
                   f"{unit.weight.name or 'weight'}_hadamard")
        unit.matmul.metadata_props[HADAMARD_KEY] = name
        result.modified = True
        result.sites.append({"module": unit.module, "method": "online", "size": n,
                             "factors": factors, "seed": self.seed,
                             "nodes": [nd.op_type for nd in nodes]})
        return None

    # ------------------------------------------------------ attention
    def _attention(self, graph: ir.Graph, units: list[LinearUnit],
                   result: ChannelFoldResult) -> None:
        by_output = {id(u.output): u for u in units}
        by_matmul = {id(u.matmul): u for u in units}
        name = type(self).__name__
        for att in find_attention_matmuls(graph):
            if att.kind != "pv":
                continue
            pair = _v_o_pair(att.node, by_output, by_matmul)
            if isinstance(pair, str):
                result.skipped.append({"module": att.module or att.node.name, "reason": pair})
                continue
            v_unit, o_unit = pair
            if (HADAMARD_KEY in v_unit.matmul.metadata_props
                    or HADAMARD_KEY in o_unit.matmul.metadata_props):
                continue
            reason, hd = self._fold_heads(graph, att.node, v_unit, o_unit)
            if reason:
                result.skipped.append({"module": v_unit.module, "reason": reason})
                continue
            for unit in (v_unit, o_unit):
                unit.matmul.metadata_props[HADAMARD_KEY] = name
            result.modified = True
            result.sites.append({"module": o_unit.module, "method": "per_head",
                                 "v_proj": v_unit.module, "o_proj": o_unit.module,
                                 "head_dim": hd, "seed": self.seed})

    def _fold_heads(self, graph: ir.Graph, pv: ir.Node, v_unit: LinearUnit,
                    o_unit: LinearUnit) -> tuple[str | None, int | None]:
        """Fold ``I ⊗ Q_d`` into v_proj's columns and ``I ⊗ Q_dᵀ`` into o_proj's rows."""
        for unit in (v_unit, o_unit):
            reason = _weight_reason(unit)
            if reason:
                return reason, None
        if v_unit.bias is not None and const_array(v_unit.bias) is None:
            return "v_proj bias is not a constant", None
        wv, wo = const_array(v_unit.weight), const_array(o_unit.weight)
        hd = self.head_dim or _infer_head_dim(pv)
        if hd is None:
            return "cannot infer head_dim; pass head_dim=", None
        if wv.shape[1] % hd or wo.shape[0] % hd:
            return (f"head_dim {hd} does not divide v_proj ({wv.shape[1]}) / "
                    f"o_proj ({wo.shape[0]})"), None
        if not is_supported(hd):
            return f"no Hadamard matrix of order {hd}", None
        k = wv.shape[0]
        new_v = rotate_last(wv.astype(np.float64).reshape(k, -1, hd), seed=self.seed)
        _set_const(graph, v_unit.matmul, 1, new_v.reshape(wv.shape).astype(wv.dtype),
                   f"{v_unit.weight.name or 'v'}_hadamard")
        if v_unit.bias is not None:
            b = const_array(v_unit.bias)
            nb = rotate_last(b.astype(np.float64).reshape(-1, hd), seed=self.seed)
            idx = list(v_unit.bias_add.inputs).index(v_unit.bias)
            _set_const(graph, v_unit.bias_add, idx, nb.reshape(b.shape).astype(b.dtype),
                       f"{v_unit.bias.name or 'v_bias'}_hadamard")
        n_out = wo.shape[1]
        wt = rotate_last(wo.astype(np.float64).T.reshape(n_out, -1, hd), seed=self.seed)
        _set_const(graph, o_unit.matmul, 1, wt.reshape(n_out, -1).T.astype(wo.dtype).copy(),
                   f"{o_unit.weight.name or 'o'}_hadamard")
        return None, hd


def _infer_head_dim(pv: ir.Node) -> int | None:
    for value in (pv.inputs[1], pv.outputs[0]):
        if value is not None and value.shape is not None and len(value.shape) >= 3:
            last = value.shape[-1]
            if isinstance(last, int):
                return last
    # the Reshape that splits v_proj's output into heads: [..., heads, head_dim]
    v = pv.inputs[1]
    for _ in range(8):
        node = v.producer() if v is not None else None
        if node is None:
            return None
        if node.op_type == "Reshape":
            shape = const_array(node.inputs[1])
            if shape is not None and shape.size >= 3 and shape[-1] > 0:
                return int(shape[-1])
        nxt = [i for i in node.inputs if i is not None and not is_const(i)
               and not i.is_graph_input()]
        v = nxt[0] if nxt else None
    return None


def _v_o_pair(pv: ir.Node, by_output, by_matmul) -> tuple[LinearUnit, LinearUnit] | str:
    # back from V to v_proj
    frontier = [pv.inputs[1]]
    found: list[LinearUnit] = []
    for _ in range(12):
        nxt = []
        for v in frontier:
            unit = by_output.get(id(v))
            if unit is not None:
                found.append(unit)
                continue
            node = v.producer()
            if node is None:
                if v.is_graph_input():
                    continue  # the past value cache
                return f"V {v.name!r} has no producer"
            if node.op_type not in _V_PATH:
                return f"V path goes through {node.op_type} {node.name!r}"
            # follow the data input only (not Reshape/Expand shape computations)
            data = node.inputs if node.op_type == "Concat" else node.inputs[:1]
            nxt.extend(i for i in data if i is not None and not is_const(i))
        frontier = nxt
        if not frontier:
            break
    if len(found) != 1:
        return f"V of {pv.name!r} does not come from exactly one v_proj"
    v_unit = found[0]
    if len(v_unit.output.uses()) != 1 or v_unit.output.is_graph_output():
        return f"v_proj output {v_unit.output.name!r} has other readers"
    # forward from PV to o_proj
    value = pv.outputs[0]
    for _ in range(6):
        if value.is_graph_output():
            return f"{value.name!r} is a graph output"
        uses = list(value.uses())
        if len(uses) != 1:
            return f"attention output {value.name!r} has {len(uses)} readers"
        node = uses[0].node
        unit = by_matmul.get(id(node))
        if unit is not None and uses[0].idx == 0:
            return v_unit, unit
        if node.op_type not in _O_PATH:
            return f"attention output goes through {node.op_type} {node.name!r}"
        value = node.outputs[0]
    return f"no o_proj found after {pv.name!r}"

