"""Export Hugging Face causal language models (with KV cache) to float32 ONNX graphs.

One graph serves both prefill and decode, with Optimum's names:

* inputs ``input_ids`` ``[batch, sequence]``, ``attention_mask``
  ``[batch, past_sequence + sequence]``, ``position_ids`` ``[batch, sequence]`` (all
  int64) and, per layer ``i``, ``past_key_values.{i}.key`` / ``.value``
  ``[batch, num_kv_heads, past_sequence, head_dim]`` (float32);
* outputs ``logits`` ``[batch, sequence, vocab]`` and ``present.{i}.key`` / ``.value``
  ``[batch, num_kv_heads, past_sequence + sequence, head_dim]``.

For prefill, feed past tensors with ``past_sequence = 0`` (the ``past_sequence`` axis is
exported with ``min=0``).  ``position_ids`` is fed for every model type, OPT included
(Optimum leaves it out for OPT; the OPT graph uses it for its learned positions).

As in :mod:`onnxq.exporters.hf`, every node carries ``onnxq.module`` /
``onnxq.module_type`` metadata (``model.layers.0.self_attn.q_proj``, ``Linear``), linear
weights are named ``<module>.weight``, and ``model.metadata_props`` holds
``onnxq.task = text-generation``, ``onnxq.model_type``, ``onnxq.num_layers``,
``onnxq.num_heads``, ``onnxq.num_kv_heads``, ``onnxq.head_dim``, ``onnxq.vocab_size``,
``onnxq.bos_token_id`` / ``onnxq.eos_token_id`` (when known), ``onnxq.source`` and
``onnxq.tokenizer``.

Every export is checked in onnxruntime against PyTorch on a padded prefill with an empty
past and on one decode step with the cache it returned.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.errors import ModelLoadError, OnnxqError
from onnxq.exporters.hf import (
    open_export_source,
    _WRAPPER_ATTR,
    ExportResult,
    _one_line,
    _quiet,
    _say,
    _source_name,
    _tidy_graph,
)

__all__ = [
    "DECODER_MODEL_TYPES",
    "TASK",
    "export_decoder",
    "kv_input_names",
    "kv_output_names",
]

TASK = "text-generation"

DECODER_MODEL_TYPES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "opt")
"""``config.model_type`` values this exporter accepts (mistral is untested)."""

_SAMPLE_BATCH = 2
_SAMPLE_SEQUENCE = 3
_SAMPLE_PAST = 5  # all sample sizes differ, so torch.export does not tie the axes
_VALIDATION_RTOL = 1e-4


def kv_input_names(num_layers: int) -> list[str]:
    """``past_key_values.{i}.key``, ``past_key_values.{i}.value`` for every layer, in order."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def kv_output_names(num_layers: int) -> list[str]:
    """``present.{i}.key``, ``present.{i}.value`` for every layer, in order."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def _attention_shape(config: Any) -> tuple[int, int, int, int]:
    """Number of layers, attention heads, key/value heads and the head size."""
    layers = int(config.num_hidden_layers)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return layers, heads, kv_heads, int(head_dim)


def _load_causal_lm(folder: pathlib.Path) -> Any:
    import torch
    import transformers

    # Eager attention (see onnxq.exporters.hf._load_model): a plain
    # MatMul -> Mul -> Add(mask) -> Softmax -> MatMul chain per layer.
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), attn_implementation="eager", dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:  # transformers raises many different types here
        raise ModelLoadError(f"cannot load the model in {folder}: {_one_line(exc)}") from exc
    model.eval()
    return model


def _make_wrapper(model: Any, num_layers: int) -> Any:
    import torch
    from transformers import DynamicCache

    class _DecoderWrapper(torch.nn.Module):
        """Flat KV-cache I/O around a ``*ForCausalLM``: ``(ids, mask, pos, past) -> (logits, *present)``."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            setattr(self, _WRAPPER_ATTR, inner)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            past_key_values: tuple[torch.Tensor, ...],
        ) -> tuple[torch.Tensor, ...]:
            inner = getattr(self, _WRAPPER_ATTR)
            cache = DynamicCache(config=inner.config)
            for i in range(num_layers):
                cache.update(past_key_values[2 * i], past_key_values[2 * i + 1], i)
            out = inner(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
            )
            presents: list[torch.Tensor] = []
            for layer in out.past_key_values.layers[:num_layers]:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return _DecoderWrapper(model).eval()


