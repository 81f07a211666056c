"""Quamba (Chiang et al., ICLR 2025) for Mamba decode-step graphs: online Hadamard + percentile.

Quamba's static per-tensor W8A8 recipe for selective SSMs (methods §3) has two pieces
beyond plain W8A8:

1. **Online Hadamard on the SSM output** (:class:`QuambaPass`).  The gated scan output
   ``y = scan(u) * SiLU(z)`` (the input of ``out_proj``) carries a few massive channels.
   The pass inserts ``ỹ = y Q`` with ``Q = diag(s) · H_n / √n`` (``s`` random signs from
   ``seed``, none when ``seed`` is None) and folds ``Qᵀ`` into the ``out_proj`` weight,
   ``W ← Qᵀ W`` (ONNX ``[in, out]`` layout: rows), so ``out_proj(ỹ) = out_proj(y)``
   exactly in real arithmetic (FP32-equivalent to about 1e-6).  ``ỹ`` is then quantized
   with a plain max-based per-tensor scale.  Realisation (no ONNX Hadamard op exists):

   * ``n = D_inner`` a power of two no larger than ``max_dense`` (default 1024): one
     ``MatMul`` with the ``n × n`` constant ``Q``;
   * otherwise (non-power-of-two ``D_inner`` such as 1536 = 12·128 or 5120 = 40·128,
     or wide powers of two): the Kronecker form ``H_n = H_a ⊗ H_b``
     (:func:`onnxq.passes.hadamard.kron_factors`), ``[Mul(s)] → Reshape(…, a, b) →
     MatMul(·, H_b) → MatMul(H_aᵀ, ·) → Reshape(…, n)``, ``O(n(a + b))`` per token.

   Sites are the nodes the exporter tagged ``onnxq.role = "ssm_output"``
   (:mod:`onnxq.exporters.mamba`) whose output feeds a linear; graphs without the tags
   fall back to linears whose module matches ``*.mixer.out_proj``.  Inserted nodes carry
   ``onnxq.module = "<out_proj module>.online_hadamard"`` and must stay in floating
   point — their input is the unrotated activation: pass
   ``keep_fp=QUAMBA_KEEP_FP`` to :class:`~onnxq.passes.insert_qdq.InsertQDQPass`
   (:func:`quamba_qdq_options` does).  The rotated out_proj is marked
   ``onnxq.hadamard = "QuambaPass"`` and skipped on later runs (idempotent).

2. **Percentile clipping of the SSM input** (:func:`quamba_methods`).  The scan input
   ``u = SiLU(conv(x))`` (also the ``x_proj`` input; tag ``onnxq.role = "ssm_input"``)
   gets the range method ``percentile`` instead of ``minmax``.  Quamba-v1's release
   (``--do_percentile_u``) uses ``α = 0.99999`` — percentile 99.999, which is also
   :func:`onnxq.calibration.observers.percentile_range`'s default; the Quamba2 code base
   uses 0.9995 (99.95) for large models.  Differences from Quamba's code: onnxq takes the
   quantile of the signed histogram over all calibration data instead of an EMA (σ = 0.01)
   of per-batch quantiles of ``|u|``; with the symmetric int8 target the scale is
   ``max(|lo|, hi) / 127`` and ``u ≥ -0.279`` (SiLU), so the upper quantile decides.

Everything else (in_proj, x_proj, dt_proj, out_proj and lm_head inputs) is per-tensor
symmetric absmax, and weights per-tensor symmetric int8: :func:`quamba_target`.
The scan itself (and the conv) stays FP32 — there is no INT8 selective-scan ONNX op.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxq.passes._ir_utils import PASS_KEY
from onnxq.passes._patterns import LinearUnit, const_array, find_linears
from onnxq.passes.channel_fold import _set_const
from onnxq.passes.hadamard import hadamard_matrix, is_supported, random_signs
from onnxq.passes.online_hadamard import HADAMARD_KEY, insert_online_hadamard

__all__ = [
    "HADAMARD_KEY",
    "QUAMBA_KEEP_FP",
    "QUAMBA_PERCENTILE",
    "QuambaPass",
    "QuambaResult",
    "quamba_methods",
    "quamba_qdq_options",
    "quamba_target",
    "quamba_w8a8",
    "ssm_tensors",
]

#: ``keep_fp`` patterns for InsertQDQPass: the inserted Hadamard nodes stay float.
QUAMBA_KEEP_FP: tuple[str, ...] = ("*.online_hadamard",)
#: Quamba-v1's percentile for the SSM input (α = 0.99999).
QUAMBA_PERCENTILE = 99.999

_ROLE_KEY = "onnxq.role"
_FALLBACK_GLOB = "*mixer.out_proj"


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --------------------------------------------------------------------------- the pass


@dataclasses.dataclass
class QuambaResult(ir.passes.PassResult):
    """``sites``: one dict per rotated out_proj; ``skipped``: candidates left alone."""

    sites: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)


def ssm_tensors(model: ir.Model, role: str) -> list[str]:
    """Names of the tensors produced by nodes tagged ``onnxq.role = role``, in graph order."""
    names = []
    for node in model.graph:
        if node.metadata_props.get(_ROLE_KEY) == role:
            names.extend(o.name for o in node.outputs if o.name)
    return names


def _sites(graph: ir.Graph) -> list[LinearUnit]:
    units = [u for u in find_linears(graph) if u.matmul.metadata_props.get(PASS_KEY) != "QuambaPass"]
    tagged = [
        u for u in units
        if (p := u.input.producer()) is not None and p.metadata_props.get(_ROLE_KEY) == "ssm_output"
    ]
    if tagged:
        return tagged
    return [u for u in units if fnmatch.fnmatchcase(u.module, _FALLBACK_GLOB)]


class QuambaPass(ir.passes.InPlacePass):
    """Online Hadamard on every Mamba SSM output, ``Qᵀ`` folded into ``out_proj``.

    Args:
        seed: random-sign seed (``Q = diag(s) H / √n``); None for the plain Hadamard.
        max_dense: a power-of-two ``D_inner`` up to this uses one dense ``MatMul``;
            anything else the Kronecker pair of MatMuls.
        form: ``"auto"`` (the rule above), ``"dense"`` or ``"kronecker"``.
    """

    def __init__(self, *, seed: int | None = None, max_dense: int = 1024, form: str = "auto") -> None:
        super().__init__()
        if form not in ("auto", "dense", "kronecker"):
            raise ValueError(f"form must be 'auto', 'dense' or 'kronecker', not {form!r}")
        self.seed = seed
        self.max_dense = max_dense
        self.form = form

    def call(self, model: ir.Model) -> QuambaResult:
        result = QuambaResult(model, False)
        graph = model.graph
        for unit in _sites(graph):
            if HADAMARD_KEY in unit.matmul.metadata_props:
                continue
            reason = self._rotate(graph, unit, result)
            if reason:
                result.skipped.append({"module": unit.module, "reason": reason})
        if result.modified:
            graph.sort()
        return result

    def _rotate(self, graph: ir.Graph, unit: LinearUnit, result: QuambaResult) -> str | None:
        w_val = unit.weight
        if w_val.is_graph_input() or w_val.is_graph_output():
            return f"weight {w_val.name!r} is a graph input or output"
        w = const_array(w_val)
        if w is None:
            return f"weight {w_val.name!r} is not a constant"
        n = int(w.shape[0])
        if not is_supported(n):
            return f"no Hadamard matrix of order {n}"
        x = unit.input
        dense = self.form == "dense" or (self.form == "auto" and _is_pow2(n) and n <= self.max_dense)
        if not dense and x.shape is None:
            return f"input {x.name!r} has unknown rank (needed for the Kronecker reshape)"
        module = f"{unit.module or unit.matmul.name}.online_hadamard"
        meta = {PASS_KEY: "QuambaPass", "onnxq.module": module, "onnxq.module_type": "Hadamard"}
        nodes, factors = insert_online_hadamard(
            graph, unit.matmul, n, seed=self.seed, dense=dense, metadata=meta,
            base=x.name or "ssm_output", matrix_suffix="hadamard_matrix")
        w64 = np.asarray(w, np.float64)
        if dense:
            folded = hadamard_matrix(n, seed=self.seed).T @ w64
        else:
            # Q = diag(s) (H_a ⊗ H_b): Qᵀ W = (H_a ⊗ H_b)ᵀ (s ⊙ W), applied factor-wise.
            a, b = factors
            ws = (random_signs(n, self.seed)[:, None] * w64).reshape(a, b, -1)
            folded = np.einsum("ip,jq,ijk->pqk", hadamard_matrix(a), hadamard_matrix(b), ws,
                               optimize=True).reshape(n, -1)
        _set_const(graph, unit.matmul, 1, folded.astype(w.dtype), f"{w_val.name or 'weight'}_hadamard")
        unit.matmul.metadata_props[HADAMARD_KEY] = "QuambaPass"
        result.modified = True
        result.sites.append({
            "module": unit.module, "size": n, "form": "dense" if dense else "kronecker",
            "factors": factors, "seed": self.seed, "rotated": unit.matmul.inputs[0].name,
            "nodes": [nd.op_type for nd in nodes],
        })
        return None


# --------------------------------------------------------------------------- QDQ options


def quamba_methods(model: ir.Model, *, percentile: float = QUAMBA_PERCENTILE) -> dict[str, str]:
    """Per-tensor range-method overrides for :class:`~onnxq.passes.insert_qdq.InsertQDQPass`.

    Args:
        model: a Mamba step graph (with the exporter's ``onnxq.role`` tags).
        percentile: the clipping percentile of the SSM input (Quamba-v1: 99.999).

    Returns:
        ``{ssm_input tensor: "percentile"}`` for the default percentile, else
        ``"percentile:<p>"`` (parsed by :func:`onnxq.calibration.observers.compute_range`).
        The SSM output (rotated or not) keeps the default max-based range.
    """
    if not 50.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [50, 100], got {percentile}")
    method = "percentile" if percentile == QUAMBA_PERCENTILE else f"percentile:{percentile:g}"
    return {name: method for name in ssm_tensors(model, "ssm_input")}


def quamba_target(base: str = "tensorrt") -> Any:
    """The ``base`` target profile with per-tensor weight scales (Quamba's W8A8)."""
    from onnxq.targets.profiles import get_target

    profile = get_target(base)
    return dataclasses.replace(profile, weight_per_channel=False)


def quamba_qdq_options(
    model: ir.Model, *, percentile: float | None = QUAMBA_PERCENTILE
) -> dict[str, Any]:
    """Keyword arguments for InsertQDQPass: ``methods`` (percentile on the SSM input unless
    ``percentile`` is None) and ``keep_fp`` (the Hadamard nodes)."""
    methods = {} if percentile is None else quamba_methods(model, percentile=percentile)
    return {"methods": methods, "keep_fp": QUAMBA_KEEP_FP}


def quamba_w8a8(
    model: ir.Model,
    feeds: Any,
    *,
    hadamard: bool = True,
    percentile: float | None = QUAMBA_PERCENTILE,
    seed: int | None = None,
    target: str = "tensorrt",
) -> ir.Model:
    """Static per-tensor W8A8 of a Mamba step graph, with or without the Quamba pieces.

    Args:
        model: the FP32 step graph (not modified; a clone is quantized).
        feeds: calibration feeds of the *FP32* graph (e.g.
            :meth:`onnxq.runtime.mamba.MambaSession.calibration_feeds`); the Hadamard does
            not change the graph inputs, so the same feeds serve the rotated graph.
        hadamard: run :class:`QuambaPass` before calibrating.
        percentile: SSM-input clipping percentile, None for plain max.
        seed: random-sign seed of the Hadamard.
        target: base target profile (weights forced per-tensor, :func:`quamba_target`).

    Returns:
        The QDQ graph.
    """
    from onnxq.calibration.runner import calibrate
    from onnxq.passes.insert_qdq import InsertQDQPass

    out = model.clone()
    if hadamard:
        QuambaPass(seed=seed)(out)
    feeds = list(feeds)
    stats = calibrate(out, feeds)
    options = quamba_qdq_options(out, percentile=percentile)
    InsertQDQPass(stats=stats, target=quamba_target(target), method="minmax", **options)(out)
    return out
