"""PyTorch-side tools: outlier-free attention and quantization-aware fine-tuning.

Needs the ``export`` extra (``pip install 'onnxq[export]'``: torch and transformers).

* :mod:`onnxq.torch.modules`: :class:`ClippedSoftmax`, :class:`GatedAttention` and
  :func:`patch`, which swaps them into Hugging Face attention (BERT, RoBERTa, ViT, OPT,
  LLaMA) through ``transformers.AttentionInterface``.
* :mod:`onnxq.torch.qat`: LSQ fake quantization initialised from onnxq calibration
  statistics (:func:`prepare_qat`), optional HALO Hadamard-rotated linears, and
  :func:`export_qdq`, a QDQ graph with the learned scales.
* :mod:`onnxq.torch.finetune`: :func:`finetune`, embedding distillation against the
  FP32 teacher.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "onnxq.torch needs torch and transformers: pip install 'onnxq[export]'"
    ) from exc

from onnxq.torch._export import export_module
from onnxq.torch.finetune import finetune
from onnxq.torch.modules import ClippedSoftmax, GatedAttention, patch
from onnxq.torch.qat import (
    LearnedStats,
    LSQQuantizer,
    QATEmbedding,
    QATLinear,
    export_qdq,
    fake_quant_rows,
    fake_quant_weight,
    float_copy,
    learned_scales,
    prepare_qat,
    qat_enabled,
)

__all__ = [
    "ClippedSoftmax",
    "GatedAttention",
    "LSQQuantizer",
    "LearnedStats",
    "QATEmbedding",
    "QATLinear",
    "export_module",
    "export_qdq",
    "fake_quant_rows",
    "fake_quant_weight",
    "finetune",
    "float_copy",
    "learned_scales",
    "patch",
    "prepare_qat",
    "qat_enabled",
]