def _feeds(
    batch: int,
    sequence: int,
    past: int,
    vocab_size: int,
    kv_shape: tuple[int, int],
    num_layers: int,
    seed: int,
    *,
    left_pad: bool = False,
) -> dict[str, np.ndarray]:
    """Random ids and past; with ``left_pad`` rows after the first are left-padded."""
    rng = np.random.default_rng(seed)
    low = min(3, vocab_size - 1)
    mask = np.ones((batch, past + sequence), dtype=np.int64)
    if left_pad:
        for row in range(1, batch):
            mask[row, : min(2 * row, past + sequence - 1)] = 0
    positions = np.cumsum(mask, axis=1) - 1
    positions[mask == 0] = 1  # what transformers' generate() feeds for padding
    feeds = {
        "input_ids": rng.integers(low, vocab_size, size=(batch, sequence), dtype=np.int64),
        "attention_mask": mask,
        "position_ids": positions[:, past:].astype(np.int64),
    }
    kv_heads, head_dim = kv_shape
    for name in kv_input_names(num_layers):
        feeds[name] = rng.standard_normal((batch, kv_heads, past, head_dim)).astype(np.float32)
    return feeds


def _torch_run(wrapper: Any, feeds: dict[str, np.ndarray], num_layers: int) -> list[np.ndarray]:
    import torch

    past = tuple(torch.from_numpy(feeds[name]) for name in kv_input_names(num_layers))
    with torch.no_grad():
        out = wrapper(
            torch.from_numpy(feeds["input_ids"]),
            torch.from_numpy(feeds["attention_mask"]),
            torch.from_numpy(feeds["position_ids"]),
            past,
        )
    return [t.numpy() for t in out]


