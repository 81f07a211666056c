"""Tests for onnxq.targets.lint: one valid TRT-style QDQ graph, one mutation per rule."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxq.errors import OnnxqError
from onnxq.targets.lint import Violation, format_violations, linear_weight_coverage, lint
from onnxq.targets.profiles import TARGETS

D = 16  # hidden size
S = 8  # sequence length


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


class _Graph:
    """A small transformer-ish block built from onnx.helper pieces.

    X -> Q/DQ -> MatMul_q (int8 per-channel W) -> Add_res(+X) -> LN1 -> H
    H -> Q/DQ -> MatMul_qk(·, Q/DQ(Transpose H)) -> Add_mask(+mask) -> Softmax
      -> Q/DQ -> MatMul_pv(·, DQ H) -> Q/DQ -> MatMul_o (int8 per-channel W) -> Z
    """

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.opset = 21
        self.extra_opsets: list[onnx.OperatorSetIdProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(_init(name, array))
        return name

    def node(
        self, op: str, inputs: list[str], outputs: list[str], name: str, **attrs: object
    ) -> onnx.NodeProto:
        n = helper.make_node(op, inputs, outputs, name=name, **attrs)
        self.nodes.append(n)
        return n

    def qdq(self, x: str, tag: str, scale: float = 0.05, zp: np.ndarray | None = None) -> str:
        zp = np.int8(0) if zp is None else zp
        s = self.const(f"{tag}_s", np.float32(scale))
        z = self.const(f"{tag}_zp", zp)
        self.node("QuantizeLinear", [x, s, z], [f"{tag}_q"], f"Q_{tag}")
        self.node("DequantizeLinear", [f"{tag}_q", s, z], [f"{tag}_dq"], f"DQ_{tag}")
        return f"{tag}_dq"

    def weight(self, tag: str, k: int, n: int) -> str:
        w = self.const(f"{tag}_w", np.ones((k, n), np.int8))
        s = self.const(f"{tag}_ws", np.full((n,), 0.01, np.float32))
        z = self.const(f"{tag}_wzp", np.zeros((n,), np.int8))
        self.node("DequantizeLinear", [w, s, z], [f"{tag}_wdq"], f"DQ_{tag}_w", axis=1)
        return f"{tag}_wdq"

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "block",
            [
                helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, S, D]),
                helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, S, S]),
            ],
            [helper.make_tensor_value_info("Z", TensorProto.FLOAT, [1, S, D])],
            self.inits,
        )
        opsets = [helper.make_opsetid("", self.opset), *self.extra_opsets]
        return helper.make_model(graph, opset_imports=opsets)


def build(
    *,
    act_zp: np.ndarray | None = None,
    qx_scale: float = 0.05,
    per_channel_act: bool = False,
    qdq_on_ln_input: bool = False,
    qdq_on_softmax_input: bool = False,
    qdq_on_mask: bool = False,
    opset: int = 21,
) -> onnx.ModelProto:
    g = _Graph()
    g.opset = opset
    if per_channel_act:
        s = g.const("x_s", np.full((D,), 0.05, np.float32))
        z = g.const("x_zp", np.zeros((D,), np.int8))
        g.node("QuantizeLinear", ["X", s, z], ["x_q"], "Q_x", axis=2)
        g.node("DequantizeLinear", ["x_q", s, z], ["x_dq"], "DQ_x", axis=2)
        x_dq = "x_dq"
    else:
        x_dq = g.qdq("X", "x", scale=qx_scale, zp=act_zp)
    mm_q = g.node("MatMul", [x_dq, g.weight("q", D, D)], ["y1"], "MatMul_q")
    mm_q.metadata_props.add(key="onnxq.module", value="encoder.q_proj")
    g.node("Add", ["y1", "X"], ["r"], "Add_res")
    ln_in = g.qdq("r", "r") if qdq_on_ln_input else "r"
    ln_s = g.const("ln_s", np.ones(D, np.float32))
    ln_b = g.const("ln_b", np.zeros(D, np.float32))
    g.node("LayerNormalization", [ln_in, ln_s, ln_b], ["h"], "LN1", axis=-1)
    h_dq = g.qdq("h", "h")
    g.node("Transpose", ["h"], ["kt"], "Transpose_k", perm=[0, 2, 1])
    kt_dq = g.qdq("kt", "kt")
    g.node("MatMul", [h_dq, kt_dq], ["scores"], "MatMul_qk")
    mask = g.qdq("mask", "mask") if qdq_on_mask else "mask"
    g.node("Add", ["scores", mask], ["m"], "Add_mask")
    sm_in = g.qdq("m", "m") if qdq_on_softmax_input else "m"
    g.node("Softmax", [sm_in], ["p"], "Softmax", axis=-1)
    p_dq = g.qdq("p", "p", scale=1 / 127)
    g.node("MatMul", [p_dq, h_dq], ["o"], "MatMul_pv")
    o_dq = g.qdq("o", "o")
    g.node("MatMul", [o_dq, g.weight("o", D, D)], ["Z"], "MatMul_o")
    return g.model()


def _find(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


def _set_init(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for i, t in enumerate(model.graph.initializer):
        if t.name == name:
            model.graph.initializer[i].CopyFrom(_init(name, array))
            return
    model.graph.initializer.append(_init(name, array))


def _rules(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


def _nodes(violations: list[Violation]) -> set[str]:
    return {v.node for v in violations}


def _int4_weight(model: onnx.ModelProto, block_size: int) -> onnx.ModelProto:
    """Replace MatMul_o's int8 per-channel weight by an int4 [D, D] weight with blocked scales."""
    for name in ("o_w", "o_ws", "o_wzp"):
        idx = next(i for i, t in enumerate(model.graph.initializer) if t.name == name)
        del model.graph.initializer[idx]
    blocks = -(-D // block_size)
    model.graph.initializer.extend(
        [
            helper.make_tensor("o_w", TensorProto.INT4, [D, D], [1] * (D * D)),
            _init("o_ws", np.full((blocks, D), 0.01, np.float32)),
            helper.make_tensor("o_wzp", TensorProto.INT4, [blocks, D], [0] * (blocks * D)),
        ]
    )
    dq = _find(model, "DQ_o_w")
    del dq.attribute[:]
    dq.attribute.extend(
        [helper.make_attribute("axis", 0), helper.make_attribute("block_size", block_size)]
    )
    return model


# --------------------------------------------------------------------------- valid graph


@pytest.mark.parametrize("target", ["tensorrt", "jetson", "ort-cpu"])
def test_valid_graph_has_no_violations(target: str) -> None:
    model = build()
    onnx.checker.check_model(model, full_check=True)
    assert lint(model, target) == []
    assert lint(ir.serde.deserialize_model(model), TARGETS[target]) == []
    assert lint(onnx.shape_inference.infer_shapes(model, strict_mode=True), target) == []


def test_valid_graph_runs_in_onnxruntime() -> None:
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(build().SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, S, D)).astype(np.float32)
    (z,) = sess.run(None, {"X": x, "mask": np.zeros((1, S, S), np.float32)})
    assert z.shape == (1, S, D)


