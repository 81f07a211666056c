"""Explicit OS+-style channel migration for linear inputs without a foldable producer.

The FFN down-projection of BERT reads ``X = GELU(fc1(h))``, whose structured outlier
channels no normalisation can absorb.  For such a linear ``y = X W + b`` this pass
inserts, right before it and only on its input::

    X̃ = X ⊙ (1/s) + (−z/s)          (Mul, then Add; no Add when z = 0)

and folds the inverse into the linear as in :func:`onnxq.passes.channel_fold.fold_into_linear`:
``b' = b + z W`` (original ``W``), ``W' = W ⊙ s[:, None]``, so ``X̃ W' + b' = X W + b``.
Other readers of ``X`` keep the original tensor.  Linears that share one input
(selected together) share one ``Mul``/``Add`` and are scored jointly.

``z`` and ``s`` come from the same OS+ search as
:class:`~onnxq.passes.outlier_suppression_plus.OutlierSuppressionPlusPass`
(:func:`~onnxq.passes.outlier_suppression_plus.search_shift_scale`).  Since the
``Mul``/``Add`` cost run time, a site is rewritten only when both

* the activation has an outlier channel: ``max_j max|X_j| / median_j max|X_j| ≥
  min_outlier_ratio`` (per-channel absolute maxima over the calibration set), and
* the search lowers the simulated W8A8 loss against no migration by at least
  ``min_gain`` (relative).

The channel-based ratio is used rather than ``max|x| / percentile_99.9(|x|)`` of all
values: with one outlier channel among ``C ≤ 1000`` channels, that channel alone
holds more than 0.1 % of the values, so the percentile lands inside it and the
ratio stays near 1 exactly when the outlier is worst (tiny random BERT from
:func:`onnxq.zoo.tiny_bert_onnx`, FFN width 128, GELU outputs: max/p99.9 = 1.05 and
1.02, channel max/median = 82 and 70).

Selection: linears whose input is produced by an op in ``producers`` (default
``Gelu``, ``Relu``, ``Mul``, ``Sigmoid``, ``Tanh``, ``Erf``: FFN inputs), skipping
linears already marked ``onnxq.folded``.  Statistics of the untransformed graph
with a reservoir sample are required; recalibrate afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

import numpy as np
import onnx_ir as ir

from onnxq.calibration.stats import Stats
from onnxq.passes._patterns import LinearUnit, const_array, find_linears
from onnxq.passes.channel_fold import (
    ChannelFoldResult,
    check_linear,
    insert_explicit_transform,
    is_folded,
)
from onnxq.passes.outlier_suppression_plus import search_shift_scale

__all__ = ["DEFAULT_PRODUCERS", "ExplicitChannelScalingPass", "channel_outlier_ratio"]

logger = logging.getLogger(__name__)

PASS_TAG = "ExplicitChannelScalingPass"

DEFAULT_PRODUCERS: tuple[str, ...] = ("Gelu", "Relu", "Mul", "Sigmoid", "Tanh", "Erf")


def channel_outlier_ratio(ch_absmax: np.ndarray) -> float:
    """``max_j a_j / median_j a_j`` of per-channel absolute maxima (inf if the median is 0)."""
    a = np.asarray(ch_absmax, np.float64).reshape(-1)
    if a.size == 0:
        return 0.0
    med = float(np.median(a))
    top = float(a.max())
    return top / med if med > 0 else (float("inf") if top > 0 else 0.0)


class ExplicitChannelScalingPass(ir.passes.InPlacePass):
    """Insert ``Mul(1/s)`` + ``Add(−z/s)`` before selected linears and fold ``z, s`` into them.

    Args:
        stats: statistics of the untransformed graph with reservoir samples.
        shift: migrate channel centres too (else ``z = 0`` and only a ``Mul`` is added).
        bits, symmetric: activation quantization simulated by the search.
        producers: op types whose outputs mark a linear input as a site.
        min_outlier_ratio: required ``max/median`` of the per-channel absolute maxima.
        min_gain: required relative loss reduction against no migration.
        num_candidates, min_ratio, max_rows: passed to the OS+ search.
    """

    def __init__(
        self,
        *,
        stats: Stats,
        shift: bool = True,
        bits: int = 8,
        symmetric: bool = True,
        producers: Collection[str] = DEFAULT_PRODUCERS,
        min_outlier_ratio: float = 4.0,
        min_gain: float = 0.1,
        num_candidates: int = 60,
        min_ratio: float = 0.01,
        max_rows: int = 1024,
    ) -> None:
        super().__init__()
        self.stats = stats
        self.shift = shift
        self.bits = bits
        self.symmetric = symmetric
        self.producers = frozenset(producers)
        self.min_outlier_ratio = min_outlier_ratio
        self.min_gain = min_gain
        self.num_candidates = num_candidates
        self.min_ratio = min_ratio
        self.max_rows = max_rows

    def call(self, model: ir.Model) -> ChannelFoldResult:
        result = ChannelFoldResult(model, False)
        groups: dict[int, list[LinearUnit]] = {}
        for unit in find_linears(model.graph):
            producer = unit.input.producer()
            if producer is None or producer.op_type not in self.producers:
                continue
            groups.setdefault(id(unit.input), []).append(unit)
        for units in groups.values():
            value = units[0].input
            info = {"module": ",".join(u.module for u in units), "method": "explicit-os+",
                    "tensor": value.name}
            reason = self._site(value, units, info)
            if reason:
                info["reason"] = reason
                result.skipped.append(info)
            else:
                result.sites.append(info)
                result.modified = True
                logger.info("explicit scaling: %s t=%.4g gain %.0f%%", info["module"],
                            info["t"], 100 * info["gain"])
        return result

    def _site(self, value: ir.Value, units: list[LinearUnit], info: dict) -> str | None:
        if any(is_folded(u.matmul) for u in units):
            return "already folded"
        if value.name not in self.stats:
            return "no statistics"
        obs = self.stats[value.name]
        sample = obs.sample
        if sample is None or len(sample) == 0:
            return "no reservoir sample (calibrate with sample_rows)"
        channels = sample.shape[1]
        expected = const_array(units[0].weight).shape[0]
        if channels != expected:
            return f"statistics have {channels} channel(s), the linears read {expected}"
        for unit in units:
            reason = check_linear(unit, np.ones(channels) if self.shift else None,
                                  np.ones(channels))
            if reason:
                return reason
        ratio = channel_outlier_ratio(obs.ch_absmax)
        info["outlier_ratio"] = ratio
        if ratio < self.min_outlier_ratio:
            return f"outlier ratio {ratio:.2f} below {self.min_outlier_ratio}"
        choice = search_shift_scale(
            sample, [const_array(u.weight) for u in units],
            biases=[const_array(u.bias) if u.bias is not None else None for u in units],
            ch_min=obs.ch_min, ch_max=obs.ch_max, shift=self.shift, scale=True,
            bits=self.bits, symmetric=self.symmetric, num_candidates=self.num_candidates,
            min_ratio=self.min_ratio, max_rows=self.max_rows,
        )
        s = choice.s
        lo, hi = (obs.ch_min - choice.z) / s, (obs.ch_max - choice.z) / s
        info.update(
            t=choice.t, gain=choice.gain, loss_before=choice.loss_identity,
            loss_after=choice.loss, max_s=float(s.max()), scaled_channels=int(np.sum(s != 1)),
            max_abs_z=float(np.max(np.abs(choice.z))),
            max_channel_before=float(np.max(obs.ch_absmax)),
            max_channel_after=float(max(np.max(np.abs(lo)), np.max(np.abs(hi)))),
        )
        if choice.is_identity or choice.gain < self.min_gain:
            return f"loss gain {choice.gain:.1%} below {self.min_gain:.0%}"
        z = choice.z if np.any(choice.z) else None
        return insert_explicit_transform(value, units, z, s, pass_name=PASS_TAG)
