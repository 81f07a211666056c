"""Export a Hugging Face ``MambaForCausalLM`` as a single-token decode-step ONNX graph.

The selective scan has no ONNX op, and a whole-sequence export unrolls the scan at a
fixed length.  One decode step needs no loop at all, so onnxq exports *the step* and
runs prompts by stepping (:class:`onnxq.runtime.mamba.MambaSession`).

Graph interface (``L`` layers, ``D = intermediate_size``, ``K = conv_kernel``,
``N = state_size``, ``V = vocab_size``; ``batch`` is dynamic):

====================  =============  ============================================
name                  shape / dtype  meaning
====================  =============  ============================================
``input_ids``         [B, 1] int64   the token of this step
``conv_state.{i}``    [B, D, K-1]    the last ``K-1`` conv inputs of layer ``i``
                                     (oldest first), zeros at the start
``ssm_state.{i}``     [B, D, N]      the SSM state ``h`` of layer ``i``, zeros at
                                     the start
``logits``            [B, 1, V]      next-token logits
``conv_state_out.{i}`` [B, D, K-1]   updated conv state (feed to the next step)
``ssm_state_out.{i}`` [B, D, N]      updated SSM state
====================  =============  ============================================

Inputs are ordered ``input_ids, conv_state.0, ssm_state.0, conv_state.1, ...`` and
outputs ``logits, conv_state_out.0, ssm_state_out.0, ...``.  (Hugging Face's cache keeps
``K`` conv inputs; the oldest one never reaches the output, so the graph keeps ``K-1``:
``conv_state.{i} == cache.get_conv_state(i)[:, :, 1:]``.)

The step is written out explicitly with the model's own modules and parameters (no
``transformers`` cache classes inside the export), per layer::

    h   = RMSNorm(x)                                  backbone.layers.i.norm
    x,z = split(in_proj(h))                           .mixer.in_proj
    w   = concat(conv_state, x)      [B, D, K]        conv_state_out = w[..., 1:]
    u   = SiLU(sum(w * conv.weight) + conv.bias)      <- onnxq.role = "ssm_input"
    dt,B,C = split(x_proj(u)); dt = softplus(dt_proj(dt))
    A   = -exp(A_log); s' = exp(dt A) * s + (dt B) u  (ssm_state_out)
    y   = (s' C + D u) * SiLU(z)                      <- onnxq.role = "ssm_output"
    x   = x + out_proj(y)
    logits = lm_head(norm_f(x))

Metadata, as for :func:`onnxq.exporters.hf.export_hf`: every node carries
``onnxq.module`` (``backbone.layers.0.mixer.in_proj``; ``backbone.layers.0.mixer`` for
the conv / scan arithmetic) and ``onnxq.module_type``; initializers carry PyTorch
parameter names (linear weights transposed to ``[in, out]``).  The node producing the
scan input ``u`` has ``onnxq.role = "ssm_input"`` and its output is renamed
``backbone.layers.{i}.mixer.ssm_input``; the node producing the gated scan output ``y``
(the input of ``out_proj``) has ``onnxq.role = "ssm_output"``, output
``backbone.layers.{i}.mixer.ssm_output``; both nodes also carry ``onnxq.layer = "i"``.
``model.metadata_props``: ``onnxq.task = "mamba-step"``, ``onnxq.model_type = "mamba"``,
``onnxq.source``, ``onnxq.tokenizer`` (when present), ``onnxq.mamba.layers``,
``onnxq.mamba.d_inner``, ``onnxq.mamba.d_conv`` (``K - 1``), ``onnxq.mamba.d_state``,
``onnxq.mamba.vocab_size``.

The export is checked in onnxruntime against the Hugging Face model run token by token
with its own cache (batch 2, 6 steps; relative tolerance 1e-4 on the logits).
"""

from __future__ import annotations

import contextlib
import os
import types
from collections.abc import Iterator
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
    "MAMBA_TASK",
    "ROLE_KEY",
    "conv_state_name",
    "zero_states",
    "export_mamba_step",
    "ssm_state_name",
    "step_io_names",
]

