"""Store large embedding tables as int8 with one scale per row (Bondarenko et al. 2021).

``Gather(E, ids)`` with a float table ``E[V, H]`` becomes::

    rows   = Gather(E_q, ids)                  # int8 [..., H]
    scales = Gather(s, ids)                    # float [...]
    out    = Cast(rows, float) * Unsqueeze(scales, -1)

with ``s[v] = max_h |E[v, h]| / 127`` and ``E_q = round(E / s[:, None])``. Only
the looked-up rows are dequantized, so the table stays int8 in memory at run
time (a ``DequantizeLinear`` in front of the Gather would rebuild the whole
float table on every call). All ops are standard ONNX that onnxruntime and
TensorRT run. The word-embedding table is most of a small encoder's bytes
(all-MiniLM-L6-v2: 47 MB of 90 MB), so this is what brings an INT8 file to a
quarter of the FP32 size.

With ``bits=4`` the rows are symmetric int4 (``s[v] = max_h |E[v, h]| / 7``,
values in [-7, 7]) packed two per byte in a uint8 table ``[V, ceil(H/2)]``: the
low nibble holds the even column, the high nibble the odd one, each stored as
``q + 8`` (1..15). After the Gather only the looked-up rows are unpacked::

    rows  = Gather(E_p, ids)                              # uint8 [..., H/2]
    lo    = BitwiseAnd(rows, 15); hi = BitShift(rows, 4, "RIGHT")
    nib   = Gather(Concat(lo, hi, axis=-1), perm, axis=-1)  # interleave (drops pad)
    out   = (Cast(nib, float) - 8) * Unsqueeze(Gather(s, ids), -1)

``BitwiseAnd`` needs opset 18; older graphs keep the int8 path.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxq.errors import OnnxqError
from onnxq.passes._ir_utils import const_array, make_initializer, unique_name

__all__ = ["QuantizeEmbeddingsPass", "pack_int4_rows", "quantize_rows", "quantize_rows_int4"]

logger = logging.getLogger(__name__)
PASS_TAG = "QuantizeEmbeddingsPass"


def _quantize_rows(table: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(table).max(axis=1).astype(np.float64)
    scale = np.maximum(amax / float(qmax), np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None].astype(np.float64)), -qmax, qmax).astype(np.int8)
    return q, scale


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per-row quantization: ``table ≈ q * scale[:, None]``."""
    return _quantize_rows(table, 127)


