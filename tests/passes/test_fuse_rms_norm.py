"""FuseRMSNormPass: structure, numerics, contract."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxq.passes.canonicalize import CanonicalizePass
from onnxq.passes.fuse_rms_norm import FuseRMSNormPass
from onnxq.testing import op_counts, run, to_proto

_TEXT = """
<ir_version: 10, opset_import: ["" : {opset}]>
g (float[B, S, 8] x) => (float[B, S, 8] y) <float[8] gamma = {gamma}, float two = {{2.0}},
                                              float eps = {{1e-6}}, int64[1] axes = {{-1}}> {{
    sq = Pow(x, two)
    ms = ReduceMean<keepdims: int = 1>(sq, axes)
    ae = Add(ms, eps)
    rt = Sqrt(ae)
    rc = Reciprocal(rt)
    nx = Mul(x, rc)
    y = Mul(gamma, nx)
}}
"""


def _model(opset=23):
    gamma = "{" + ", ".join(f"{v:.3f}" for v in np.linspace(0.5, 2.0, 8)) + "}"
    proto = onnx.parser.parse_model(_TEXT.format(opset=opset, gamma=gamma))
    return ir.serde.deserialize_model(proto)


def test_structure_and_numerics():
    model = _model()
    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32) * 3
    (before,) = run(model, {"x": x})
    res = FuseRMSNormPass()(model)
    assert res.modified
    counts = op_counts(model)
    assert counts == {"RMSNormalization": 1}
    (after,) = run(model, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
    assert [o.name for o in model.graph.outputs] == ["y"]
    onnx.checker.check_model(to_proto(model), full_check=True)


def test_contract_low_opset_and_idempotent():
    low = _model(opset=21)
    before = to_proto(low).SerializeToString(deterministic=True)
    assert not FuseRMSNormPass()(low).modified
    assert to_proto(low).SerializeToString(deterministic=True) == before
    model = _model()
    assert FuseRMSNormPass()(model).modified
    once = to_proto(model).SerializeToString(deterministic=True)
    assert not FuseRMSNormPass()(model).modified
    assert to_proto(model).SerializeToString(deterministic=True) == once


def test_canonicalize_fuses_rms_and_keeps_layer_norm_first():
    model = _model()
    assert CanonicalizePass()(model).modified
    assert op_counts(model)["RMSNormalization"] == 1


@pytest.mark.parametrize("variant", ["div", "mulself"])
def test_variants(variant):
    text = _TEXT
    if variant == "div":
        text = text.replace("    rc = Reciprocal(rt)\n    nx = Mul(x, rc)\n", "    nx = Div(x, rt)\n")
    else:
        text = text.replace("sq = Pow(x, two)", "sq = Mul(x, x)")
    gamma = "{" + ", ".join("1.0" for _ in range(8)) + "}"
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text.format(opset=23, gamma=gamma)))
    x = np.random.default_rng(1).standard_normal((1, 2, 8)).astype(np.float32)
    (before,) = run(model, {"x": x})
    assert FuseRMSNormPass()(model).modified
    (after,) = run(model, {"x": x})
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-6)