MAMBA_TASK = "mamba-step"
"""``onnxq.task`` of a decode-step graph."""

ROLE_KEY = "onnxq.role"
"""Node metadata key marking the scan input (``ssm_input``) and output (``ssm_output``)."""

_VALIDATION_RTOL = 1e-4
_VALIDATION_STEPS = 6


def conv_state_name(layer: int, *, output: bool = False) -> str:
    """``conv_state.{layer}`` or ``conv_state_out.{layer}``."""
    return f"conv_state{'_out' if output else ''}.{layer}"


def ssm_state_name(layer: int, *, output: bool = False) -> str:
    """``ssm_state.{layer}`` or ``ssm_state_out.{layer}``."""
    return f"ssm_state{'_out' if output else ''}.{layer}"


def step_io_names(layers: int) -> tuple[list[str], list[str]]:
    """Graph input and output names of a decode step with ``layers`` layers."""
    inputs = ["input_ids"]
    outputs = ["logits"]
    for i in range(layers):
        inputs += [conv_state_name(i), ssm_state_name(i)]
        outputs += [conv_state_name(i, output=True), ssm_state_name(i, output=True)]
    return inputs, outputs


# --------------------------------------------------------------------------- the step


def _mixer_step(self: Any, hidden: Any, conv_state: Any, ssm_state: Any) -> tuple[Any, Any, Any]:
    """One token through a ``MambaMixer`` (bound to the mixer during export)."""
    import torch
    import torch.nn.functional as F

    d = self.intermediate_size
    xz = self.in_proj(hidden)  # [B, 1, 2D]
    x, z = torch.split(xz, [d, d], dim=-1)
    window = torch.cat([conv_state, x.transpose(1, 2)], dim=-1)  # [B, D, K]
    conv = (window * self.conv1d.weight[:, 0, :]).sum(dim=-1)  # [B, D]
    if self.conv1d.bias is not None:
        conv = conv + self.conv1d.bias
    u = F.silu(conv.unsqueeze(1))  # [B, 1, D]  scan input
    dt, b, c = torch.split(
        self.x_proj(u), [self.time_step_rank, self.ssm_state_size, self.ssm_state_size], dim=-1
    )
    dt = F.softplus(self.dt_proj(dt))  # [B, 1, D]
    a = -torch.exp(self.A_log.float())  # [D, N]
    dt_col = dt.transpose(1, 2)  # [B, D, 1]
    u_col = u.transpose(1, 2)  # [B, D, 1]
    state = torch.exp(dt_col * a) * ssm_state + (dt_col * b) * u_col  # [B, D, N]
    y = torch.matmul(state, c.transpose(1, 2)).transpose(1, 2)  # [B, 1, D]
    y = y + u * self.D
    y = y * F.silu(z)  # scan output
    return self.out_proj(y), window[:, :, 1:], state


def _block_step(self: Any, hidden: Any, conv_state: Any, ssm_state: Any) -> tuple[Any, Any, Any]:
    """One token through a ``MambaBlock``: pre-norm, mixer step, residual."""
    import torch

    normed = self.norm(hidden.to(dtype=self.norm.weight.dtype))
    residual = hidden.to(torch.float32) if self.residual_in_fp32 else hidden
    out, conv_state, ssm_state = self.mixer(normed, conv_state, ssm_state)
    return residual + out, conv_state, ssm_state


@contextlib.contextmanager
def _step_forwards(model: Any) -> Iterator[None]:
    """Bind the step functions as the blocks' and mixers' ``forward`` (restored after)."""
    layers = list(model.backbone.layers)
    try:
        for layer in layers:
            layer.forward = types.MethodType(_block_step, layer)
            layer.mixer.forward = types.MethodType(_mixer_step, layer.mixer)
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
            layer.mixer.__dict__.pop("forward", None)


