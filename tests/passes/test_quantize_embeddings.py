"""QuantizeEmbeddingsPass: structure, numerics, contract."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from onnxq.passes.quantize_embeddings import QuantizeEmbeddingsPass, quantize_rows
from onnxq.testing import op_counts, run, to_proto


def _model(vocab=300, hidden=256, output_direct=False, seed=0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    table[5] *= 40.0  # one row with a much larger range: per-row scales keep the others exact
    ids = ir.val("ids", ir.DataType.INT64, ["b", "s"])
    tv = ir.Value(name="emb.weight", shape=ir.Shape([vocab, hidden]),
                  type=ir.TensorType(ir.DataType.FLOAT), const_value=ir.tensor(table))
    g_out = ir.Value(name="emb" if not output_direct else "y")
    gather = ir.node("Gather", [tv, ids], {"axis": 0}, outputs=[g_out], name="gather")
    nodes = [gather]
    if output_direct:
        y = g_out
    else:
        y = ir.Value(name="y")
        nodes.append(ir.node("Relu", [g_out], outputs=[y], name="relu"))
    y.dtype = ir.DataType.FLOAT
    y.shape = ir.Shape(["b", "s", hidden])
    graph = ir.Graph([ids], [y], nodes=nodes, initializers=[tv], opset_imports={"": 21},
                     name="emb")
    return ir.Model(graph, ir_version=10), table


def test_structure_and_size():
    model, _ = _model()
    res = QuantizeEmbeddingsPass(min_elements=1000)(model)
    assert res.modified and res.tables == ["emb.weight"]
    counts = op_counts(model)
    assert counts["Gather"] == 2 and counts["Cast"] == 1 and counts["Mul"] == 1
    assert "emb.weight" not in model.graph.initializers
    q = model.graph.initializers["emb.weight_quantized"].const_value.numpy()
    assert q.dtype == np.int8
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_numerics_match_per_row_reference():
    model, table = _model()
    ids = np.array([[0, 5, 7, 299], [1, 2, 5, 5]], dtype=np.int64)
    QuantizeEmbeddingsPass(min_elements=1000)(model)
    (got,) = run(model, {"ids": ids})
    q, s = quantize_rows(table)
    want = np.maximum(q[ids].astype(np.float32) * s[ids][..., None], 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    # per-row error bounded by half a step of that row
    ref = np.maximum(table[ids], 0)
    assert np.all(np.abs(got - ref) <= s[ids][..., None] / 2 + 1e-6)


def test_graph_output_keeps_its_name():
    model, table = _model(output_direct=True)
    QuantizeEmbeddingsPass(min_elements=1000)(model)
    assert [o.name for o in model.graph.outputs] == ["y"]
    (got,) = run(model, {"ids": np.array([[3]], np.int64)})
    assert np.abs(got - table[[[3]]]).max() < np.abs(table[3]).max() / 127


def test_contract_small_tables_untouched_and_idempotent():
    model, _ = _model(vocab=10, hidden=8)
    before = to_proto(model).SerializeToString(deterministic=True)
    res = QuantizeEmbeddingsPass()(model)
    assert not res.modified
    assert to_proto(model).SerializeToString(deterministic=True) == before
    big, _ = _model()
    assert QuantizeEmbeddingsPass(min_elements=1000)(big).modified
    once = to_proto(big).SerializeToString(deterministic=True)
    assert not QuantizeEmbeddingsPass(min_elements=1000)(big).modified
    assert to_proto(big).SerializeToString(deterministic=True) == once
