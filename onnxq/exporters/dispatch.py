"""Choose the exporter for a Hugging Face model from its task and config.

=====================  ==========================================  =====================
task                   models                                      exporter
=====================  ==========================================  =====================
feature-extraction,    BERT-family encoders                        :func:`export_hf`
text-classification
text-generation        LLaMA, Qwen2/3, OPT, Mistral (*ForCausalLM)  :func:`export_decoder`
mamba-step             MambaForCausalLM (one decode step + states)  :func:`export_mamba_step`
image-classification   ViT, DeiT                                   :func:`export_vit`
=====================  ==========================================  =====================

``task="auto"`` picks text-generation for ``*ForCausalLM`` architectures and the
encoder tasks otherwise.
"""

from __future__ import annotations

import os

from onnxq.exporters.hf import ExportResult, _read_config, export_hf, resolve_model_source

__all__ = ["export_model", "guess_task"]


def guess_task(source: str | os.PathLike[str] | None, task: str = "auto") -> str:
    """The export task for ``source``: ``task`` itself unless it is "auto"."""
    if task != "auto":
        return task
    config = _read_config(resolve_model_source(source))
    if config.get("model_type") == "mamba":
        return "mamba-step"
    if str(config.get("model_type", "")) in ("vit", "deit"):
        return "image-classification"
    architectures = [str(a) for a in config.get("architectures") or []]
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "text-generation"
    return "auto"


def export_model(
    source: str | os.PathLike[str] | None, *, task: str = "auto", opset: int = 21,
    progress: bool = False,
) -> ExportResult:
    """Export ``source`` with the exporter its task calls for."""
    task = guess_task(source, task)
    if task == "mamba-step":
        from onnxq.exporters.mamba import export_mamba_step

        return export_mamba_step(source, opset=opset, progress=progress)
    if task == "image-classification":
        from onnxq.exporters.vit import export_vit

        return export_vit(source, opset=opset, progress=progress)
    if task == "text-generation":
        from onnxq.exporters.decoder import export_decoder

        return export_decoder(source, opset=opset, progress=progress)
    return export_hf(source, task=task, opset=opset, progress=progress)
