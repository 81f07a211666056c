"""Outlier Suppression+ (Wei et al., EMNLP 2023, arXiv 2304.09145) as a weight fold.

For every normalisation whose output ``X`` (``[rows, C]``) feeds linear layers,
OS+ migrates each channel ``j`` with a shift and a scale:

* shift ``z_j = (max_t X_tj + min_t X_tj) / 2`` (paper Eq. 5) centres every channel,
  so the tensor range shrinks to the largest single-channel range.  It is 0 for
  RMSNorm sites (no β to absorb it; the LLaMA recipe of the paper is scale-only)
  and when ``shift=False``.
* scale ``s_j = max(cmx_j / t if cmx_j > t else 1, cmn_j / (−t) if cmn_j < −t else 1)``
  (the official code's ``cac_scale``, a generalisation of paper Eq. 8), with
  ``cmx``/``cmn`` the per-channel max/min of ``X − z``: only the channels that
  leave ``(−t, t)`` are squeezed into it.

``X̃ = (X − z) ⊘ s`` is folded into the norm (``γ' = γ/s``, ``β' = (β − z)/s``) and
into every linear consumer ``y = X W + b`` (``b' = b + z W``, ``W' = W ⊙ s[:, None]``);
any other consumer (BERT's post-LN residual ``Add``) reads ``X̃ ⊙ s + z`` through an
explicit ``Mul`` + ``Add`` (see :mod:`onnxq.passes.channel_fold`).  The result is
FP32-equivalent; only the quantization error changes.

Choosing ``t`` (:func:`search_shift_scale`, a 1-D grid like the code's
``Migrator1DRangeSearch``): candidates run from ``max|X − z|`` down to
``min_ratio · max|X − z|`` (geometric spacing, so the small thresholds where
ordinary channels start to be scaled are resolved finely), plus ``t = ∞``
(shift only) and "no migration at all".  Each candidate is scored on the
calibration reservoir sample by the simulated W8A8 error of the consumer linears::

    L_i = ‖Q((X − z) ⊘ s) · Q(W_i ⊙ s) + b̃_i − (X W_i + b_i)‖² / ‖X W_i + b_i‖²
    L   = Σ_i L_i

(sum over features and rows; dividing by the FP output's energy makes Q, K and V
count equally).  ``Q`` of the activation is per-tensor fake quantization on the
candidate's own range (symmetric int8 on ``[−max|X̃|, max|X̃|]``, or asymmetric
uint8 on ``[min X̃, max X̃]``), ``Q`` of the weight is per-output-channel
symmetric int8, as :class:`~onnxq.passes.insert_qdq.InsertQDQPass` will do.
The bias cancels from the difference, so the search never needs it except for
the normaliser.

Deviation from the paper: for the Q/K/V site the paper scores ``t`` on the
attention output ``softmax(Q̃K̃ᵀ)Ṽ`` (Eq. 7).  This pass sums the three
projections' (normalised) losses instead, which needs no head layout, mask or
softmax scaling and so works on any graph; the paper's ablation puts the cost of
this simplification at a few points at INT6/INT4, at W8A8 it is small.  Because
"no migration" and "shift only" are candidates, the chosen setting is never worse
than either on the sample.

The statistics must be the untransformed graph's, collected with a reservoir
sample (``calibrate(..., sample_rows=N)``); after the fold the caller must
recalibrate.  Folded norms and linears are marked with ``onnxq.folded`` and
skipped on later runs, so the pass is idempotent.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

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

__all__ = [
    "OutlierSuppressionPlusPass",
    "ShiftScaleChoice",
    "fake_quant_activation",
    "fake_quant_weight",
    "os_plus_scale",
    "search_shift_scale",
]

logger = logging.getLogger(__name__)

PASS_TAG = "OutlierSuppressionPlusPass"


# ------------------------------------------------------------------ search
def fake_quant_activation(x: np.ndarray, *, bits: int = 8, symmetric: bool = True) -> np.ndarray:
    """Per-tensor min/max fake quantization (as ``qparams`` + QuantizeLinear would do)."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = float(np.max(np.abs(x))) if x.size else 0.0
        scale = max(amax / qmax, 1e-12)
        return np.clip(np.rint(x / scale), -qmax - 1, qmax) * scale
    qmax = 2**bits - 1
    lo = min(float(x.min()), 0.0)
    hi = max(float(x.max()), 0.0)
    scale = max((hi - lo) / qmax, 1e-12)
    zp = float(np.clip(np.rint(-lo / scale), 0, qmax))
    return (np.clip(np.rint(x / scale) + zp, 0, qmax) - zp) * scale