def _compare(name: str, actual: np.ndarray, expected: np.ndarray, mask: np.ndarray | None = None) -> float:
    if actual.shape != expected.shape:
        raise OnnxqError(f"the exported graph gives {name} of shape {actual.shape}, PyTorch {expected.shape}")
    if mask is not None:  # padded query rows are garbage in both; skip them
        actual, expected = actual[mask], expected[mask]
    if not expected.size:
        return 0.0
    diff = float(np.max(np.abs(actual - expected)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    if not np.isfinite(diff) or diff > _VALIDATION_RTOL * scale:
        raise OnnxqError(
            f"the exported graph does not match PyTorch in {name} "
            f"(max abs diff {diff:.3g}, allowed {_VALIDATION_RTOL * scale:.3g})"
        )
    return diff


def _validate(
    model: ir.Model, wrapper: Any, vocab_size: int, kv_shape: tuple[int, int], num_layers: int
) -> float:
    """Prefill (left-padded, empty past) then one decode step on the returned cache."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(
            ir.serde.serialize_model(model).SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise OnnxqError(f"the exported graph does not load in onnxruntime: {_one_line(exc)}") from exc
    output_names = ["logits", *kv_output_names(num_layers)]

    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return session.run(output_names, feeds)
        except Exception as exc:
            raise OnnxqError(f"the exported graph does not run in onnxruntime: {_one_line(exc)}") from exc

    diff = 0.0
    prefill = _feeds(3, 7, 0, vocab_size, kv_shape, num_layers, seed=1, left_pad=True)
    actual, expected = run(prefill), _torch_run(wrapper, prefill, num_layers)
    real = prefill["attention_mask"].astype(bool)
    diff = max(diff, _compare("prefill logits", actual[0], expected[0], real))
    for name, a, e in zip(output_names[1:], actual[1:], expected[1:]):
        diff = max(diff, _compare(f"prefill {name}", a, e))

    rng = np.random.default_rng(2)
    step = {
        "input_ids": rng.integers(min(3, vocab_size - 1), vocab_size, size=(3, 1), dtype=np.int64),
        "attention_mask": np.concatenate([prefill["attention_mask"], np.ones((3, 1), np.int64)], axis=1),
        "position_ids": prefill["position_ids"].max(axis=1, keepdims=True) + 1,
    }
    step.update(zip(kv_input_names(num_layers), expected[1:]))
    actual, expected = run(step), _torch_run(wrapper, step, num_layers)
    for name, a, e in zip(output_names, actual, expected):
        diff = max(diff, _compare(f"decode {name}", a, e))
    return diff


def export_decoder(
    source: str | os.PathLike[str] | None,
    *,
    opset: int = 21,
    progress: bool = False,
) -> ExportResult:
    """Export a Hugging Face ``*ForCausalLM`` with KV cache and check it in onnxruntime.

    Args:
        source: A model folder or an installed package carrying one (see
            :func:`onnxq.exporters.hf.resolve_model_source`).
        opset: ONNX opset of the default domain.
        progress: Print one short line per step to stderr.

    Returns:
        The exported model; ``task`` is ``"text-generation"``.

    Raises:
        ModelLoadError: The model cannot be found or loaded.
        OnnxqError: The architecture is not supported, the export fails, or the graph does
            not reproduce PyTorch's logits and cache.
    """
    folder, config = open_export_source(source, supported=DECODER_MODEL_TYPES, task=TASK)
    model_type = str(config["model_type"])
    import torch

    with _quiet():
        _say(progress, f"loading {folder}")
        model = _load_causal_lm(folder)
        num_layers, num_heads, kv_heads, head_dim = _attention_shape(model.config)
        vocab_size = int(getattr(model.config, "vocab_size", 0) or 0)
        if vocab_size < 2:
            raise OnnxqError(f"model config in {folder} has no usable vocab_size")
        wrapper = _make_wrapper(model, num_layers)

        input_names = ["input_ids", "attention_mask", "position_ids", *kv_input_names(num_layers)]
        output_names = ["logits", *kv_output_names(num_layers)]
        sample = _feeds(
            _SAMPLE_BATCH, _SAMPLE_SEQUENCE, _SAMPLE_PAST, vocab_size, (kv_heads, head_dim), num_layers, seed=0
        )
        batch = torch.export.Dim("batch")
        sequence = torch.export.Dim("sequence")
        # Prefill feeds an empty past, so this axis may be 0.  torch.export cannot express
        # "past_sequence + sequence" for the mask (a sum of two Dims), so the mask length
        # is a Dim of its own.
        past = torch.export.Dim("past_sequence", min=0)
        total = torch.export.Dim("total_sequence")
        dynamic_shapes = {
            "input_ids": {0: batch, 1: sequence},
            "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: sequence},
            "past_key_values": tuple({0: batch, 2: past} for _ in range(2 * num_layers)),
        }
        args = (
            torch.from_numpy(sample["input_ids"]),
            torch.from_numpy(sample["attention_mask"]),
            torch.from_numpy(sample["position_ids"]),
            tuple(torch.from_numpy(sample[name]) for name in kv_input_names(num_layers)),
        )

        _say(progress, f"exporting {model_type} ({TASK}) to ONNX opset {opset}")
        try:
            program = torch.onnx.export(
                wrapper,
                args,
                dynamo=True,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
            )
        except Exception as exc:
            raise OnnxqError(f"torch.onnx.export failed for {folder}: {_one_line(exc)}") from exc
        onnx_model = program.model

        _tidy_graph(onnx_model)
        props = onnx_model.metadata_props
        props["onnxq.source"] = _source_name(source, folder)
        props["onnxq.task"] = TASK
        props["onnxq.model_type"] = model_type
        props["onnxq.num_layers"] = str(num_layers)
        props["onnxq.num_heads"] = str(num_heads)
        props["onnxq.num_kv_heads"] = str(kv_heads)
        props["onnxq.head_dim"] = str(head_dim)
        props["onnxq.vocab_size"] = str(vocab_size)
        for key in ("bos_token_id", "eos_token_id"):
            value = getattr(model.config, key, None)
            if isinstance(value, (list, tuple)):
                value = value[0] if value else None
            if value is not None:
                props[f"onnxq.{key}"] = str(int(value))
        if (folder / "tokenizer.json").is_file():
            props["onnxq.tokenizer"] = str(folder.resolve())

        _say(progress, "checking the graph in onnxruntime (prefill and one decode step)")
        diff = _validate(onnx_model, wrapper, vocab_size, (kv_heads, head_dim), num_layers)

    return ExportResult(
        model=onnx_model,
        input_names=input_names,
        output_names=output_names,
        task=TASK,
        source=folder,
        max_abs_diff=diff,
    )
