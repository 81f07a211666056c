"""Export an in-memory (patched or fine-tuned) Hugging Face encoder with onnxq's exporter.

:func:`onnxq.exporters.hf.export_hf` loads a folder with eager attention; models with
extra modules (gates) or a custom attention function have to be exported from memory.
This reuses the same wrapper, graph tidying (``onnxq.module`` metadata, PyTorch
initializer names) and onnxruntime check.
"""

from __future__ import annotations

import os
import pathlib

import onnx_ir as ir

__all__ = ["export_module"]


def export_module(
    model,
    *,
    output: str | None = None,
    opset: int = 21,
    tokenizer: str | os.PathLike | None = None,
    validate: bool = True,
) -> ir.Model:
    """Export ``model`` (a transformers encoder, in eval mode) to a float32 onnx-ir Model.

    Args:
        model: ``BertModel``-like (``last_hidden_state``) or ``*ForSequenceClassification``
            (``logits``) module.
        output: graph output name; default from the model class.
        opset: ai.onnx opset.
        tokenizer: folder holding ``tokenizer.json`` recorded as ``onnxq.tokenizer``.
        validate: compare onnxruntime against PyTorch on a second input shape.
    """
    import torch

    from onnxq.errors import OnnxqError
    from onnxq.exporters import hf

    if output is None:
        output = "logits" if type(model).__name__.endswith("ForSequenceClassification") else "last_hidden_state"
    was_training = model.training
    model.eval()
    try:
        with hf._quiet():
            input_names = ["input_ids", "attention_mask"]
            if hf._uses_token_type_ids(model):
                input_names.append("token_type_ids")
            wrapper = hf._make_wrapper(model, input_names, output).eval()
            vocab = int(model.config.vocab_size)
            with_types = "token_type_ids" in input_names
            sample = hf._sample_inputs(hf._SAMPLE_BATCH, hf._SAMPLE_SEQUENCE, vocab, with_types, seed=0)
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
            try:
                program = torch.onnx.export(
                    wrapper,
                    tuple(torch.from_numpy(sample[n]) for n in input_names),
                    dynamo=True,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=[output],
                    dynamic_shapes={n: {0: batch, 1: seq} for n in input_names},
                )
            except Exception as exc:
                raise OnnxqError(f"torch.onnx.export failed: {hf._one_line(exc)}") from exc
            onnx_model = program.model
            hf._tidy_graph(onnx_model)
            props = onnx_model.metadata_props
            props["onnxq.source"] = "in-memory torch model"
            props["onnxq.task"] = "text-classification" if output == "logits" else "feature-extraction"
            props["onnxq.model_type"] = str(getattr(model.config, "model_type", ""))
            if tokenizer is not None and (pathlib.Path(tokenizer) / "tokenizer.json").is_file():
                props["onnxq.tokenizer"] = str(pathlib.Path(tokenizer).resolve())
            if validate:
                check = hf._sample_inputs(3, 7, vocab, with_types, seed=1)
                hf._validate(onnx_model, wrapper, check)
    finally:
        model.train(was_training)
    return onnx_model
