"""onnxq's graph passes, each an ``onnx_ir.passes.InPlacePass``.

Compose them in your own export script::

    import onnx_ir as ir
    from onnxq.passes import CanonicalizePass, InsertQDQPass

    model = ir.load("model.onnx")
    CanonicalizePass()(model)
"""

from __future__ import annotations

from onnxq.passes.bias_gemm import QuantizedBiasGemmPass
from onnxq.passes.canonicalize import CanonicalizePass, canonicalize
from onnxq.passes.ffn_scaling import ExplicitChannelScalingPass
from onnxq.passes.fold_constants import FoldConstantsPass
from onnxq.passes.fuse_gelu import FuseGeluPass
from onnxq.passes.fuse_layer_norm import FuseLayerNormPass
from onnxq.passes.fuse_rms_norm import FuseRMSNormPass
from onnxq.passes.gemm_to_matmul import GemmToMatMulPass
from onnxq.passes.insert_qdq import InsertQDQPass
from onnxq.passes.kv_cache import QuantizeKVCachePass
from onnxq.passes.online_hadamard import OnlineHadamardPass
from onnxq.passes.outlier_suppression_plus import OutlierSuppressionPlusPass
from onnxq.passes.peg import PerEmbeddingGroupPass
from onnxq.passes.quamba import QuambaPass
from onnxq.passes.quantize_embeddings import QuantizeEmbeddingsPass
from onnxq.passes.rotate_residual import RotateResidualPass
from onnxq.passes.smooth_quant import SmoothQuantPass

__all__ = [
    "CanonicalizePass",
    "ExplicitChannelScalingPass",
    "FoldConstantsPass",
    "FuseGeluPass",
    "FuseLayerNormPass",
    "FuseRMSNormPass",
    "GemmToMatMulPass",
    "InsertQDQPass",
    "OnlineHadamardPass",
    "OutlierSuppressionPlusPass",
    "PerEmbeddingGroupPass",
    "QuambaPass",
    "QuantizeEmbeddingsPass",
    "QuantizeKVCachePass",
    "QuantizedBiasGemmPass",
    "RotateResidualPass",
    "SmoothQuantPass",
    "canonicalize",
]
