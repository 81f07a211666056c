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
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxq.passes._ir_utils import const_array, make_initializer, unique_name

__all__ = ["QuantizeEmbeddingsPass", "quantize_rows"]

logger = logging.getLogger(__name__)
PASS_TAG = "QuantizeEmbeddingsPass"


def quantize_rows(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per-row quantization: ``table ≈ q * scale[:, None]``."""
    amax = np.abs(table).max(axis=1).astype(np.float64)
    scale = np.maximum(amax / 127.0, np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None].astype(np.float64)), -127, 127).astype(np.int8)
    return q, scale


@dataclasses.dataclass
class EmbeddingResult(ir.passes.PassResult):
    tables: list[str] = dataclasses.field(default_factory=list)


class QuantizeEmbeddingsPass(ir.passes.InPlacePass):
    """Quantize float embedding tables read by ``Gather`` to int8 rows.

    Args:
        min_elements: tables smaller than this stay float (position and
            token-type tables are tiny and the gain would be nil).
    """

    def __init__(self, *, min_elements: int = 65536) -> None:
        super().__init__()
        self.min_elements = min_elements

    def call(self, model: ir.Model) -> EmbeddingResult:
        graph = model.graph
        result = EmbeddingResult(model, False)
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
            self._rewrite(graph, node, table_v, table)
            result.tables.append(table_v.name or "")
            result.modified = True
        if result.modified:
            graph.sort()
        logger.info("Quantized %s embedding tables to int8", len(result.tables))
        return result

    def _rewrite(self, graph: ir.Graph, node: ir.Node, table_v: ir.Value, table: np.ndarray):
        base = table_v.name or "embedding"
        q, scale = quantize_rows(table.astype(np.float32))
        q_v = make_initializer(graph, f"{base}_quantized", q)
        s_v = make_initializer(graph, f"{base}_row_scale", scale)
        axes = make_initializer(graph, f"{base}_unsqueeze_axes", np.array([-1], np.int64))
        ids = node.inputs[1]
        out = node.outputs[0]
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
        graph.insert_before(node, [*new_nodes, mul])
        new_out = mul.outputs[0]
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