def fake_quant_weight(w: np.ndarray, *, bits: int = 8) -> np.ndarray:
    """Per-output-channel (axis 1 of ``[K, N]``) symmetric fake quantization."""
    qmax = 2 ** (bits - 1) - 1
    scale = np.maximum(np.abs(w).max(axis=0) / qmax, np.finfo(np.float32).tiny)
    return np.clip(np.rint(w / scale), -qmax, qmax) * scale


def os_plus_scale(cmx: np.ndarray, cmn: np.ndarray, t: float) -> np.ndarray:
    """OS+ ``cac_scale``: squeeze channels whose shifted range leaves ``(−t, t)``."""
    if not math.isfinite(t):
        return np.ones_like(cmx, dtype=np.float64)
    up = np.where(cmx > t, cmx / t, 1.0)
    down = np.where(cmn < -t, cmn / -t, 1.0)
    return np.maximum(np.maximum(up, down), 1.0)


@dataclasses.dataclass
class ShiftScaleChoice:
    """Outcome of :func:`search_shift_scale`.

    ``t`` is ``inf`` for "shift only" and ``nan`` for "no migration" (``z = 0``,
    ``s = 1``).  Losses are the normalised sample losses described in the module
    docstring.
    """

    z: np.ndarray
    s: np.ndarray
    t: float
    loss: float
    loss_identity: float
    loss_shift_only: float | None
    candidates: int

    @property
    def is_identity(self) -> bool:
        return not np.any(self.z) and bool(np.all(self.s == 1.0))

    @property
    def gain(self) -> float:
        """Relative loss reduction against no migration."""
        if self.loss_identity <= 0:
            return 0.0
        return 1.0 - self.loss / self.loss_identity