def _make_step_wrapper(model: Any) -> Any:
    import torch

    class _StepWrapper(torch.nn.Module):
        """``(input_ids, conv_0, ssm_0, conv_1, ...) -> (logits, conv_0', ssm_0', ...)``."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            setattr(self, _WRAPPER_ATTR, inner)

        def forward(self, input_ids: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
            inner = getattr(self, _WRAPPER_ATTR)
            backbone = inner.backbone
            hidden = backbone.embeddings(input_ids)
            outs: list[torch.Tensor] = []
            for i, layer in enumerate(backbone.layers):
                hidden, conv, ssm = layer(hidden, states[2 * i], states[2 * i + 1])
                outs += [conv, ssm]
            hidden = backbone.norm_f(hidden)
            logits = inner.lm_head(hidden.to(inner.lm_head.weight.dtype)).float()
            return (logits, *outs)

    return _StepWrapper(model)


# --------------------------------------------------------------------------- helpers


def _load_mamba(folder: Any) -> Any:
    import torch
    import transformers

    try:
        model = transformers.MambaForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True
        )
    except Exception as exc:
        raise ModelLoadError(f"cannot load the Mamba model in {folder}: {_one_line(exc)}") from exc
    return model.eval()


def _dims(model: Any) -> dict[str, int]:
    cfg = model.config
    return {
        "layers": int(cfg.num_hidden_layers),
        "d_inner": int(cfg.intermediate_size),
        "d_conv": int(cfg.conv_kernel) - 1,
        "d_state": int(cfg.state_size),
        "vocab_size": int(cfg.vocab_size),
        "hidden": int(cfg.hidden_size),
    }


def zero_states(dims: dict[str, int], batch: int) -> dict[str, np.ndarray]:
    """Zero conv and SSM states for ``batch`` sequences."""
    feeds: dict[str, np.ndarray] = {}
    for i in range(dims["layers"]):
        feeds[conv_state_name(i)] = np.zeros((batch, dims["d_inner"], dims["d_conv"]), np.float32)
        feeds[ssm_state_name(i)] = np.zeros((batch, dims["d_inner"], dims["d_state"]), np.float32)
    return feeds


def _tag_roles(model: ir.Model, layers: int) -> None:
    """Mark (and rename) the scan input and output of every layer."""
    from onnxq.passes._patterns import find_linears

    by_module = {u.module: u for u in find_linears(model.graph)}
    taken = {v.name for v in model.graph.inputs} | set(model.graph.initializers)
    for node in model.graph:
        taken.update(o.name for o in node.outputs if o.name)
    for i in range(layers):
        prefix = f"backbone.layers.{i}.mixer"
        for linear, role in (("x_proj", "ssm_input"), ("out_proj", "ssm_output")):
            unit = by_module.get(f"{prefix}.{linear}")
            producer = unit.input.producer() if unit is not None else None
            if producer is None:
                raise OnnxqError(f"cannot find the {role} of layer {i} in the exported graph")
            producer.metadata_props[ROLE_KEY] = role
            producer.metadata_props["onnxq.layer"] = str(i)
            name = f"{prefix}.{role}"
            if unit.input.name != name and name not in taken:
                unit.input.name = name
                taken.add(name)


def _hf_stepwise_logits(model: Any, ids: np.ndarray) -> np.ndarray:
    """Logits of the Hugging Face model run token by token with its own cache."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = []
    with torch.no_grad():
        for t in range(ids.shape[1]):
            res = model(
                torch.from_numpy(ids[:, t : t + 1]), cache_params=cache, use_cache=True,
                return_dict=True,
            )
            cache = res.cache_params
            out.append(res.logits[:, -1].float().numpy())
    return np.stack(out, axis=1)


def _onnx_stepwise_logits(model: ir.Model, ids: np.ndarray, dims: dict[str, int]) -> np.ndarray:
    from onnxq.calibration.runner import make_session

    inputs, outputs = step_io_names(dims["layers"])
    feeds = zero_states(dims, ids.shape[0])
    out = []
    with make_session(model) as sess:
        for t in range(ids.shape[1]):
            feeds["input_ids"] = np.ascontiguousarray(ids[:, t : t + 1])
            res = sess.run(outputs, feeds)
            out.append(res[0][:, -1])
            for name, value in zip(outputs[1:], res[1:], strict=True):
                feeds[name.replace("_out.", ".")] = value
    return np.stack(out, axis=1)


