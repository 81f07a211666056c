"""Quantization-aware fine-tuning modules (LSQ fake quantization) and their QDQ export.

What is simulated is exactly what :class:`~onnxq.passes.insert_qdq.InsertQDQPass`
later writes for a symmetric int8 target (``tensorrt``, ``jetson``):

* every activation that gets a Q/DQ pair in the ONNX graph (the input tensor of every
  linear ``MatMul``, both inputs of ``Q·Kᵀ`` and ``P·V``) gets one per-tensor
  :class:`LSQQuantizer` with a *learnable* scale (Esser et al., LSQ: straight-through
  rounding, gradient scale ``1/√(numel·qmax)``), initialised from onnxq calibration
  statistics of the exported graph (``Stats.range(name, method)``).  Linears that read
  the same ONNX tensor (Q, K, V) share one quantizer, as they share one QuantizeLinear;
* weights are fake-quantized with the pass's own rule: per-output-channel int8 absmax,
  or (``weight_bits=4``) symmetric int4 absmax in blocks of ``block_size`` input rows
  (weights whose input size is not a multiple stay int8), straight-through;
* optionally (HALO placement, methods §7) selected linears see a Hadamard-rotated input
  ``Q(x R) · Q(W R)ᵀ`` with ``R = hadamard_matrix(n, seed)``; the export realises it with
  :class:`~onnxq.passes.online_hadamard.OnlineHadamardPass` (same ``R``).

The tensor-name mapping is read from the graph itself: the model is exported, the
linears / attention MatMuls are found with onnxq's matchers, and their ``onnxq.module``
metadata (the PyTorch module path) gives the torch side.  :func:`export_qdq` repeats
that on the fine-tuned model and inserts Q/DQ whose activation scales are the learned
ones (:class:`LearnedStats` overrides ``Stats.range``).
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxq.calibration.stats import Stats
from onnxq.torch.modules import ATTN_IMPLEMENTATION, attention_modules, patch

__all__ = [
    "LSQQuantizer",
    "LearnedStats",
    "QATConfig",
    "QATEmbedding",
    "QATLinear",
    "export_qdq",
    "fake_quant_rows",
    "fake_quant_weight",
    "float_copy",
    "learned_scales",
    "prepare_qat",
    "qat_enabled",
]

_ROLES = {("qk", 0): "q", ("qk", 1): "k", ("pv", 0): "p", ("pv", 1): "v"}
_HADAMARD_MODULE = "*.online_hadamard"


# ----------------------------------------------------------------------- fake quant


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    return (x - x * g).detach() + x * g


class LSQQuantizer(nn.Module):
    """Per-tensor symmetric fake quantization with a learnable scale (LSQ).

    ``y = clamp(round(x / s), qmin, qmax) · s`` with a straight-through round; the
    gradient of ``s`` is scaled by ``1/√(numel · qmax)`` as in LSQ.

    Args:
        scale: initial scale (``max(|lo|, |hi|) / 127`` of a calibrated range).
        bits: integer width (signed: ``[-2^(b-1), 2^(b-1) - 1]``).
        learnable: train the scale (a clipped-softmax output keeps its fixed grid).
        tensor: ONNX tensor name this quantizer stands for (for the export).
    """

    def __init__(self, scale: float, *, bits: int = 8, learnable: bool = True, tensor: str = ""):
        super().__init__()
        self.qmin = -(2 ** (bits - 1))
        self.qmax = 2 ** (bits - 1) - 1
        value = torch.tensor(float(max(scale, 1e-8)))
        if learnable:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)
        self.tensor = tensor
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        s = self.scale.abs().clamp_min(1e-8)
        if self.scale.requires_grad:
            s = _grad_scale(s, 1.0 / math.sqrt(x.numel() * self.qmax))
        return _round_ste(torch.clamp(x / s, self.qmin, self.qmax)) * s

    def range(self) -> tuple[float, float]:
        """The symmetric range whose int8 ``qparams`` give back this scale."""
        s = float(self.scale.detach().abs())
        return -self.qmax * s, self.qmax * s

    def extra_repr(self) -> str:
        return f"tensor={self.tensor!r}, scale={float(self.scale.detach()):.4g}, bits_max={self.qmax}"


def _absmax_grid(x: torch.Tensor, qmax: int, dim: int) -> torch.Tensor:
    """``clamp(rint(x / s), ±qmax) · s`` with ``s = float32(max|x| / qmax)`` along ``dim``.

    Computed like onnxq's numpy quantizers (float64 division and rounding, float32
    scale, float32 product), so that the fake-quantized values are bit-identical to
    what the exported ``DequantizeLinear`` produces: a single tie rounded differently
    flips downstream activation roundings and the difference grows layer by layer.
    """
    tiny = float(np.finfo(np.float32).tiny)
    x = x.detach()
    amax = x.abs().amax(dim=dim, keepdim=True).double()  # exact in float32
    s = (amax / float(qmax)).float().clamp_min(tiny).double()
    q = torch.clamp(torch.round(x.double() / s), -qmax, qmax)
    return (q * s).to(x.dtype)


def fake_quant_weight(w: torch.Tensor, bits: int = 8, block_size: int = 128) -> torch.Tensor:
    """InsertQDQPass's weight grid on a torch ``[out, in]`` weight, straight-through.

    ``bits=8``: per output channel, ``s = max|W_row| / 127``, values in [-127, 127].
    ``bits=4``: blocks of ``block_size`` input features, ``s = max|block| / 7``, values in
    [-7, 7]; inputs not divisible by ``block_size`` fall back to int8 per channel.
    The values equal :func:`~onnxq.passes.insert_qdq.quantize_weight_blocked_int4` /
    ``quantize_weight_per_channel`` followed by ``DequantizeLinear`` exactly.
    """
    out_f, in_f = w.shape
    if bits == 4 and in_f % block_size == 0:
        blocks = w.reshape(out_f, in_f // block_size, block_size)
        q = _absmax_grid(blocks, 7, -1)
        return w + (q.reshape(out_f, in_f) - w).detach()
    return w + (_absmax_grid(w, 127, 1) - w).detach()


def fake_quant_rows(rows: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """:class:`~onnxq.passes.quantize_embeddings.QuantizeEmbeddingsPass`'s per-row grid
    on looked-up embedding rows ``[..., H]`` (one scale per table row), straight-through."""
    qmax = 127 if bits == 8 else 7
    return rows + (_absmax_grid(rows, qmax, -1) - rows).detach()


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` whose looked-up rows are fake-quantized like the exported int8
    table (per-row absmax).  Shares ``weight`` with the embedding it replaces."""

    def __init__(self, emb: nn.Embedding, *, bits: int = 8):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = emb.num_embeddings, emb.embedding_dim
        self.padding_idx, self.max_norm = emb.padding_idx, emb.max_norm
        self.norm_type, self.scale_grad_by_freq, self.sparse = (
            emb.norm_type, emb.scale_grad_by_freq, emb.sparse)
        self.weight = emb.weight
        self.bits = bits
        self.quantize = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = super().forward(ids)
        return fake_quant_rows(rows, self.bits) if self.quantize else rows

    def to_embedding(self) -> nn.Embedding:
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx,
                           _weight=self.weight.detach(), _freeze=False)
        emb.weight = self.weight
        return emb