def search_shift_scale(
    sample: np.ndarray,
    weights: Sequence[np.ndarray],
    *,
    biases: Sequence[np.ndarray | None] | None = None,
    ch_min: np.ndarray | None = None,
    ch_max: np.ndarray | None = None,
    shift: bool = True,
    scale: bool = True,
    bits: int = 8,
    symmetric: bool = True,
    num_candidates: int = 60,
    min_ratio: float = 0.01,
    max_rows: int = 1024,
) -> ShiftScaleChoice:
    """Pick OS+'s shift ``z`` and outlier threshold ``t`` for one activation.

    Args:
        sample: ``[rows, C]`` sample of the activation (e.g. a calibration reservoir).
        weights: ``[C, N_i]`` weights of the linears that read the activation.
        biases: their biases (only used to normalise each loss), or None.
        ch_min, ch_max: per-channel extremes over the whole calibration set (they
            define ``z`` and the scales); default: the sample's.
        shift: use ``z = (max + min)/2`` (else ``z = 0``).
        scale: search ``t`` (else only "shift only" and "no migration").
        bits, symmetric: activation fake quantization (weights: per-channel symmetric).
        num_candidates: grid points for ``t``.
        min_ratio: smallest ``t`` as a fraction of ``max|X − z|``.
        max_rows: rows of ``sample`` used.

    Returns:
        The best :class:`ShiftScaleChoice` (ties go to the simpler setting).
    """
    x = np.asarray(sample, dtype=np.float32)[:max_rows]
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("sample must be a non-empty [rows, C] array")
    channels = x.shape[1]
    cmin = np.asarray(ch_min if ch_min is not None else x.min(0), np.float64).reshape(-1)
    cmax = np.asarray(ch_max if ch_max is not None else x.max(0), np.float64).reshape(-1)
    if cmin.size != channels or cmax.size != channels:
        raise ValueError("ch_min/ch_max do not match the sample's channels")
    for w in weights:
        if w.ndim != 2 or w.shape[0] != channels:
            raise ValueError(f"weight of shape {w.shape} does not read {channels} channels")
    wcat = np.concatenate([np.asarray(w, np.float32) for w in weights], axis=1)
    bounds = np.cumsum([0] + [w.shape[1] for w in weights])
    bias_list = list(biases) if biases is not None else [None] * len(weights)
    bcat = np.concatenate([
        np.zeros(w.shape[1], np.float32) if b is None else np.asarray(b, np.float32).reshape(-1)
        for w, b in zip(weights, bias_list)
    ])
    y_fp = x @ wcat
    energy = np.array([
        float(np.sum(np.square(y_fp[:, a:b] + bcat[a:b], dtype=np.float64)))
        for a, b in zip(bounds[:-1], bounds[1:])
    ])
    energy = np.maximum(energy, 1e-30)

    def loss(z: np.ndarray, s: np.ndarray, target: np.ndarray) -> float:
        xt = (x - z.astype(np.float32)) / s.astype(np.float32)
        xq = fake_quant_activation(xt, bits=bits, symmetric=symmetric).astype(np.float32)
        wq = fake_quant_weight(wcat * s.astype(np.float32)[:, None], bits=bits).astype(np.float32)
        diff = xq @ wq - target
        sq = np.square(diff, dtype=np.float64)
        return float(sum(np.sum(sq[:, a:b]) / e
                         for a, b, e in zip(bounds[:-1], bounds[1:], energy)))

    zero = np.zeros(channels)
    one = np.ones(channels)
    loss_identity = loss(zero, one, y_fp)
    best = ShiftScaleChoice(zero, one, float("nan"), loss_identity, loss_identity, None, 1)
    z = (cmax + cmin) / 2.0 if shift else zero
    target = (x - z.astype(np.float32)) @ wcat if shift else y_fp
    count = 1
    loss_shift = None
    if shift and np.any(z):
        loss_shift = loss(z, one, target)
        count += 1
        if loss_shift < best.loss:
            best = ShiftScaleChoice(z, one, float("inf"), loss_shift, loss_identity, None, 0)
    if scale:
        cmx, cmn = cmax - z, cmin - z
        amax = float(max(np.max(np.abs(cmx)), np.max(np.abs(cmn))))
        if amax > 0 and num_candidates > 0:
            grid = np.geomspace(amax, amax * max(min_ratio, 1e-6), num_candidates)
            for t in grid:
                s = os_plus_scale(cmx, cmn, float(t))
                if np.all(s == 1.0):
                    continue  # same as shift only
                value = loss(z, s, target)
                count += 1
                if value < best.loss:
                    best = ShiftScaleChoice(z, s, float(t), value, loss_identity, None, 0)
    best.loss_shift_only = loss_shift
    best.candidates = count
    return best