def _validate_steps(model: ir.Model, hf_model: Any, dims: dict[str, int]) -> float:
    rng = np.random.default_rng(1)
    ids = rng.integers(0, dims["vocab_size"], size=(2, _VALIDATION_STEPS), dtype=np.int64)
    expected = _hf_stepwise_logits(hf_model, ids)
    try:
        actual = _onnx_stepwise_logits(model, ids, dims)
    except Exception as exc:
        raise OnnxqError(f"the exported step graph does not run in onnxruntime: {_one_line(exc)}") from exc
    diff = float(np.max(np.abs(actual - expected)))
    scale = max(1.0, float(np.max(np.abs(expected))))
    if not np.isfinite(diff) or diff > _VALIDATION_RTOL * scale:
        raise OnnxqError(
            f"the exported step graph does not match the Hugging Face model "
            f"(max abs diff {diff:.3g} over {_VALIDATION_STEPS} steps, allowed {_VALIDATION_RTOL * scale:.3g})"
        )
    return diff


# --------------------------------------------------------------------------- export


def export_mamba_step(
    source: str | os.PathLike[str],
    *,
    opset: int = 21,
    progress: bool = False,
    validate: bool = True,
) -> ExportResult:
    """Export one decode step of a ``MambaForCausalLM`` and check it against the model.

    Args:
        source: A Hugging Face Mamba folder (or an installed package carrying one).
        opset: ONNX opset of the default domain.
        progress: Print one short line per step to stderr.
        validate: Compare onnxruntime stepping with the Hugging Face model stepping
            through its own cache (6 tokens, batch 2, relative tolerance 1e-4).

    Returns:
        :class:`~onnxq.exporters.hf.ExportResult` with ``task = "mamba-step"``; names and
        shapes are listed in the module docstring.

    Raises:
        ModelLoadError: The model cannot be found or loaded.
        OnnxqError: The model is not a Mamba (v1) model, the export fails, or the graph
            does not reproduce the Hugging Face logits.
    """
    folder, config = open_export_source(source, supported=("mamba",), task="mamba-step")
    import torch

    with _quiet():
        _say(progress, f"loading {folder}")
        model = _load_mamba(folder)
        dims = _dims(model)
        input_names, output_names = step_io_names(dims["layers"])
        wrapper = _make_step_wrapper(model).eval()
        batch = 2
        rng = np.random.default_rng(0)
        sample = [torch.from_numpy(rng.integers(0, dims["vocab_size"], (batch, 1), dtype=np.int64))]
        for _ in range(dims["layers"]):
            sample.append(torch.from_numpy(
                rng.standard_normal((batch, dims["d_inner"], dims["d_conv"])).astype(np.float32)))
            sample.append(torch.from_numpy(
                rng.standard_normal((batch, dims["d_inner"], dims["d_state"])).astype(np.float32)))
        bdim = torch.export.Dim("batch")
        dynamic_shapes = ({0: bdim}, tuple({0: bdim} for _ in input_names[1:]))

        _say(progress, f"exporting the Mamba decode step to ONNX opset {opset}")
        with _step_forwards(model):
            try:
                program = torch.onnx.export(
                    wrapper,
                    tuple(sample),
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
        _tag_roles(onnx_model, dims["layers"])
        props = onnx_model.metadata_props
        props["onnxq.source"] = _source_name(source, folder)
        props["onnxq.task"] = MAMBA_TASK
        props["onnxq.model_type"] = "mamba"
        for key in ("layers", "d_inner", "d_conv", "d_state", "vocab_size"):
            props[f"onnxq.mamba.{key}"] = str(dims[key])
        if (folder / "tokenizer.json").is_file():
            props["onnxq.tokenizer"] = str(folder.resolve())

        diff = 0.0
        if validate:
            _say(progress, "checking the step graph against the Hugging Face model")
            diff = _validate_steps(onnx_model, model, dims)

    return ExportResult(
        model=onnx_model,
        input_names=input_names,
        output_names=output_names,
        task=MAMBA_TASK,
        source=folder,
        max_abs_diff=diff,
    )
