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


# ---- 4-bit packed rows ------------------------------------------------------------

from onnxq.passes.quantize_embeddings import pack_int4_rows, quantize_rows_int4  # noqa: E402


def _int4_reference(table, ids):
    """numpy per-row symmetric int4 dequantization of the looked-up rows."""
    amax = np.abs(table).max(axis=1).astype(np.float64)
    s = np.maximum(amax / 7.0, np.finfo(np.float32).tiny).astype(np.float32)
    q = np.clip(np.rint(table / s[:, None].astype(np.float64)), -7, 7)
    return q[ids].astype(np.float32) * s[ids][..., None], s


def test_int4_structure_and_size():
    model, table = _model()
    res = QuantizeEmbeddingsPass(min_elements=1000, bits=4)(model)
    assert res.modified and res.tables == ["emb.weight"] and res.bits == 4
    assert "emb.weight" not in model.graph.initializers
    floats = [v for v in model.graph.initializers.values()
              if v.const_value.numpy().dtype == np.float32 and v.const_value.numpy().ndim == 2]
    assert not floats  # no float table left
    p = model.graph.initializers["emb.weight_quantized_int4"].const_value.numpy()
    assert p.dtype == np.uint8 and p.shape == (300, 128)
    lo, hi = p & 15, p >> 4
    assert lo.min() >= 1 and hi.min() >= 1 and lo.max() <= 15 and hi.max() <= 15
    q, _ = quantize_rows_int4(table)
    np.testing.assert_array_equal(lo.astype(np.int8) - 8, q[:, 0::2])
    np.testing.assert_array_equal(hi.astype(np.int8) - 8, q[:, 1::2])
    counts = op_counts(model)
    assert counts["BitwiseAnd"] == 1 and counts["BitShift"] == 1
    # the packed table is gathered by ids directly: only looked-up rows are unpacked
    (gq,) = [n for n in model.graph
             if n.op_type == "Gather" and n.inputs[0].name == "emb.weight_quantized_int4"]
    assert gq.inputs[1].name == "ids"
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_int4_numerics_exact_vs_numpy_reference_opt_off_and_on():
    ids = np.array([[0, 5, 7, 299], [1, 2, 5, 5]], dtype=np.int64)
    for optimize in (False, True):
        model, table = _model()
        QuantizeEmbeddingsPass(min_elements=1000, bits=4)(model)
        (got,) = run(model, {"ids": ids}, optimize=optimize)
        want, s = _int4_reference(table, ids)
        np.testing.assert_array_equal(got, np.maximum(want, 0))
        ref = np.maximum(table[ids], 0)
        assert np.all(np.abs(got - ref) <= s[ids][..., None] / 2 + 1e-6)


def test_int4_odd_hidden():
    model, table = _model(vocab=301, hidden=255, output_direct=True, seed=3)
    QuantizeEmbeddingsPass(min_elements=1000, bits=4)(model)
    p = model.graph.initializers["emb.weight_quantized_int4"].const_value.numpy()
    assert p.shape == (301, 128)
    ids = np.array([[0, 5, 300, 17, 17]], dtype=np.int64)
    for optimize in (False, True):
        (got,) = run(model, {"ids": ids}, optimize=optimize)
        assert got.shape == (1, 5, 255)
        want, _ = _int4_reference(table, ids)
        np.testing.assert_array_equal(got, want)
    assert [o.name for o in model.graph.outputs] == ["y"]


def test_int4_pack_layout():
    q = np.array([[-7, 7, 0], [1, -1, 3]], np.int8)
    p = pack_int4_rows(q)
    assert p.shape == (2, 2)
    assert p[0, 0] == (1 | (15 << 4)) and p[0, 1] == (8 | (8 << 4))
    assert p[1, 0] == (9 | (7 << 4)) and p[1, 1] == (11 | (8 << 4))


def test_int4_contract_small_tables_untouched_and_idempotent():
    model, _ = _model(vocab=10, hidden=8)
    before = to_proto(model).SerializeToString(deterministic=True)
    assert not QuantizeEmbeddingsPass(bits=4)(model).modified
    assert to_proto(model).SerializeToString(deterministic=True) == before
    big, _ = _model()
    assert QuantizeEmbeddingsPass(min_elements=1000, bits=4)(big).modified
    once = to_proto(big).SerializeToString(deterministic=True)
    assert not QuantizeEmbeddingsPass(min_elements=1000, bits=4)(big).modified
    assert not QuantizeEmbeddingsPass(min_elements=1000)(big).modified
    assert to_proto(big).SerializeToString(deterministic=True) == once


def test_bits_validated_and_int8_default_unchanged():
    import pytest

    from onnxq.errors import OnnxqError

    with pytest.raises(OnnxqError):
        QuantizeEmbeddingsPass(bits=3)
    model, _ = _model()
    res = QuantizeEmbeddingsPass(min_elements=1000)(model)
    assert res.bits == 8
    assert model.graph.initializers["emb.weight_quantized"].const_value.numpy().dtype == np.int8