def quantize_rows_int4(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 per-row quantization: ``table ≈ q * scale[:, None]``, q in [-7, 7]."""
    return _quantize_rows(table, 7)


def pack_int4_rows(q: np.ndarray) -> np.ndarray:
    """Pack int4 ``q[V, H]`` into uint8 ``[V, ceil(H/2)]``: even column in the low
    nibble, odd column in the high nibble, each offset by +8 (odd H pads with 0)."""
    n = (q.astype(np.int16) + 8).astype(np.uint8)
    if n.shape[1] % 2:
        n = np.concatenate([n, np.full((n.shape[0], 1), 8, np.uint8)], axis=1)
    return (n[:, 0::2] | (n[:, 1::2] << 4)).astype(np.uint8)


def _replace_gather(graph: ir.Graph, node: ir.Node, table_v: ir.Value,
                    new_nodes: list[ir.Node], new_out: ir.Value) -> None:
    """Put ``new_nodes`` (computing ``new_out``) in place of the Gather ``node``; drop its table."""
    graph.insert_before(node, new_nodes)
    out = node.outputs[0]
    if out.type is not None:
        new_out.type = out.type
    new_out.shape = out.shape
    was_output = out.is_graph_output()
    out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    if was_output:  # keep the graph output's name
        name = out.name
        out.name = None
        new_out.name = name
    del graph.initializers[table_v.name]


@dataclasses.dataclass
class EmbeddingResult(ir.passes.PassResult):
    tables: list[str] = dataclasses.field(default_factory=list)
    bits: int = 8


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Quantize float embedding tables read by ``Gather`` to int8 rows.

    Args:
        min_elements: tables smaller than this stay float (position and
            token-type tables are tiny and the gain would be nil).
        bits: 8 (int8 rows) or 4 (int4 rows packed two per byte; needs opset
            18 for ``BitwiseAnd``, older graphs get int8 rows).
    """

    def __init__(self, *, min_elements: int = 65536, bits: int = 8) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise OnnxqError(f"embedding bits must be 8 or 4, not {bits}")
        self.min_elements = min_elements
        self.bits = bits

    def call(self, model: ir.Model) -> EmbeddingResult:
        graph = model.graph
        bits = self.bits
        if bits == 4 and graph.opset_imports.get("", 0) < 18:
            logger.warning("int4 embeddings need opset >= 18 (BitwiseAnd); using int8 rows")
            bits = 8
        result = EmbeddingResult(model, False, bits=bits)
        for node in list(graph):
            if node.op_type != "Gather" or node.domain != "":
                continue
            if node.attributes.get_int("axis", 0) != 0:
                continue
            table_v = node.inputs[0]
            table = const_array(table_v)
            if table is None or table.ndim != 2 or table.size < self.min_elements:
                continue
            if not np.issubdtype(table.dtype, np.floating):
                continue
            if any(use.node is not node for use in table_v.uses()) or table_v.is_graph_output():
                continue  # tied weights (e.g. an LM head) keep the float table
            if bits == 4:
                self._rewrite_int4(graph, node, table_v, table)
            else:
                self._rewrite(graph, node, table_v, table)
            result.tables.append(table_v.name or "")
            result.modified = True
        if result.modified:
            graph.sort()
        logger.info("Quantized %s embedding tables to int%s", len(result.tables), bits)
        return result

    def _rewrite(self, graph: ir.Graph, node: ir.Node, table_v: ir.Value, table: np.ndarray):
        base = table_v.name or "embedding"
        q, scale = quantize_rows(table.astype(np.float32))
        q_v = make_initializer(graph, f"{base}_quantized", q)
        s_v = make_initializer(graph, f"{base}_row_scale", scale)
        axes = make_initializer(graph, f"{base}_unsqueeze_axes", np.array([-1], np.int64))
        ids = node.inputs[1]
        meta = {"onnxq.pass": PASS_TAG, "onnxq.module": node.metadata_props.get("onnxq.module", "")}

        def val(suffix: str) -> ir.Value:
            return ir.Value(name=unique_name(graph, f"{base}_{suffix}"))

        rows, rows_f, srow, srow_u = val("rows"), val("rows_float"), val("scales"), val("scales_u")
        float_type = table_v.dtype or ir.DataType.FLOAT
        new_nodes = [
            ir.node("Gather", [q_v, ids], {"axis": 0}, outputs=[rows],
                    name=unique_name(graph, f"{base}_GatherQ"), metadata_props=dict(meta)),
            ir.node("Cast", [rows], {"to": float_type}, outputs=[rows_f],
                    name=unique_name(graph, f"{base}_Cast"), metadata_props=dict(meta)),
            ir.node("Gather", [s_v, ids], {"axis": 0}, outputs=[srow],
                    name=unique_name(graph, f"{base}_GatherScale"), metadata_props=dict(meta)),
            ir.node("Unsqueeze", [srow, axes], outputs=[srow_u],
                    name=unique_name(graph, f"{base}_Unsqueeze"), metadata_props=dict(meta)),
        ]
        mul = ir.node("Mul", [rows_f, srow_u], outputs=[ir.Value(name=unique_name(graph, f"{base}_deq"))],
                      name=unique_name(graph, f"{base}_Mul"), metadata_props=dict(meta))
        _replace_gather(graph, node, table_v, [*new_nodes, mul], mul.outputs[0])

    def _rewrite_int4(self, graph: ir.Graph, node: ir.Node, table_v: ir.Value, table: np.ndarray):
        base = table_v.name or "embedding"
        hidden = table.shape[1]
        half = (hidden + 1) // 2
        q, scale = quantize_rows_int4(table.astype(np.float32))
        # Concat(lo, hi) puts column 2j at j and column 2j+1 at half + j.
        perm = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)[:hidden]
        p_v = make_initializer(graph, f"{base}_quantized_int4", pack_int4_rows(q))
        s_v = make_initializer(graph, f"{base}_row_scale", scale)
        axes = make_initializer(graph, f"{base}_unsqueeze_axes", np.array([-1], np.int64))
        mask = make_initializer(graph, f"{base}_nibble_mask", np.array(15, np.uint8))
        shift = make_initializer(graph, f"{base}_nibble_shift", np.array(4, np.uint8))
        perm_v = make_initializer(graph, f"{base}_nibble_order", perm.astype(np.int64))
        float_type = table_v.dtype or ir.DataType.FLOAT
        offset = make_initializer(graph, f"{base}_nibble_offset",
                                  np.array(8, float_type.numpy()))
        ids = node.inputs[1]
        meta = {"onnxq.pass": PASS_TAG, "onnxq.module": node.metadata_props.get("onnxq.module", "")}

        def val(suffix: str) -> ir.Value:
            return ir.Value(name=unique_name(graph, f"{base}_{suffix}"))

        def mk(op, inputs, attrs, out_v, suffix):
            return ir.node(op, inputs, attrs, outputs=[out_v],
                           name=unique_name(graph, f"{base}_{suffix}"), metadata_props=dict(meta))

        rows, lo, hi, both, nib = val("rows"), val("lo"), val("hi"), val("nibbles"), val("nib")
        nib_f, centered, srow, srow_u = val("nib_float"), val("centered"), val("scales"), val("scales_u")
        new_out = val("deq")
        new_nodes = [
            mk("Gather", [p_v, ids], {"axis": 0}, rows, "GatherQ"),
            mk("BitwiseAnd", [rows, mask], {}, lo, "LowNibble"),
            mk("BitShift", [rows, shift], {"direction": "RIGHT"}, hi, "HighNibble"),
            mk("Concat", [lo, hi], {"axis": -1}, both, "Concat"),
            mk("Gather", [both, perm_v], {"axis": -1}, nib, "Interleave"),
            mk("Cast", [nib], {"to": float_type}, nib_f, "Cast"),
            mk("Sub", [nib_f, offset], {}, centered, "Sub"),
            mk("Gather", [s_v, ids], {"axis": 0}, srow, "GatherScale"),
            mk("Unsqueeze", [srow, axes], {}, srow_u, "Unsqueeze"),
            mk("Mul", [centered, srow_u], {}, new_out, "Mul"),
        ]
        _replace_gather(graph, node, table_v, new_nodes, new_out)