def test_ort_cpu_accepts_uint8_asymmetric_activations() -> None:
    model = build(act_zp=np.uint8(128))
    assert lint(model, "ort-cpu") == []
    trt = lint(model, "tensorrt")
    assert _rules(trt) == {"qdq-type", "zero-point-nonzero"}
    assert _nodes(trt) == {"Q_x", "DQ_x"}


# --------------------------------------------------------------------------- one mutation per rule


def _only(model: onnx.ModelProto, target: str, rule: str) -> list[Violation]:
    violations = lint(model, target)
    assert _rules(violations) == {rule}, format_violations(violations)
    return violations


def test_uint8_zero_point() -> None:
    violations = _only(build(act_zp=np.uint8(0)), "tensorrt", "qdq-type")
    assert _nodes(violations) == {"Q_x", "DQ_x"}
    assert "uint8" in violations[0].message


def test_nonzero_zero_point_names_module() -> None:
    violations = _only(build(act_zp=np.int8(3)), "tensorrt", "zero-point-nonzero")
    assert _nodes(violations) == {"Q_x", "DQ_x"}
    assert all(v.module == "encoder.q_proj" for v in violations)
    assert "encoder.q_proj" in violations[0].message
    assert str(violations[0]).startswith("zero-point-nonzero: Q_x (encoder.q_proj): ")