# -------------------------------------------------------------------- pass
class OutlierSuppressionPlusPass(ir.passes.InPlacePass):
    """Fold OS+ channel shift and scaling into norms and their linear consumers.

    Args:
        stats: calibration statistics of the untransformed graph, with a reservoir
            sample of every norm output to migrate (``calibrate(..., sample_rows=N)``).
        shift: migrate the channel centres (LayerNorm sites only).
        scale: search the outlier threshold ``t`` and scale channels.
        bits, symmetric: activation quantization simulated by the search (symmetric
            int8 for TensorRT, asymmetric uint8 for onnxruntime CPU).
        num_candidates: grid points for ``t``.
        max_rows: sample rows used by the search.
        min_ratio: smallest ``t`` as a fraction of the site's ``max|X − z|``.
    """

    def __init__(
        self,
        *,
        stats: Stats,
        shift: bool = True,
        scale: bool = True,
        bits: int = 8,
        symmetric: bool = True,
        num_candidates: int = 60,
        max_rows: int = 1024,
        min_ratio: float = 0.01,
    ) -> None:
        super().__init__()
        self.stats = stats
        self.shift = shift
        self.scale = scale
        self.bits = bits
        self.symmetric = symmetric
        self.num_candidates = num_candidates
        self.max_rows = max_rows
        self.min_ratio = min_ratio

    def call(self, model: ir.Model) -> ChannelFoldResult:
        result = ChannelFoldResult(model, False)
        if not (self.shift or self.scale):
            return result
        for site in find_norm_sites(model.graph):
            info = {"module": site.module, "method": "os+", "tensor": site.output.name}
            reason = self._site(site, info)
            if reason:
                info["reason"] = reason
                result.skipped.append(info)
                logger.debug("OS+: skip %s: %s", site.module, reason)
            else:
                result.sites.append(info)
                result.modified = True
                logger.info("OS+: %s t=%.4g, %d channels scaled (max s %.3g)", site.module,
                            info["t"], info["scaled_channels"], info["max_s"])
        return result

    def _site(self, site: NormSite, info: dict) -> str | None:
        name = site.output.name
        if is_folded(site.norm) or any(is_folded(u.matmul) for u in site.linears):
            return "already folded"
        if name not in self.stats:
            return "no statistics"
        obs = self.stats[name]
        sample = obs.sample
        if sample is None or len(sample) == 0:
            return "no reservoir sample (calibrate with sample_rows)"
        channels = sample.shape[1]
        expected = const_array(site.linears[0].weight).shape[0]
        if channels != expected:
            return f"statistics have {channels} channel(s), the linears read {expected}"
        shift = self.shift and site.kind == "layernorm"
        z0 = np.ones(channels) if shift else None
        reason = check_norm(site.norm, z0, np.ones(channels))
        for unit in site.linears:
            reason = reason or check_linear(unit, z0, np.ones(channels))
        reason = reason or check_restore(site.output, site.others)
        if reason:
            return reason
        weights = [const_array(u.weight) for u in site.linears]
        biases = [const_array(u.bias) if u.bias is not None else None for u in site.linears]
        choice = search_shift_scale(
            sample, weights, biases=biases, ch_min=obs.ch_min, ch_max=obs.ch_max,
            shift=shift, scale=self.scale, bits=self.bits, symmetric=self.symmetric,
            num_candidates=self.num_candidates, min_ratio=self.min_ratio,
            max_rows=self.max_rows,
        )
        info.update(_summary(obs.ch_min, obs.ch_max, choice.z, choice.s))
        info.update(
            t=choice.t, loss_before=choice.loss_identity, loss_shift_only=choice.loss_shift_only,
            loss_after=choice.loss, candidates=choice.candidates,
            linears=[u.module for u in site.linears], restored=[n.name for n in site.others],
        )
        if choice.is_identity:
            return "no migration beats the unmodified tensor on the sample"
        return fold_site(site.norm, site.linears, site.others,
                         choice.z if shift else None, choice.s, pass_name=PASS_TAG)


def _summary(cmin: np.ndarray, cmax: np.ndarray, z: np.ndarray, s: np.ndarray) -> dict:
    """Channel statistics before and after ``(X − z)/s`` for the site report."""
    cmin = np.asarray(cmin, np.float64)
    cmax = np.asarray(cmax, np.float64)
    rng_before = cmax - cmin
    rng_after = rng_before / s
    lo, hi = (cmin - z) / s, (cmax - z) / s
    med_b = float(np.median(rng_before)) or 1e-30
    med_a = float(np.median(rng_after)) or 1e-30
    return {
        "max_abs_z": float(np.max(np.abs(z))) if z.size else 0.0,
        "max_s": float(np.max(s)),
        "scaled_channels": int(np.sum(s != 1.0)),
        "max_channel_before": float(max(np.max(np.abs(cmin)), np.max(np.abs(cmax)))),
        "max_channel_after": float(max(np.max(np.abs(lo)), np.max(np.abs(hi)))),
        "range_ratio_before": float(np.max(rng_before)) / med_b,
        "range_ratio_after": float(np.max(rng_after)) / med_a,
    }
