"""A tiny random Mamba language model with planted, Mamba-like activation outliers.

:func:`tiny_mamba_dir` writes a ``MambaForCausalLM`` (hidden 64, 2 layers, state 16,
expand 2 so ``D_inner = 128``, conv kernel 4, vocabulary 256, untied ``lm_head``) as a
Hugging Face folder with a WordPiece ``tokenizer.json`` (the helper of
:mod:`onnxq.zoo.bert`).  With ``outliers=True`` it plants what trained Mambas show and
what makes static per-tensor INT8 hard (Quamba, Chiang et al. 2025):

* **SSM output** (the gated scan output ``y * SiLU(z)``, the input of ``out_proj``): in
  every layer the skip weight ``D`` of :data:`SSM_OUTLIER_CHANNELS` is raised to 25, 15
  and 10 and the matching ``in_proj`` gate rows are doubled, so these three channels
  reach about 70 to 150x the median channel's absmax in layer 0 (seeds 0..2); the matching ``out_proj`` input columns
  are divided by the same factor so the block output keeps its size (as in trained
  models, where the large channels meet small weights);
* **residual stream**: channel :data:`RESIDUAL_OUTLIER_CHANNEL` of every embedding row
  gets a constant offset, so the hidden state (and every RMSNorm output, the input of
  ``in_proj``) carries one large, one-signed channel.

Parameters that random init leaves constant (norm weights, conv bias, ``D``) are
perturbed so the exporter does not merge identical tensors.  torch and transformers are
imported only inside the functions.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

__all__ = [
    "RESIDUAL_OUTLIER_CHANNEL",
    "SSM_OUTLIER_CHANNELS",
    "tiny_mamba_config",
    "tiny_mamba_dir",
    "tiny_mamba_step_onnx",
    "tiny_mamba_text_ids",
]

SSM_OUTLIER_CHANNELS: tuple[int, ...] = (5, 37, 90)
"""``D_inner`` channels (modulo ``D_inner``) with planted SSM-output outliers."""

RESIDUAL_OUTLIER_CHANNEL: int = 11
"""Hidden channel with a planted residual-stream outlier."""

_SSM_GAINS = (25.0, 15.0, 10.0)
_GATE_GAIN = 2.0
_RESIDUAL_OFFSET = 0.6


def tiny_mamba_config(
    *, hidden: int = 64, layers: int = 2, state: int = 16, expand: int = 2, conv: int = 4,
    vocab: int = 256,
) -> Any:
    """The ``transformers.MambaConfig`` of the tiny model (untied ``lm_head``)."""
    import transformers

    return transformers.MambaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        state_size=state,
        num_hidden_layers=layers,
        expand=expand,
        conv_kernel=conv,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        use_cache=True,
    )


def _perturb(model: Any, generator: Any) -> None:
    import torch

    for name, param in model.named_parameters():
        if name.endswith(("norm.weight", "norm_f.weight", "conv1d.bias")):
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
        elif name.endswith("mixer.D"):
            param.add_(0.1 * torch.randn(param.shape, generator=generator))


def _plant_outliers(model: Any) -> None:
    backbone = model.backbone
    d_inner = backbone.layers[0].mixer.intermediate_size
    hidden = backbone.embeddings.weight.shape[1]
    backbone.embeddings.weight[:, RESIDUAL_OUTLIER_CHANNEL % hidden] += _RESIDUAL_OFFSET
    for layer in backbone.layers:
        mixer = layer.mixer
        for channel, gain in zip(SSM_OUTLIER_CHANNELS, _SSM_GAINS, strict=True):
            c = channel % d_inner
            mixer.D[c] = gain
            mixer.in_proj.weight[d_inner + c] *= _GATE_GAIN  # a wider gate z

            mixer.out_proj.weight[:, c] /= gain


def tiny_mamba_dir(
    dest: os.PathLike[str] | str,
    *,
    seed: int = 0,
    outliers: bool = True,
    hidden: int = 64,
    layers: int = 2,
    vocab: int = 256,
) -> pathlib.Path:
    """Write a tiny random ``MambaForCausalLM`` as a Hugging Face folder.

    Args:
        dest: Folder to write into (created if missing).
        seed: Random seed; the same arguments give the same weights.
        outliers: Plant Mamba-like outliers (see the module docstring).
        hidden: Hidden size (``D_inner = 2 * hidden``; 48 gives the non-power-of-two
            ``D_inner = 96 = 12 * 8``).
        layers: Number of Mamba blocks.
        vocab: Vocabulary size (at least 88).

    Returns:
        The folder path (``config.json``, ``model.safetensors``, ``tokenizer.json``).
    """
    import torch
    import transformers

    from onnxq.zoo.bert import _vocabulary, _write_tokenizer

    folder = pathlib.Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_mamba_config(hidden=hidden, layers=layers, vocab=vocab)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    tf_logging = transformers.utils.logging
    verbosity = tf_logging.get_verbosity()
    bars = tf_logging.is_progress_bar_enabled()
    tf_logging.set_verbosity_error()
    tf_logging.disable_progress_bar()
    try:
        model = transformers.MambaForCausalLM(config).eval()
        with torch.no_grad():
            _perturb(model, generator)
            if outliers:
                _plant_outliers(model)
        model.save_pretrained(str(folder), safe_serialization=True)
    finally:
        tf_logging.set_verbosity(verbosity)
        if bars:
            tf_logging.enable_progress_bar()
    _write_tokenizer(folder, _vocabulary(vocab))
    return folder


def tiny_mamba_step_onnx(
    dest_dir: os.PathLike[str] | str, *, opset: int = 21, **kw: Any
) -> pathlib.Path:
    """Build a tiny Mamba folder with :func:`tiny_mamba_dir` and export its decode step.

    Args:
        dest_dir: Folder for the Hugging Face files and ``model.onnx`` (single file).
        opset: ONNX opset.
        **kw: Passed to :func:`tiny_mamba_dir`.

    Returns:
        Path of the written ``model.onnx`` (see :func:`onnxq.exporters.mamba.export_mamba_step`).
    """
    import onnx_ir as ir

    from onnxq.exporters.mamba import export_mamba_step

    folder = tiny_mamba_dir(dest_dir, **kw)
    result = export_mamba_step(folder, opset=opset)
    path = folder / "model.onnx"
    ir.save(result.model, path)
    return path


def tiny_mamba_text_ids(
    folder: os.PathLike[str] | str, *, split: str = "calib", sequences: int = 8, length: int = 64
) -> Any:
    """Token ids ``[sequences, length]`` (int64) of onnxq's embedded English text.

    The text of ``split`` (``"calib"`` or ``"heldout"``, disjoint) is tokenized with the
    folder's ``tokenizer.json``, concatenated and cut into rows.
    """
    import numpy as np
    from tokenizers import Tokenizer

    from onnxq.calibration.default_text import calibration_texts, heldout_texts

    tokenizer = Tokenizer.from_file(str(pathlib.Path(folder) / "tokenizer.json"))
    tokenizer.no_truncation()
    texts = calibration_texts() if split == "calib" else heldout_texts()
    need = sequences * length
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer.encode(text).ids)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the {split} text gives {len(ids)} tokens, fewer than {need}")
    return np.asarray(ids[:need], dtype=np.int64).reshape(sequences, length)
