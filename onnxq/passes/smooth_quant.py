"""SmoothQuant (Xiao et al., ICML 2023, arXiv 2211.10438) as a weight fold.

For a normalisation output ``X`` read by linears ``y_i = X W_i + b_i`` (``W_i`` of
shape ``[C, N_i]``), SmoothQuant moves quantization difficulty from activations
to weights with a per-channel scale::

    s_j = max|X_j|^α / max_i max_n |W_i[j, n]|^(1 − α),   clipped to [1e-5, 1e5]

and rewrites ``X̃ = X ⊘ s``, ``W_i' = W_i ⊙ s[:, None]`` (``X W = (X ⊘ s)(diag(s) W)``).
``X ⊘ s`` is folded into the norm (``γ' = γ/s``, ``β' = β/s``); other consumers
(a post-LN residual) read ``X̃ ⊙ s`` through an explicit ``Mul``.  There is no
shift (``z = 0``), so RMSNorm sites work too.  A channel whose ``max|X_j|`` or
``max|W_j|`` is zero keeps ``s_j = 1``.

``max|X_j|`` comes from the calibration statistics of the untransformed graph
(``ch_absmax``, no sample needed); recalibrate after the pass.  Folded nodes are
marked ``onnxq.folded`` and skipped on later runs.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxq.calibration.stats import Stats
from onnxq.passes._patterns import NormSite, const_array, find_norm_sites
from onnxq.passes.channel_fold import (
    ChannelFoldResult,
    check_linear,
    check_norm,
    check_restore,
    fold_site,
    is_folded,
)

__all__ = ["SmoothQuantPass", "smooth_quant_scale"]

logger = logging.getLogger(__name__)

PASS_TAG = "SmoothQuantPass"


def smooth_quant_scale(
    act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float = 0.5,
    *, clip: tuple[float, float] = (1e-5, 1e5),
) -> np.ndarray:
    """``s_j = max|X_j|^α / max|W_j|^(1−α)``, 1 where either maximum is zero."""
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax, np.float64)
    ok = (a > 0) & (w > 0) & np.isfinite(a) & np.isfinite(w)
    s = np.ones_like(a)
    s[ok] = np.power(a[ok], alpha) / np.power(w[ok], 1.0 - alpha)
    return np.clip(s, *clip)


class SmoothQuantPass(ir.passes.InPlacePass):
    """Fold SmoothQuant per-channel scales into norms and their linear consumers.

    Args:
        stats: calibration statistics of the untransformed graph (``ch_absmax`` of
            every norm output to smooth).
        alpha: migration strength (0: nothing moves to the weights, 1: everything).
    """

    def __init__(self, *, stats: Stats, alpha: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.stats = stats
        self.alpha = alpha

    def call(self, model: ir.Model) -> ChannelFoldResult:
        result = ChannelFoldResult(model, False)
        for site in find_norm_sites(model.graph):
            info = {"module": site.module, "method": "smoothquant", "tensor": site.output.name,
                    "alpha": self.alpha}
            reason = self._site(site, info)
            if reason:
                info["reason"] = reason
                result.skipped.append(info)
            else:
                result.sites.append(info)
                result.modified = True
                logger.info("SmoothQuant: %s max s %.3g", site.module, info["max_s"])
        return result

    def _site(self, site: NormSite, info: dict) -> str | None:
        name = site.output.name
        if is_folded(site.norm) or any(is_folded(u.matmul) for u in site.linears):
            return "already folded"
        if name not in self.stats:
            return "no statistics"
        obs = self.stats[name]
        act = np.asarray(obs.ch_absmax, np.float64).reshape(-1)
        expected = const_array(site.linears[0].weight).shape[0]
        if act.size != expected:
            return f"statistics have {act.size} channel(s), the linears read {expected}"
        ones = np.ones(act.size)
        reason = check_norm(site.norm, None, ones)
        for unit in site.linears:
            reason = reason or check_linear(unit, None, ones)
        reason = reason or check_restore(site.output, site.others)
        if reason:
            return reason
        w_absmax = np.max(
            np.stack([np.abs(const_array(u.weight)).max(axis=1) for u in site.linears]), axis=0
        )
        s = smooth_quant_scale(act, w_absmax, self.alpha)
        info.update(
            max_s=float(s.max()), min_s=float(s.min()),
            max_channel_before=float(act.max()), max_channel_after=float((act / s).max()),
            linears=[u.module for u in site.linears], restored=[n.name for n in site.others],
        )
        if np.all(s == 1.0):
            return "all scales are 1"
        return fold_site(site.norm, site.linears, site.others, None, s, pass_name=PASS_TAG)
