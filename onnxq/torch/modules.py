"""Outlier-free attention for Hugging Face models: clipped softmax and gated attention.

Bondarenko, Nagel, Blankevoort, "Quantizable Transformers: Removing Outliers by
Helping Attention Heads Do Nothing" (NeurIPS 2023), methods digest §6:

* :class:`ClippedSoftmax`: ``clip((ζ − γ) · softmax(x) + γ, 0, 1)``; with ``γ < 0`` an
  exact 0 and with ``ζ > 1`` an exact 1 are reachable from finite logits.  Exported as
  ``Softmax → Mul(ζ−γ) → Add(γ) → Clip(0, 1)``: an output in exactly [0, 1].
* :class:`GatedAttention`: per head ``h``, ``out_h = sigmoid(G_h(x_h)) ⊙ attn_h`` with
  ``x_h`` the attention-module *input* sliced to head ``h``'s features
  (``conditional_per_token``).  Exported as ``MatMul → (Relu → MatMul) → Sigmoid → Mul``.

:func:`patch` swaps them into BERT / RoBERTa / ViT / OPT / LLaMA-style attention without
editing transformers: it registers one attention function, ``"onnxq"``, with
``transformers.AttentionInterface`` (and the eager mask builder with
``AttentionMaskInterface``), attaches the new submodules to every self-attention
module, and sets ``config._attn_implementation = "onnxq"``.  The gate reads the module
input through a forward pre-hook.  The same attention function also runs the
activation fake-quantizers of :mod:`onnxq.torch.qat` on ``Q``, ``K``, ``P`` and ``V``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ATTN_IMPLEMENTATION",
    "ClippedSoftmax",
    "GatedAttention",
    "attention_modules",
    "onnxq_attention_forward",
    "patch",
]

#: Name under which :func:`onnxq_attention_forward` is registered with transformers.
ATTN_IMPLEMENTATION = "onnxq"

# Defaults from the paper's scripts (methods §6c): BERT clipped(-.025:1), MLP gate.
DEFAULT_GAMMA = -0.025
DEFAULT_ZETA = 1.0


class ClippedSoftmax(nn.Module):
    """``clip((zeta - gamma) * softmax(x) + gamma, 0, 1)`` along ``dim``.

    Args:
        zeta: stretch ``ζ >= 1`` (the code's ``eta``).
        gamma: shift ``γ <= 0``.  LLM variant: ``gamma = -alpha / max_seq_length``.
        dim: softmax axis.

    With ``zeta=1, gamma=0`` the output equals ``softmax(x)`` exactly.
    """

    def __init__(self, zeta: float = DEFAULT_ZETA, gamma: float = DEFAULT_GAMMA, dim: int = -1):
        super().__init__()
        if zeta < 1.0 or gamma > 0.0:
            raise ValueError(f"clipped softmax needs zeta >= 1 and gamma <= 0 (got {zeta}, {gamma})")
        self.zeta = float(zeta)
        self.gamma = float(gamma)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = F.softmax(x, dim=self.dim)
        return torch.clamp((self.zeta - self.gamma) * p + self.gamma, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"zeta={self.zeta}, gamma={self.gamma}"


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


class GatedAttention(nn.Module):
    """Per-token, per-head gate ``sigmoid(G_h(x_h))`` on the attention module's input.

    Args:
        num_heads: number of (query) heads.
        in_features: features per head of the gate input (``hidden_size // num_heads``).
        kind: ``"linear"`` (``Linear(d_head → 1)`` per head), ``"mlp"``
            (``Linear(d_head → d_head/4) → ReLU → Linear(→ 1)``, the BERT default) or
            ``"linear_all"`` (one ``Linear(hidden → num_heads)`` on all features).
        pi_init: initial gate probability; the output bias is ``logit(pi_init)``.
            ``None`` keeps bias 0 (gate 0.5).
        scale: multiply the gate by this (``1/pi_init`` when fine-tuning a pretrained
            model, so that the initial function is preserved).

    ``forward(x)`` maps ``[..., num_heads * in_features]`` to gates ``[..., num_heads]``.
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        kind: str = "mlp",
        pi_init: float | None = 0.25,
        scale: float = 1.0,
    ):
        super().__init__()
        if kind not in ("linear", "mlp", "linear_all"):
            raise ValueError(f"unknown gate kind {kind!r}; choose linear, mlp or linear_all")
        self.num_heads = num_heads
        self.in_features = in_features
        self.kind = kind
        self.scale = float(scale)
        hidden = max(1, in_features // 4)
        bias = _logit(pi_init) if pi_init is not None else 0.0
        if kind == "linear_all":
            self.w1 = nn.Parameter(torch.randn(num_heads * in_features, num_heads) * 0.01)
            self.b1 = nn.Parameter(torch.full((num_heads,), bias))
        elif kind == "linear":
            self.w1 = nn.Parameter(torch.randn(num_heads, in_features, 1) * 0.01)
            self.b1 = nn.Parameter(torch.full((num_heads, 1, 1), bias))
        else:
            self.w1 = nn.Parameter(torch.randn(num_heads, in_features, hidden) * 0.01)
            self.b1 = nn.Parameter(torch.zeros(num_heads, 1, hidden))
            self.w2 = nn.Parameter(torch.randn(num_heads, hidden, 1) * 0.01)
            self.b2 = nn.Parameter(torch.full((num_heads, 1, 1), bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear_all":
            g = torch.sigmoid(x @ self.w1 + self.b1)
        else:
            lead = x.shape[:-1]
            # [..., T, H*d] -> [H, N, d] with N = prod(lead)
            xh = x.reshape(-1, self.num_heads, self.in_features).transpose(0, 1)
            h = xh @ self.w1 + self.b1
            if self.kind == "mlp":
                h = torch.relu(h) @ self.w2 + self.b2
            g = torch.sigmoid(h).squeeze(-1).transpose(0, 1).reshape(*lead, self.num_heads)
        return g * self.scale if self.scale != 1.0 else g

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, in={self.in_features}, kind={self.kind}, scale={self.scale}"


# ----------------------------------------------------------------------- attention function


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    if groups == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, groups, t, d).reshape(b, h * groups, t, d)


def _fq(module: nn.Module, role: str, x: torch.Tensor) -> torch.Tensor:
    quant = getattr(module, "onnxq_attn_quant", None)
    if quant is not None and role in quant:
        return quant[role](x)
    return x


def onnxq_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    """Eager attention with optional clipped softmax, head gates and fake quantization.

    The layout follows transformers' eager functions: ``query [B, H, T, d]``, output
    ``[B, T, H, d]`` and the attention probabilities.  Without any onnxq submodule on
    ``module`` it computes exactly what ``eager_attention_forward`` computes.
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    groups = getattr(module, "num_key_value_groups", 1) or 1
    key = _repeat_kv(key, groups)
    value = _repeat_kv(value, groups)
    query = _fq(module, "q", query)
    key = _fq(module, "k", key)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    softmax = getattr(module, "onnxq_softmax", None)
    if softmax is not None:
        probs = softmax(scores)
    else:
        probs = F.softmax(scores, dim=-1)
    probs = F.dropout(probs, p=dropout, training=module.training)
    probs_q = _fq(module, "p", probs)
    value = _fq(module, "v", value)
    out = torch.matmul(probs_q, value).transpose(1, 2).contiguous()
    gate = getattr(module, "onnxq_gate", None)
    if gate is not None:
        x = module.__dict__.pop("_onnxq_input", None)
        if x is None:
            raise RuntimeError("gated attention: the module input was not captured")
        out = out * gate(x).unsqueeze(-1)
    return out, probs


def _capture_input(module: nn.Module, args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states")
    module.__dict__["_onnxq_input"] = x


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, onnxq_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, eager_mask)
    _REGISTERED = True


# ----------------------------------------------------------------------- patching


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Self-attention modules (BERT/ViT ``query/key/value``, OPT/LLaMA ``q_proj/k_proj/v_proj``)."""
    for name, mod in model.named_modules():
        children = dict(mod.named_children())
        if {"query", "key", "value"} <= children.keys() or {"q_proj", "k_proj", "v_proj"} <= children.keys():
            yield name, mod


def _heads(mod: nn.Module, config) -> tuple[int, int]:
    heads = (
        getattr(mod, "num_attention_heads", None)
        or getattr(mod, "num_heads", None)
        or getattr(config, "num_attention_heads", None)
    )
    hidden = getattr(config, "hidden_size", None)
    if hidden is None:
        lin = getattr(mod, "query", None) or mod.q_proj
        hidden = lin.in_features
    return int(heads), int(hidden) // int(heads)


def _set_attn_implementation(model: nn.Module, name: str) -> None:
    configs = []
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and all(cfg is not c for c in configs):
            configs.append(cfg)
    for cfg in configs:
        try:
            cfg._attn_implementation = name
        except Exception:  # pragma: no cover - older configs
            cfg._attn_implementation_internal = name


def patch(
    model: nn.Module,
    method: str = "clipped",
    *,
    zeta: float = DEFAULT_ZETA,
    gamma: float | None = None,
    alpha: float | None = None,
    max_seq_length: int | None = None,
    gate: str = "mlp",
    pi_init: float | None = 0.25,
    gate_scale: float | None = None,
) -> nn.Module:
    """Swap clipped softmax and/or gated attention into a Hugging Face model, in place.

    Args:
        model: a transformers model using the attention interface (BERT, RoBERTa, ViT,
            OPT, LLaMA, ...).
        method: ``"none"`` (vanilla attention through the onnxq function, e.g. for QAT),
            ``"clipped"``, ``"gated"`` or ``"clipped+gated"``.
        zeta, gamma: clipped-softmax stretch and shift (default γ = −0.025, the BERT
            setting).
        alpha: LLM variant ``gamma = -alpha / max_seq_length`` (OPT: α = 12, T = 2048).
        max_seq_length: ``T`` for ``alpha`` (default: ``config.max_position_embeddings``).
        gate: gate network, ``"mlp"`` (BERT default), ``"linear"`` or ``"linear_all"``.
        pi_init: initial gate probability (bias ``logit(pi_init)``).
        gate_scale: multiply the gate output by this; use ``1 / pi_init`` when
            fine-tuning a pretrained checkpoint.

    Returns:
        ``model`` (patched in place; parameters of the gates are new).
    """
    methods = {"none", "clipped", "gated", "clipped+gated", "gated+clipped"}
    if method not in methods:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(methods)}")
    _register()
    config = getattr(model, "config", None)
    if alpha is not None:
        t = max_seq_length or getattr(config, "max_position_embeddings", None)
        if not t:
            raise ValueError("alpha needs max_seq_length")
        gamma = -float(alpha) / float(t)
    if gamma is None:
        gamma = DEFAULT_GAMMA
    found = list(attention_modules(model))
    if not found:
        raise ValueError(f"no self-attention modules found in {type(model).__name__}")
    ref = next(model.parameters())
    for _, mod in found:
        if "clipped" in method:
            mod.onnxq_softmax = ClippedSoftmax(zeta, gamma)
        if "gated" in method:
            heads, per_head = _heads(mod, getattr(mod, "config", config))
            mod.onnxq_gate = GatedAttention(
                heads, per_head, kind=gate, pi_init=pi_init,
                scale=gate_scale if gate_scale is not None else 1.0,
            ).to(ref.device, ref.dtype)
            if not getattr(mod, "_onnxq_hooked", False):
                mod.register_forward_pre_hook(_capture_input, with_kwargs=True)
                mod._onnxq_hooked = True
    _set_attn_implementation(model, ATTN_IMPLEMENTATION)
    return model