@pytest.mark.parametrize("bad", [-0.1, 0.0, float("nan"), float("inf")])
def test_scale_not_positive(bad: float) -> None:
    violations = _only(build(qx_scale=bad), "tensorrt", "scale-not-positive")
    assert _nodes(violations) == {"Q_x", "DQ_x"}


def test_scale_not_constant() -> None:
    model = build()
    model.graph.input.append(helper.make_tensor_value_info("dyn_s", TensorProto.FLOAT, []))
    _find(model, "Q_o").input[1] = "dyn_s"
    violations = _only(model, "tensorrt", "scale-not-constant")
    assert _nodes(violations) == {"Q_o"}


def test_scale_from_constant_node_is_accepted() -> None:
    model = build()
    model.graph.node.insert(
        0,
        helper.make_node(
            "Constant", [], ["c_s"], name="C", value=_init("c", np.float32(0.05))
        ),
    )
    _find(model, "Q_o").input[1] = "c_s"
    assert lint(model, "tensorrt") == []


def test_per_channel_activation() -> None:
    violations = _only(build(per_channel_act=True), "tensorrt", "activation-per-channel")
    assert _nodes(violations) == {"Q_x", "DQ_x"}
    # ort-cpu does not take per-axis activation scales either.
    assert _rules(lint(build(per_channel_act=True), "ort-cpu")) == {"activation-per-channel"}


def test_scale_shape_mismatch() -> None:
    model = build()
    _set_init(model, "q_ws", np.full((D + 1,), 0.01, np.float32))
    _set_init(model, "q_wzp", np.zeros((D + 1,), np.int8))
    violations = _only(model, "ort-cpu", "scale-shape")
    assert _nodes(violations) == {"DQ_q_w"}


def test_qlinearmatmul_forbidden() -> None:
    model = build()
    g = model.graph
    g.input.append(helper.make_tensor_value_info("A8", TensorProto.INT8, [S, D]))
    g.output.append(helper.make_tensor_value_info("QO", TensorProto.INT8, [S, D]))
    g.node.append(
        helper.make_node(
            "QLinearMatMul",
            ["A8", "x_s", "x_zp", "q_w", "x_s", "x_zp", "x_s", "x_zp"],
            ["QO"],
            name="QLMM",
        )
    )
    violations = _only(model, "tensorrt", "forbidden-op")
    assert _nodes(violations) == {"QLMM"}
    assert lint(model, "ort-cpu") == []


def test_custom_domain() -> None:
    model = build()
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    gelu = helper.make_node("Gelu", ["Z"], ["G"], name="Gelu_ms", domain="com.microsoft")
    model.graph.node.append(gelu)
    model.graph.output.append(helper.make_tensor_value_info("G", TensorProto.FLOAT, None))
    violations = _only(model, "jetson", "custom-domain")
    assert _nodes(violations) == {"Gelu_ms"}
    assert lint(model, "ort-cpu") == []


def test_opset_out_of_range() -> None:
    violations = _only(build(opset=25), "tensorrt", "opset")
    assert _nodes(violations) == {""}
    assert "25" in violations[0].message
    assert _rules(lint(build(opset=23), "jetson")) == {"opset"}
    assert lint(build(opset=23), "tensorrt") == []


