"""MOSF: post-LayerNorm scale reparameterisation with the median as the layer-wise scale.

DopQ-ViT (Yang et al., arXiv 2408.03291 v2, "Median as the Optimal Scaling Factor"),
built on RepQ-ViT's scale reparameterisation (Li et al., ICCV 2023).  Post-LayerNorm
activations of ViTs have a few channels far wider and far off-centre than the rest, so
one per-tensor scale wastes the grid on them.  Per-channel activation scales would fit,
but no INT8 GEMM kernel takes them; RepQ-ViT turns them into one layer-wise scale by
folding the per-channel ratios into the LayerNorm and the next linear layer, offline.

Algebra (per LayerNorm output ``X``, channel ``c``, ``b`` bits, ``L = 2^b − 1``)
--------------------------------------------------------------------------------
Per-channel asymmetric quantization from the calibration extremes::

    s_c = (max_c − min_c) / L            z_c = round(−min_c / s_c)
    q_c = round(X_c / s_c) + z_c

MOSF picks the layer-wise scale ``s̃ = median_c(s_c)`` (RepQ-ViT: the mean, which the
outlier channels inflate) and a layer-wise zero point ``z̃``: ``round(median_c(z_c))``
for asymmetric (uint8) targets, ``L / 2`` for symmetric (int8, zero point 0) targets.
It then asks for an activation ``X̃`` whose *per-tensor* grid ``(s̃, z̃)`` gives the same
integers as the per-channel grid of ``X``::

    X̃_c / s̃ + z̃ = X_c / s_c + z_c
    ⇔  X̃_c = (X_c − m_c) / r_c      with  r_c = s_c / s̃,   m_c = s_c (z̃ − z_c)

For the symmetric case (``z_c`` not rounded) ``m_c = (min_c + max_c) / 2``: every channel
is centred and scaled to the same range ``[−L s̃ / 2, L s̃ / 2]``.

The migration ``X̃ = (X − m) ⊘ r`` is the one of :mod:`onnxq.passes.channel_fold`
(``z = m``, ``s = r``), folded without changing the FP32 function:

* LayerNorm ``X = N(u) ⊙ γ + β``:  ``γ' = γ ⊘ r``, ``β' = (β − m) ⊘ r``;
* every linear reading ``X``, ``y = X W + b`` (``W`` ``[K, N]``):
  ``W' = diag(r) W`` (rows scaled), ``b' = b + m W`` (original ``W``);
* any other reader of ``X`` (a residual branch in a post-LN graph; a pre-LN ViT has none)
  gets ``X = X̃ ⊙ r + m`` back through an explicit ``Mul`` + ``Add``.

Note on the anchor: with exact ratios, multiplying ``s̃`` by a constant scales ``X̃`` by
its inverse and every weight row by it, which a per-tensor activation scale and
per-output-channel weight scales absorb exactly.  So under onnxq's static W8A8 scheme the
median and the mean give the same quantized model; the choice matters for methods that
then *learn* the layer-wise quantizer from its initial value (DopQ-ViT's reconstruction),
and for the FP32 magnitudes (the median keeps ordinary channels near their own scale,
``r ≈ 1``).  ``anchor="mean"`` gives RepQ-ViT's variant for comparison.

The pass needs per-channel statistics (``ch_min``/``ch_max``) of the *untransformed*
norm outputs; after it the caller must recalibrate.  Folded nodes are marked
``onnxq.folded`` and skipped later, so running it twice folds once.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.calibration.stats import Stats
from onnxq.passes._patterns import NormSite, const_array, find_norm_sites
from onnxq.passes.channel_fold import ChannelFoldResult, fold_site, is_folded

__all__ = ["MedianScaleReparamPass", "mosf_params"]

logger = logging.getLogger(__name__)

PASS_TAG = "MedianScaleReparamPass"


def mosf_params(
    ch_min: np.ndarray,
    ch_max: np.ndarray,
    *,
    bits: int = 8,
    symmetric: bool = True,
    anchor: str = "median",
    min_ratio: float = 1e-2,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """MOSF's shift ``m``, ratio ``r``, layer scale ``s̃`` and zero point ``z̃``.

    Args:
        ch_min, ch_max: per-channel extremes of the activation.
        bits: activation bits ``b`` (``L = 2^b − 1`` levels).
        symmetric: target a zero-point-0 (int8) grid: ``m`` = channel centre.
        anchor: ``"median"`` (MOSF) or ``"mean"`` (RepQ-ViT) of the channel scales.
        min_ratio: lower bound of ``r`` (degenerate, constant channels).

    Returns:
        ``(m, r, s_tilde, z_tilde)`` with ``X̃ = (X − m) / r``.
    """
    if anchor not in ("median", "mean"):
        raise ValueError(f"anchor must be 'median' or 'mean', not {anchor!r}")
    lo = np.asarray(ch_min, np.float64).reshape(-1)
    hi = np.maximum(np.asarray(ch_max, np.float64).reshape(-1), lo)
    levels = float(2**bits - 1)
    s = (hi - lo) / levels
    positive = s[s > 0]
    if positive.size == 0:
        return np.zeros_like(s), np.ones_like(s), 0.0, 0.0
    s_tilde = float(np.median(positive) if anchor == "median" else np.mean(positive))
    s = np.maximum(s, s_tilde * min_ratio)
    r = s / s_tilde
    if symmetric:
        z_tilde = levels / 2.0
        m = (lo + hi) / 2.0
    else:
        # Not clipped to [0, L]: the grid identity needs z_c = round(-min_c / s_c) even
        # for a channel whose range excludes zero.
        z = np.rint(-lo / s)
        z_tilde = float(np.rint(np.median(z) if anchor == "median" else np.mean(z)))
        m = s * (z_tilde - z)
    return m, r, s_tilde, z_tilde


class MedianScaleReparamPass(ir.passes.InPlacePass):
    """Fold MOSF's per-channel ratios into each LayerNorm and the linears it feeds.

    Args:
        stats: calibration statistics of the untransformed graph with per-channel
            extremes of the norm outputs (``calibrate(model, data, tensors=[...])``).
        bits: activation bits of the target grid.
        symmetric: int8 zero-point-0 target (TensorRT); False for uint8 (ort-cpu).
        anchor: ``"median"`` (MOSF, default) or ``"mean"`` (RepQ-ViT).
        min_ratio: lower bound of the ratios.
    """

    def __init__(
        self,
        *,
        stats: Stats,
        bits: int = 8,
        symmetric: bool = True,
        anchor: str = "median",
        min_ratio: float = 1e-2,
    ) -> None:
        super().__init__()
        if anchor not in ("median", "mean"):
            raise ValueError(f"anchor must be 'median' or 'mean', not {anchor!r}")
        self.stats = stats
        self.bits = bits
        self.symmetric = symmetric
        self.anchor = anchor
        self.min_ratio = min_ratio

    def call(self, model: ir.Model) -> ChannelFoldResult:
        result = ChannelFoldResult(model, False)
        for site in find_norm_sites(model.graph):
            info = {"module": site.module, "method": f"mosf-{self.anchor}",
                    "tensor": site.output.name}
            reason = self._site(site, info)
            if reason:
                info["reason"] = reason
                result.skipped.append(info)
                logger.debug("MOSF: skip %s: %s", site.module, reason)
            else:
                result.sites.append(info)
                result.modified = True
                logger.info("MOSF: %s s~=%.4g, ratio %.3g..%.3g", site.module,
                            info["layer_scale"], info["min_ratio"], info["max_ratio"])
        return result

    def _site(self, site: NormSite, info: dict) -> str | None:
        if site.kind != "layernorm":
            return "not a LayerNorm (MOSF needs a bias to take the zero-point shift)"
        if is_folded(site.norm) or any(is_folded(u.matmul) for u in site.linears):
            return "already folded"
        name = site.output.name
        if name not in self.stats:
            return "no statistics"
        obs = self.stats[name]
        channels = const_array(site.linears[0].weight).shape[0]
        if obs.channels != channels:
            return f"statistics have {obs.channels} channel(s), the linears read {channels}"
        m, r, s_tilde, z_tilde = mosf_params(
            obs.ch_min, obs.ch_max, bits=self.bits, symmetric=self.symmetric,
            anchor=self.anchor, min_ratio=self.min_ratio,
        )
        if s_tilde <= 0:
            return "the activation is constant"
        rng = np.asarray(obs.ch_max, np.float64) - np.asarray(obs.ch_min, np.float64)
        med = float(np.median(rng)) or 1e-30
        info.update(
            layer_scale=s_tilde, layer_zero_point=z_tilde,
            min_ratio=float(r.min()), max_ratio=float(r.max()),
            max_abs_shift=float(np.max(np.abs(m))),
            range_ratio_before=float(rng.max()) / med,
            range_ratio_after=float((rng / r).max()) / (float(np.median(rng / r)) or 1e-30),
            linears=[u.module for u in site.linears], restored=[n.name for n in site.others],
        )
        return fold_site(site.norm, site.linears, site.others, m, r, pass_name=PASS_TAG)
