"""Target profiles: the QDQ conventions each deployment runtime needs.

The rules come from ``shared/design/deploy-rules.md``:

* TensorRT (explicit quantization) parses only symmetric INT8 Q/DQ with int8
  zero points equal to 0, per-tensor activation scales and per-channel weight
  scales along the output axis; it never wants Q/DQ around LayerNorm, Softmax,
  GELU or the attention-mask Add; opsets 17-21 are the safe range.
* Jetson (Orin GPU) follows TensorRT, restricted to what JetPack's TensorRT 10.x
  parses (opset <= 20 for the oldest JetPack 6 TensorRT 10.0 parser would be
  too tight for int4 blocks, so int4 is refused there and opset <= 21 kept).
* onnxruntime CPU fuses DQ->MatMul(->Q) node units into MatMulIntegerToFloat /
  QLinearMatMul; on x86 it runs S8S8 QDQ as U8S8 internally, so activations
  are emitted as uint8 (asymmetric allowed) and weights as symmetric int8.
"""

from __future__ import annotations

import dataclasses

from onnxq.errors import OnnxqError

__all__ = ["TARGETS", "TargetProfile", "get_target"]


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    """What a QDQ graph for one runtime must look like.

    Attributes:
        name: CLI name of the target.
        activation_dtype: "int8" or "uint8" for activation QuantizeLinear outputs.
        activation_symmetric: zero point fixed at 0 (int8) when True.
        weight_dtype: element type of quantized weights ("int8").
        weight_per_channel: per-output-channel weight scales.
        min_opset / max_opset: ai.onnx opset range the runtime parses.
        quantize_attention_matmuls: also quantize QK^T and PV MatMuls (both inputs activations).
        allow_int4_weights: blocked int4 weights (DequantizeLinear block_size) are parsed.
        int4_block_sizes: the block sizes the runtime accepts for int4 weights.
        allowed_qdq_types: element types allowed on any Q/DQ tensor.
        forbid_ops: ops the runtime cannot parse in a QDQ graph (QOperator format).
        no_qdq_around: op types whose inputs or outputs must not be wrapped in Q/DQ.
        allow_custom_domains: nodes outside the ai.onnx domain (``com.microsoft`` ...) are parsed.
        require_explicit_qdq_type: a QuantizeLinear must name its type through an int8 zero
            point or ``output_dtype`` (TensorRT defaults to int8 where ONNX defaults to uint8).
        allow_gemm_output_q: a QuantizeLinear directly on a MatMul/Gemm output is acceptable even
            when its consumers are not quantized GEMMs.
        fold_attention_scale: fold a positive scalar ``Mul`` right after a quantized Q·Kᵀ
            MatMul (the 1/sqrt(d) softmax scale) into the scale of the K-side
            DequantizeLinear. onnxruntime CPU fuses the FP32 MatMul+Mul into one
            FusedMatMul; after quantization the Mul would otherwise run as a separate
            pass over the [batch, heads, seq, seq] scores.
        lower_bias_gemm: rewrite quantized linears whose bias Add feeds only layout ops
            (Q/K/V projections) as QDQ ``Gemm`` with an int32 bias on 2-D rows
            (:mod:`onnxq.passes.bias_gemm`); onnxruntime CPU fuses that into ``QGemm``.
    """

    name: str
    activation_dtype: str
    activation_symmetric: bool
    weight_dtype: str = "int8"
    weight_per_channel: bool = True
    min_opset: int = 13
    max_opset: int = 21
    quantize_attention_matmuls: bool = True
    allow_int4_weights: bool = True
    int4_block_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    allowed_qdq_types: tuple[str, ...] = ("int8", "uint8", "int32", "int4")
    forbid_ops: tuple[str, ...] = ()
    no_qdq_around: tuple[str, ...] = ()
    allow_custom_domains: bool = True
    require_explicit_qdq_type: bool = False
    allow_gemm_output_q: bool = True
    fold_attention_scale: bool = False
    lower_bias_gemm: bool = False


_TRT_FORBID = (
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "DynamicQuantizeLinear",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
)
_TRT_NO_QDQ = ("LayerNormalization", "Softmax", "Gelu", "Erf", "SimplifiedLayerNormalization",
               "RMSNormalization", "Sigmoid", "Tanh")

_TENSORRT = TargetProfile(
    name="tensorrt",
    activation_dtype="int8",
    activation_symmetric=True,
    min_opset=17,
    max_opset=24,
    quantize_attention_matmuls=True,
    int4_block_sizes=(64, 128),
    allowed_qdq_types=("int8", "int4"),
    forbid_ops=_TRT_FORBID,
    no_qdq_around=_TRT_NO_QDQ,
    allow_custom_domains=False,
    require_explicit_qdq_type=True,
    allow_gemm_output_q=False,
)

TARGETS: dict[str, TargetProfile] = {
    "ort-cpu": TargetProfile(
        name="ort-cpu",
        activation_dtype="uint8",
        activation_symmetric=False,
        min_opset=13,
        max_opset=23,
        quantize_attention_matmuls=True,
        allowed_qdq_types=("int8", "uint8", "int32", "int4", "uint4"),
        fold_attention_scale=True,
        lower_bias_gemm=True,
    ),
    "tensorrt": _TENSORRT,
    # TensorRT as JetPack ships it: opset <= 21 and no int4 (see the module docstring).
    "jetson": dataclasses.replace(
        _TENSORRT,
        name="jetson",
        max_opset=21,
        allow_int4_weights=False,
        int4_block_sizes=(),
        allowed_qdq_types=("int8",),
    ),
}


def get_target(name: str) -> TargetProfile:
    """Return the profile called ``name`` or raise a one-line user error."""
    try:
        return TARGETS[name]
    except KeyError:
        known = ", ".join(sorted(TARGETS))
        raise OnnxqError(f"unknown target {name!r}; choose one of: {known}") from None