class QATLinear(nn.Linear):
    """``nn.Linear`` with input fake quantization, weight fake quantization and optional
    HALO input rotation.  Shares ``weight`` and ``bias`` with the linear it replaces."""

    def __init__(self, linear: nn.Linear, *, act_quant: LSQQuantizer | None, weight_bits: int,
                 block_size: int, rotation: torch.Tensor | None = None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.act_quant = act_quant
        self.weight_bits = weight_bits
        self.block_size = block_size
        if rotation is not None:
            self.register_buffer("rotation", rotation.to(linear.weight.dtype))
        else:
            self.rotation = None
        self.quantize = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return F.linear(x, self.weight, self.bias)
        w = self.weight
        if self.rotation is not None:
            x = x @ self.rotation
            w = w @ self.rotation
        if self.act_quant is not None:
            x = self.act_quant(x)
        return F.linear(x, fake_quant_weight(w, self.weight_bits, self.block_size), self.bias)

    def to_linear(self) -> nn.Linear:
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        lin.weight = self.weight
        lin.bias = self.bias
        return lin


# ----------------------------------------------------------------------- configuration


@dataclasses.dataclass
class QATConfig:
    """How a model was prepared for QAT (kept on the model as ``model.onnxq_qat``)."""

    weight_bits: int = 8
    block_size: int = 128
    target: str = "tensorrt"
    method: str = "percentile"
    hadamard: tuple[str, ...] = ()
    hadamard_seed: int | None = 0
    quantize_attention: bool = True
    #: simulated (and exported) int8 per-row embedding tables: ONNX table names
    embedding_tables: tuple[str, ...] = ()
    opset: int = 21
    #: torch key ("<linear module>" or "<attention module>:q|k|p|v") -> ONNX tensor name
    tensors: dict[str, str] = dataclasses.field(default_factory=dict)


class LearnedStats(Stats):
    """A :class:`Stats` whose ranges are replaced, per tensor, by fixed ``(lo, hi)``.

    :class:`~onnxq.passes.insert_qdq.InsertQDQPass` only calls ``name in stats`` and
    ``stats.range(name, method)``, so the learned scales reach the QDQ graph unchanged.
    """

    def __init__(self, base: Stats, overrides: Mapping[str, tuple[float, float]]):
        super().__init__(fingerprint=base.fingerprint, observers=dict(base.observers),
                         meta=dict(base.meta))
        self.overrides = dict(overrides)

    def __contains__(self, name: object) -> bool:
        return name in self.overrides or super().__contains__(name)

    def range(self, name: str, method: str = "minmax", **kw: Any) -> tuple[float, float]:
        if name in self.overrides:
            return self.overrides[name]
        return super().range(name, method, **kw)


def qat_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch all fake quantization (and rotations) of ``model`` on or off."""
    for mod in model.modules():
        if isinstance(mod, (QATLinear, QATEmbedding)):
            mod.quantize = enabled
        elif isinstance(mod, LSQQuantizer):
            mod.enabled = enabled


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every QAT module replaced by its floating-point original."""
    m = copy.deepcopy(model)
    for name, mod in list(m.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, QATLinear):
                setattr(mod, child_name, child.to_linear())
            elif isinstance(child, QATEmbedding):
                setattr(mod, child_name, child.to_embedding())
        if hasattr(mod, "onnxq_attn_quant"):
            del mod.onnxq_attn_quant
    if hasattr(m, "onnxq_qat"):
        del m.onnxq_qat
    return m


def learned_scales(model: nn.Module) -> dict[str, float]:
    """ONNX tensor name -> current (learned) scale of every activation quantizer."""
    out = {}
    for mod in model.modules():
        if isinstance(mod, LSQQuantizer) and mod.tensor:
            out[mod.tensor] = float(mod.scale.detach().abs())
    return out


# ----------------------------------------------------------------------- graph side


def _module_of(node: ir.Node) -> str:
    return node.metadata_props.get("onnxq.module", "")


def reference_graph(fp_model: nn.Module, cfg: QATConfig, tokenizer=None) -> ir.Model:
    """Export ``fp_model`` the way the QDQ export will: export → canonicalize → rotations."""
    from onnxq._api import prepare
    from onnxq.torch._export import export_module

    graph = export_module(fp_model, opset=cfg.opset, tokenizer=tokenizer)
    prepare(graph)
    if cfg.hadamard:
        from onnxq.passes.online_hadamard import OnlineHadamardPass

        OnlineHadamardPass(targets=list(cfg.hadamard), seed=cfg.hadamard_seed)(graph)
    return graph


def tensor_map(graph: ir.Model, quantize_attention: bool = True) -> dict[str, str]:
    """torch key -> ONNX tensor name for every activation InsertQDQPass quantizes."""
    from onnxq.passes._patterns import find_attention_matmuls, find_linears

    keys: dict[str, str] = {}
    for unit in find_linears(graph.graph):
        module = unit.module
        if fnmatch.fnmatchcase(module, _HADAMARD_MODULE):
            continue
        if unit.input.name:
            keys[module] = unit.input.name
    if quantize_attention:
        for att in find_attention_matmuls(graph.graph):
            for idx in (0, 1):
                v = att.node.inputs[idx]
                if v is not None and v.name:
                    keys[f"{att.module}:{_ROLES[(att.kind, idx)]}"] = v.name
    return keys


def _calib_feeds(graph: ir.Model, texts: Sequence[str] | None, feeds, tokenizer, batch_size, seq_len):
    if feeds is not None:
        return list(feeds)
    from onnxq.calibration import data as _data
    from onnxq.calibration.default_text import calibration_texts

    tok = _data.load_tokenizer(tokenizer)
    texts = list(texts) if texts is not None else calibration_texts(256)
    return list(_data.text_batches(texts, tok, _data.input_specs(graph),
                                   batch_size=batch_size, seq_len=seq_len))


def _calibrate(graph: ir.Model, feeds) -> Stats:
    from onnxq.calibration.runner import calibrate

    return calibrate(graph, feeds)


def embedding_tables(graph: ir.Model) -> tuple[str, ...]:
    """Names of the tables :class:`QuantizeEmbeddingsPass` stores as int8 rows in ``graph``."""
    from onnxq.passes.quantize_embeddings import QuantizeEmbeddingsPass

    return tuple(QuantizeEmbeddingsPass()(graph.clone()).tables)


def _is_clipped_probs(graph: ir.Model, tensor: str) -> bool:
    for node in graph.graph:
        for out in node.outputs:
            if out.name == tensor:
                return node.op_type == "Clip"
    return False


def prepare_qat(
    model: nn.Module,
    *,
    texts: Sequence[str] | None = None,
    feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
    tokenizer=None,
    weight_bits: int = 8,
    block_size: int = 128,
    target: str = "tensorrt",
    method: str = "percentile",
    hadamard: str | Sequence[str] | bool = (),
    hadamard_seed: int | None = 0,
    quantize_attention: bool = True,
    int8_embeddings: bool = True,
    batch_size: int = 32,
    seq_len: int = 128,
    stats: Stats | None = None,
) -> nn.Module:
    """Insert LSQ fake quantizers into ``model`` (in place), initialised from onnxq stats.

    Args:
        model: a transformers encoder (patched or not; it is switched to the ``"onnxq"``
            attention function, which computes plain attention unless patched).
        texts / feeds / tokenizer: calibration data for the initial ranges: texts
            (default: onnxq's calibration text) tokenized with ``tokenizer`` (a folder
            with ``tokenizer.json``), or ready ONNX feeds.
        weight_bits: 8 (per-channel) or 4 (blocked int4, W4A8).
        block_size: int4 block rows.
        target: a symmetric int8 profile (``tensorrt`` or ``jetson``).
        method: range method for the initial scales (onnxq's PTQ default: percentile).
        hadamard: HALO placement: module globs (e.g. ``"*.output.dense"``) whose linears
            get a rotated input, ``True`` for every linear of the encoder layers.
        hadamard_seed: random-sign seed of the rotation (None = plain Hadamard).
        quantize_attention: also fake-quantize ``Q``, ``K``, ``P``, ``V``.
        int8_embeddings: simulate the int8 per-row embedding tables that
            :func:`export_qdq` (like ``onnxq convert``) writes for large tables.
        stats: precomputed Stats of the reference graph (skips calibration).

    Returns:
        ``model``, with ``model.onnxq_qat`` (:class:`QATConfig`) set.
    """
    from onnxq.targets.profiles import get_target

    prof = get_target(target)
    if prof.activation_dtype != "int8" or not prof.activation_symmetric:
        raise ValueError(f"QAT simulates symmetric int8 activations; target {target!r} is not")
    if weight_bits not in (4, 8):
        raise ValueError("weight_bits must be 8 or 4")
    if hadamard is True:
        hadamard = ("*.layer.*",)
    elif isinstance(hadamard, str):
        hadamard = (hadamard,)
    cfg = QATConfig(weight_bits=weight_bits, block_size=block_size, target=target, method=method,
                    hadamard=tuple(hadamard or ()), hadamard_seed=hadamard_seed,
                    quantize_attention=quantize_attention)
    if getattr(model.config, "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        patch(model, "none")
    graph = reference_graph(model, cfg, tokenizer)
    if stats is None:
        stats = _calibrate(graph, _calib_feeds(graph, texts, feeds, tokenizer, batch_size, seq_len))
    cfg.tensors = tensor_map(graph, quantize_attention)
    if int8_embeddings:
        cfg.embedding_tables = embedding_tables(graph)

    quantizers: dict[str, LSQQuantizer] = {}

    def quantizer(tensor: str, learnable: bool = True) -> LSQQuantizer:
        if tensor not in quantizers:
            if learnable:
                lo, hi = stats.range(tensor, method)
                scale = max(-lo, hi) / 127.0
            else:
                scale = 1.0 / 127.0
            quantizers[tensor] = LSQQuantizer(scale, learnable=learnable, tensor=tensor)
        return quantizers[tensor]

    from onnxq.passes.hadamard import hadamard_matrix

    modules = dict(model.named_modules())
    for key, tensor in cfg.tensors.items():
        if ":" in key:
            continue
        lin = modules.get(key)
        if not isinstance(lin, nn.Linear):
            continue
        rotation = None
        if any(fnmatch.fnmatchcase(key, g) for g in cfg.hadamard):
            rotation = torch.from_numpy(hadamard_matrix(lin.in_features, seed=hadamard_seed)).float()
        parent_name, _, child = key.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, QATLinear(lin, act_quant=quantizer(tensor), weight_bits=weight_bits,
                                         block_size=block_size, rotation=rotation))
    for name, mod in attention_modules(model):
        roles = {}
        for role in "qkpv":
            tensor = cfg.tensors.get(f"{name}:{role}")
            if tensor is not None:
                fixed = role == "p" and _is_clipped_probs(graph, tensor)
                roles[role] = quantizer(tensor, learnable=not fixed)
        if roles:
            mod.onnxq_attn_quant = nn.ModuleDict(roles)
    embeddings = {f"{n}.weight": (n, m) for n, m in model.named_modules()
                  if isinstance(m, nn.Embedding)}
    for table in cfg.embedding_tables:
        if table not in embeddings:
            raise RuntimeError(f"embedding table {table!r} has no nn.Embedding in the model")
        key, emb = embeddings[table]
        parent_name, _, child = key.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        setattr(parent, child, QATEmbedding(emb, bits=8))
    # Linears that are not part of the graph's linear units (e.g. a pooler that is not
    # exported) stay float; their weights are not quantized by the export either.
    model.onnxq_qat = cfg
    return model


def export_qdq(
    model: nn.Module,
    *,
    texts: Sequence[str] | None = None,
    feeds: Iterable[Mapping[str, np.ndarray]] | None = None,
    tokenizer=None,
    batch_size: int = 32,
    seq_len: int = 128,
    int8_embeddings: bool | None = None,
    fp32: bool = False,
):
    """Export a QAT model to a static QDQ onnx-ir Model whose activation scales are learned.

    The float model is exported (same graph as :func:`prepare_qat` saw), calibrated once
    (only for the graph fingerprint and for any tensor without a learned scale), and
    :class:`InsertQDQPass` runs with :class:`LearnedStats`.  Weights get the pass's own
    per-channel int8 / blocked int4 grid, which the fine-tuning simulated.
    ``int8_embeddings`` (default: whatever :func:`prepare_qat` simulated) stores the large
    embedding tables as int8 rows.

    Returns:
        ``(qdq_model, qdq_result)``; with ``fp32=True`` ``(qdq_model, qdq_result, fp32_graph)``.
    """
    from onnxq.passes.insert_qdq import InsertQDQPass
    from onnxq.targets.profiles import get_target

    cfg: QATConfig = model.onnxq_qat
    scales = learned_scales(model)
    fp = float_copy(model)
    graph = reference_graph(fp, cfg, tokenizer)
    fp_graph = graph.clone() if fp32 else None
    mapping = tensor_map(graph, cfg.quantize_attention)
    if mapping != cfg.tensors:
        missing = set(cfg.tensors.items()) ^ set(mapping.items())
        raise RuntimeError(f"the exported graph does not match the QAT model: {sorted(missing)[:3]}")
    base = _calibrate(graph, _calib_feeds(graph, texts, feeds, tokenizer, batch_size, seq_len))
    overrides = {t: (-127.0 * s, 127.0 * s) for t, s in scales.items()}
    stats = LearnedStats(base, overrides)
    result = InsertQDQPass(
        stats=stats, target=get_target(cfg.target), method=cfg.method,
        keep_fp=[_HADAMARD_MODULE], quantize_attention=cfg.quantize_attention,
        weight_bits=cfg.weight_bits, block_size=cfg.block_size,
    )(graph)
    if int8_embeddings is None:
        int8_embeddings = bool(cfg.embedding_tables)
    if int8_embeddings:
        from onnxq.passes.quantize_embeddings import QuantizeEmbeddingsPass

        result.embeddings = QuantizeEmbeddingsPass()(graph).tables
        if cfg.embedding_tables and tuple(result.embeddings) != tuple(cfg.embedding_tables):
            raise RuntimeError(f"int8 embedding tables {result.embeddings} differ from the "
                               f"simulated ones {list(cfg.embedding_tables)}")
    graph.metadata_props["onnxq.qat"] = (
        f"W{cfg.weight_bits}A8 LSQ, target={cfg.target}, hadamard={list(cfg.hadamard)}"
    )
    if fp32:
        return graph, result, fp_graph
    return graph, result