def test_qdq_around_layernorm() -> None:
    violations = _only(build(qdq_on_ln_input=True), "tensorrt", "qdq-around-op")
    assert _nodes(violations) == {"DQ_r"}
    assert "LayerNormalization" in violations[0].message
    assert lint(build(qdq_on_ln_input=True), "ort-cpu") == []


def test_q_on_layernorm_output_not_feeding_gemm() -> None:
    model = build()
    # Route the LayerNorm output through Q/DQ into a float Add instead of a GEMM.
    g = model.graph
    g.node.extend(
        [
            helper.make_node("QuantizeLinear", ["h", "h_s", "h_zp"], ["h2_q"], name="Q_h2"),
            helper.make_node("DequantizeLinear", ["h2_q", "h_s", "h_zp"], ["h2"], name="DQ_h2"),
            helper.make_node("Add", ["h2", "Z"], ["Z2"], name="Add_out"),
        ]
    )
    g.output.append(helper.make_tensor_value_info("Z2", TensorProto.FLOAT, [1, S, D]))
    violations = _only(model, "tensorrt", "qdq-around-op")
    assert _nodes(violations) == {"Q_h2"}


def test_qdq_on_softmax_input() -> None:
    violations = _only(build(qdq_on_softmax_input=True), "tensorrt", "qdq-around-op")
    assert _nodes(violations) == {"DQ_m"}
    assert "Softmax" in violations[0].message


def test_qdq_on_mask_add() -> None:
    violations = _only(build(qdq_on_mask=True), "tensorrt", "qdq-on-mask-add")
    assert _nodes(violations) == {"DQ_mask"}
    assert lint(build(qdq_on_mask=True), "ort-cpu") == []


def test_gemm_output_q() -> None:
    model = build()
    g = model.graph
    g.node.extend(
        [
            helper.make_node("QuantizeLinear", ["Z", "o_s", "o_zp"], ["z_q"], name="Q_z"),
            helper.make_node("DequantizeLinear", ["z_q", "o_s", "o_zp"], ["z_dq"], name="DQ_z"),
            helper.make_node("Relu", ["z_dq"], ["R"], name="Relu"),
        ]
    )
    g.output.append(helper.make_tensor_value_info("R", TensorProto.FLOAT, [1, S, D]))
    violations = _only(model, "tensorrt", "gemm-output-q")
    assert _nodes(violations) == {"Q_z"}
    assert violations[0].severity == "warning"
    assert violations[0].module == ""
    assert lint(model, "ort-cpu") == []


def test_qdq_type_implicit() -> None:
    model = build()
    q, dq = _find(model, "Q_o"), _find(model, "DQ_o")
    del q.input[2]
    del dq.input[2]
    violations = _only(model, "tensorrt", "qdq-type-implicit")
    assert _nodes(violations) == {"Q_o"}
    assert lint(model, "ort-cpu") == []  # ONNX default uint8 is fine on CPU
    q.attribute.append(helper.make_attribute("output_dtype", TensorProto.INT8))
    assert lint(model, "tensorrt") == []


def test_qdq_type_mismatch() -> None:
    model = build()
    _find(model, "Q_o").attribute.append(helper.make_attribute("output_dtype", TensorProto.UINT8))
    violations = _only(model, "ort-cpu", "qdq-type-mismatch")
    assert _nodes(violations) == {"Q_o"}


def test_int4_block_64_ok_on_tensorrt() -> None:
    model = _int4_weight(build(), 64)
    assert lint(model, "tensorrt") == []
    assert lint(model, "ort-cpu") == []


def test_int4_block_32_on_tensorrt() -> None:
    violations = _only(_int4_weight(build(), 32), "tensorrt", "int4-block")
    assert _nodes(violations) == {"DQ_o_w"}
    assert "block_size 32" in violations[0].message
    assert lint(_int4_weight(build(), 32), "ort-cpu") == []


def test_blocked_int4_on_jetson() -> None:
    violations = _only(_int4_weight(build(), 64), "jetson", "int4-block")
    assert _nodes(violations) == {"DQ_o_w"}


def test_violations_are_in_graph_order() -> None:
    model = build(act_zp=np.uint8(3), opset=25)
    violations = lint(model, "tensorrt")
    assert violations[0].rule == "opset"
    assert [v.node for v in violations[1:]] == ["Q_x", "Q_x", "DQ_x", "DQ_x"]


def test_format_violations() -> None:
    assert format_violations([]) == "no lint violations"
    text = format_violations(lint(build(act_zp=np.int8(1)), "tensorrt"))
    assert text.splitlines()[0].startswith("2 lint violation(s)")
    assert "zero-point-nonzero: Q_x (encoder.q_proj):" in text


def test_unknown_target() -> None:
    with pytest.raises(OnnxqError):
        lint(build(), "tpu")


def test_external_data(tmp_path) -> None:
    model = build(act_zp=np.int8(2))
    path = tmp_path / "m.onnx"
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.data", size_threshold=0)
    proto = onnx.load(path, load_external_data=False)
    assert _rules(lint(proto, "tensorrt", base_dir=tmp_path)) == {"zero-point-nonzero"}
    with pytest.raises(OnnxqError):
        lint(proto, "tensorrt", base_dir=tmp_path / "missing")
    assert _rules(lint(ir.load(path), "tensorrt")) == {"zero-point-nonzero"}
    assert linear_weight_coverage(proto) == (2 * D * D, 2 * D * D)


# --------------------------------------------------------------------------- coverage


def test_linear_weight_coverage() -> None:
    g = _Graph()
    x_dq = g.qdq("X", "x")
    g.node("MatMul", [x_dq, g.weight("a", D, 32)], ["y"], "MatMul_a")
    w = g.const("b_w", np.ones((8, 32), np.float32))
    g.node("Transpose", [w], ["b_wt"], "Transpose_b", perm=[1, 0])
    g.node("MatMul", ["y", "b_wt"], ["y2"], "MatMul_b")
    g.node("Gemm", ["y2", g.const("c_w", np.ones((8, D), np.float32))], ["Z"], "Gemm_c")
    model = g.model()
    quantized, total = linear_weight_coverage(model)
    assert (quantized, total) == (D * 32, D * 32 + 8 * 32 + 8 * D)
    assert quantized / total == pytest.approx(512 / 896)


def test_coverage_needs_quantized_activation_and_counts_qdq_weights() -> None:
    g = _Graph()
    # Integer weight but a float activation: not counted as quantized.
    g.node("MatMul", ["X", g.weight("a", D, D)], ["y"], "MatMul_a")
    # Float weight behind Q->DQ with a quantized activation: counted.
    y_dq = g.qdq("y", "y")
    w_dq = g.qdq(g.const("b_w", np.ones((D, D), np.float32)), "bw")
    g.node("MatMul", [y_dq, w_dq], ["Z"], "MatMul_b")
    assert linear_weight_coverage(g.model()) == (D * D, 2 * D * D)
    assert linear_weight_coverage(build()) == (2 * D * D, 2 * D * D)


def test_per_tensor_scale_ignores_axis_on_rank1_tensor() -> None:
    model = build()
    g = model.graph
    g.initializer.extend([_init("bias_i8", np.ones(D, np.int8)), _init("bias_s", np.float32(0.1))])
    g.node.extend(
        [
            helper.make_node(
                "DequantizeLinear", ["bias_i8", "bias_s", "o_zp"], ["bias"], name="DQ_b"
            ),
            helper.make_node("Add", ["Z", "bias"], ["Zb"], name="Add_bias"),
        ]
    )
    g.output.append(helper.make_tensor_value_info("Zb", TensorProto.FLOAT, [1, S, D]))
    assert lint(model, "tensorrt") == []
