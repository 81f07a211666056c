"""Streaming activation observers and range estimators (pure numpy).

An observer summarises every value an activation tensor took during
calibration in fixed-size arrays, so memory never depends on how many batches
were seen.  Raw activations are never stored (except the optional, bounded
reservoir sample described below).

Layout
    A tensor ``x`` is viewed as a matrix of shape ``(N, C)``: the last axis is
    the channel axis and every other axis is flattened into rows (tokens).  A
    0-d or 1-d tensor is a single channel, ``(size, 1)``.  An optional row mask
    drops rows (padding tokens) before anything is recorded.

Running reductions
    Global ``min``/``max`` and per-channel ``ch_min``/``ch_max``/``ch_absmax``
    are exact.  Moments are kept as *shifted* power sums
    ``S_p = sum (x - K)^p`` for ``p = 1..4`` in float64, where the shift ``K``
    is the mean of the first batch (per channel: the first batch's channel
    mean).  Shifting avoids the catastrophic cancellation of raw power sums
    when ``|mean| >> std``.  With ``n`` values and ``m = S_1 / n``::

        mean      = K + m
        mu_2      = S_2/n - m^2
        mu_3      = S_3/n - 3 m S_2/n + 2 m^3
        mu_4      = S_4/n - 4 m S_3/n + 6 m^2 S_2/n - 3 m^4
        kurtosis  = mu_4 / mu_2^2          (Pearson, *not* excess: normal = 3)
        skewness  = mu_3 / mu_2^1.5

    Two power-sum sets with shifts ``K_a`` and ``K_b`` are merged by
    re-expanding about a common shift with the binomial theorem,
    ``sum (y + d)^p = sum_j C(p, j) d^(p-j) S_j`` with ``d = K_b - K_a``.

Histogram with range growth
    A signed histogram of ``bins`` equal bins over ``[-R, R]``, where ``R`` is
    always a power of two (at least ``2**-24``).  The first batch sets ``R`` to
    ``max|x|`` rounded up to a power of two.  When a later batch exceeds ``R``
    the range is doubled until it covers the batch; each doubling sums adjacent
    bin pairs and centres the ``bins/2`` merged bins in the new histogram.  The
    old edges are exactly the even edges of the new histogram when ``bins`` is
    a multiple of four, so re-binning loses no counts and introduces no
    approximation beyond the coarser resolution.  Counts are int64 and count
    *values* (rows x channels).

Reservoir sample
    With ``sample_rows = k > 0`` the observer keeps a uniform random sample of
    ``k`` rows (Vitter's Algorithm R over rows: the ``i``-th row, 0-based, is
    kept with probability ``k/(i+1)`` and replaces a uniformly chosen slot).
    The random numbers for a batch come from
    ``np.random.default_rng([seed, rows_seen_before_the_batch])``, so the
    sample is a deterministic function of the data and the seed and no
    generator state needs to be saved.  Merging two reservoirs draws the number
    of rows taken from each side from the hypergeometric distribution, which
    keeps the merged sample uniform.

Range estimators
    Every estimator returns ``(lo, hi)`` with ``lo <= 0 <= hi`` (ONNX
    quantization needs zero to be exactly representable):

    * ``minmax``: the observed extremes.
    * ``percentile``: quantiles of the signed histogram, linearly interpolated
      inside a bin, clamped to the observed extremes.
    * ``entropy``: the TensorRT calibration threshold.  The signed histogram is
      folded into a histogram of ``|x|``; for each candidate threshold ``i``
      (in bins) the clipped distribution ``P`` (outliers added to the last
      bin) is compared with ``Q``, the first ``i`` bins merged into
      ``num_quant_bins`` levels and spread back uniformly over the non-empty
      bins; the threshold minimising ``KL(P || Q)`` wins.  Symmetric result.
    * ``mse``: the clipping threshold minimising the expected quantization
      error estimated from the histogram, using the classic
      noise-plus-clipping model: a value inside the grid costs ``s^2/12``
      (uniform rounding noise for step ``s``), a value outside costs its
      squared distance to the nearest grid end (evaluated at the bin centre).

Quantization parameters
    ``qparams`` maps a range to ``(scale, zero_point)`` for int8/uint8 with
    ``x ~ (q - zp) * scale``.  Symmetric int8: ``scale = amax/127, zp = 0``;
    symmetric uint8: ``scale = amax/127, zp = 128``; asymmetric:
    ``scale = (hi - lo)/(qmax - qmin)``, ``zp = round(qmin - lo/scale)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "OBSERVER_METHODS",
    "TensorObserver",
    "compute_range",
    "entropy_range",
    "minmax_range",
    "mse_range",
    "percentile_range",
    "qparams",
]

OBSERVER_METHODS: tuple[str, ...] = ("minmax", "percentile", "entropy", "mse")

#: Smallest histogram half-range; also the range used when all values are zero.
_MIN_RANGE = 2.0**-24
#: Smallest scale returned by :func:`qparams` (guards all-zero tensors).  It is a
#: normal float32, small enough not to clip any real activation range, large
#: enough that ``x / scale`` stays finite for every float32 ``x`` up to ~1e26.
_MIN_SCALE = 1e-12
#: Layout version of :meth:`TensorObserver.to_arrays`.
_ARRAYS_VERSION = 1

_SCALAR_INT_KEYS = ("version", "bins", "sample_rows", "seed", "count")
_SCALAR_FLOAT_KEYS = ("range", "min", "max", "shift")
_CHANNEL_KEYS = ("ch_min", "ch_max", "ch_absmax", "ch_shift", "ch_sum", "ch_sumsq")
_ALL_KEYS = frozenset(
    (*_SCALAR_INT_KEYS, *_SCALAR_FLOAT_KEYS, *_CHANNEL_KEYS, "hist", "moments", "sample")
)


def _pow2_ceil(value: float) -> float:
    """Smallest power of two ``>= value`` (and ``>= _MIN_RANGE``)."""
    if value <= _MIN_RANGE:
        return _MIN_RANGE
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= m < 1
    return math.ldexp(1.0, exponent - 1 if mantissa == 0.5 else exponent)


def _is_pow2(value: float) -> bool:
    return value > 0 and math.isfinite(value) and math.frexp(value)[0] == 0.5


def _double_range(hist: np.ndarray) -> np.ndarray:
    """Re-bin a histogram over ``[-R, R]`` onto ``[-2R, 2R]`` (exact)."""
    bins = hist.shape[0]
    grown = np.zeros_like(hist)
    quarter = bins // 4
    grown[quarter : quarter + bins // 2] = hist.reshape(-1, 2).sum(axis=1)
    return grown


def _shift_power_sums(n: float, sums: np.ndarray, delta: np.ndarray | float) -> np.ndarray:
    """Re-express power sums about ``K`` as power sums about ``K - delta``.

    ``sums[p-1] = sum (x - K)^p``; returns ``sum (x - K + delta)^p`` for the
    same orders, using the binomial expansion (``S_0 = n``).
    """
    order = sums.shape[0]
    full = [np.full_like(np.asarray(sums[0], dtype=np.float64), n, dtype=np.float64)]
    full.extend(np.asarray(s, dtype=np.float64) for s in sums)
    out = []
    for p in range(1, order + 1):
        total = np.zeros_like(full[0])
        for j in range(p + 1):
            total = total + math.comb(p, j) * full[j] * np.power(delta, p - j)
        out.append(total)
    return np.stack(out)


class TensorObserver:
    """Streaming, bounded-memory statistics of one activation tensor.

    Args:
        bins: Number of bins of the signed histogram; a positive multiple of 4
            (needed for exact re-binning when the range doubles).
        sample_rows: Capacity of the reservoir sample of rows (0 disables it).
        seed: Non-negative seed of the reservoir sampling.

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(self, *, bins: int = 2048, sample_rows: int = 0, seed: int = 0) -> None:
        bins = int(bins)
        if bins < 4 or bins % 4:
            raise ValueError(f"bins must be a positive multiple of 4, got {bins}")
        if int(sample_rows) < 0:
            raise ValueError(f"sample_rows must be >= 0, got {sample_rows}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self._bins = bins
        self._sample_rows = int(sample_rows)
        self._seed = int(seed)
        self._count = 0
        self._channels = 0
        self._range = 0.0
        self._hist = np.zeros(bins, dtype=np.int64)
        self._min = 0.0
        self._max = 0.0
        self._shift = 0.0
        self._moments = np.zeros(4, dtype=np.float64)
        empty = np.zeros(0, dtype=np.float64)
        self._ch_min = empty
        self._ch_max = empty
        self._ch_absmax = empty
        self._ch_shift = empty
        self._ch_sum = empty
        self._ch_sumsq = empty
        self._sample: np.ndarray | None = None
        self._sample_n = 0

    # ------------------------------------------------------------------ update
    def update(self, x: np.ndarray, row_mask: np.ndarray | None = None) -> None:
        """Add one batch of activations.

        Args:
            x: Real-valued array; the last axis is the channel axis.
            row_mask: Optional boolean (or 0/1 integer) array with one entry per
                row (``x.size // channels`` entries, any shape).  Rows whose
                entry is False/0 are ignored.

        Raises:
            TypeError: If ``x`` is not real-valued or the mask is not boolean/integer.
            ValueError: If the channel count changes, the mask has the wrong
                size, or a kept value is NaN or Inf.
        """
        a = np.asarray(x)
        if a.dtype.kind not in "fiub":
            raise TypeError(f"observer expects a real-valued array, got dtype {a.dtype}")
        channels = int(a.shape[-1]) if a.ndim >= 2 else 1
        if a.size == 0:
            return
        rows = a.reshape(-1, channels)
        if row_mask is not None:
            mask = np.asarray(row_mask).reshape(-1)
            if mask.size != rows.shape[0]:
                raise ValueError(
                    f"row_mask has {mask.size} entries but the tensor has {rows.shape[0]} rows"
                )
            if mask.dtype.kind in "iu":
                mask = mask != 0
            elif mask.dtype.kind != "b":
                raise TypeError(f"row_mask must be boolean or integer, got dtype {mask.dtype}")
            rows = rows[mask]
        if rows.shape[0] == 0:
            return
        if self._channels and channels != self._channels:
            raise ValueError(
                f"channel count changed from {self._channels} to {channels} "
                "(the last axis is the channel axis)"
            )
        v = rows.astype(np.float64, copy=False)
        # Extremes first: min/max propagate NaN and show Inf, so they double as the
        # finiteness check without another pass over the batch.
        col_min = v.min(axis=0)
        col_max = v.max(axis=0)
        bmin, bmax = float(col_min.min()), float(col_max.max())
        if not (math.isfinite(bmin) and math.isfinite(bmax)):
            bad = int(v.size - np.count_nonzero(np.isfinite(v)))
            raise ValueError(f"tensor contains NaN or Inf values ({bad} of {v.size})")

        first = self._count == 0
        n_before = self._count
        if first:
            self._init_channels(channels)
            self._shift = float(v.mean())
            self._ch_shift = v.mean(axis=0)

        # Running extremes.
        if first:
            self._min, self._max = bmin, bmax
            self._ch_min, self._ch_max = col_min.copy(), col_max.copy()
        else:
            self._min, self._max = min(self._min, bmin), max(self._max, bmax)
            np.minimum(self._ch_min, col_min, out=self._ch_min)
            np.maximum(self._ch_max, col_max, out=self._ch_max)
        np.maximum(self._ch_absmax, np.maximum(-col_min, col_max), out=self._ch_absmax)

        # Shifted moments.
        y = (v - self._shift).reshape(-1)
        y2 = y * y
        # einsum: one pass per product, no temporaries, no threading (deterministic).
        self._moments += (y.sum(), y2.sum(), np.einsum("i,i->", y2, y),
                          np.einsum("i,i->", y2, y2))
        yc = v - self._ch_shift
        self._ch_sum += yc.sum(axis=0)
        self._ch_sumsq += np.einsum("ij,ij->j", yc, yc)

        # Histogram.
        batch_absmax = max(-bmin, bmax)
        if first:
            self._range = _pow2_ceil(batch_absmax)
        else:
            self._grow_to(batch_absmax)
        self._hist += self._bin_counts(v.reshape(-1))

        self._count += rows.shape[0]
        if self._sample_rows:
            self._reservoir_add(rows, n_before)

    def _init_channels(self, channels: int) -> None:
        self._channels = channels
        self._ch_min = np.zeros(channels, dtype=np.float64)
        self._ch_max = np.zeros(channels, dtype=np.float64)
        self._ch_absmax = np.zeros(channels, dtype=np.float64)
        self._ch_sum = np.zeros(channels, dtype=np.float64)
        self._ch_sumsq = np.zeros(channels, dtype=np.float64)
        self._ch_shift = np.zeros(channels, dtype=np.float64)

    def _grow_to(self, absmax: float) -> None:
        while absmax > self._range:
            self._hist = _double_range(self._hist)
            self._range *= 2.0

    def _bin_counts(self, values: np.ndarray) -> np.ndarray:
        scale = self._bins / (2.0 * self._range)
        pos = values + self._range
        pos *= scale
        np.floor(pos, out=pos)
        np.clip(pos, 0, self._bins - 1, out=pos)
        idx = pos.astype(np.intp)
        return np.bincount(idx, minlength=self._bins).astype(np.int64, copy=False)

    def _reservoir_add(self, rows: np.ndarray, n_before: int) -> None:
        cap = self._sample_rows
        if self._sample is None:
            self._sample = np.zeros((cap, self._channels), dtype=np.float32)
        m = rows.shape[0]
        fill = max(0, min(m, cap - n_before))
        if fill:
            self._sample[n_before : n_before + fill] = rows[:fill]
            self._sample_n = n_before + fill
        if fill == m:
            return
        rng = np.random.default_rng([self._seed, n_before])
        global_index = np.arange(n_before + fill, n_before + m, dtype=np.int64)
        slots = rng.integers(0, global_index + 1)
        keep = slots < cap
        if not keep.any():
            return
        slots = slots[keep]
        source = np.flatnonzero(keep) + fill
        # Later rows overwrite earlier ones that drew the same slot (sequential semantics).
        rev_slots = slots[::-1]
        unique_slots, first_in_rev = np.unique(rev_slots, return_index=True)
        self._sample[unique_slots] = rows[source[::-1][first_in_rev]]

    # ------------------------------------------------------------------- merge
    def merge(self, other: TensorObserver) -> None:
        """Fold another observer's statistics into this one.

        The result describes the union of both observers' data.  Histograms are
        brought to the larger of the two ranges first (exact re-binning).

        Args:
            other: Observer with the same ``bins`` and ``sample_rows``.

        Raises:
            ValueError: If the configurations or channel counts differ.
        """
        if not isinstance(other, TensorObserver):
            raise TypeError(f"can only merge a TensorObserver, got {type(other).__name__}")
        if other._bins != self._bins:
            raise ValueError(f"cannot merge observers with {self._bins} and {other._bins} bins")
        if other._sample_rows != self._sample_rows:
            raise ValueError(
                f"cannot merge observers with sample_rows {self._sample_rows} "
                f"and {other._sample_rows}"
            )
        if other._count == 0:
            return
        if self._count == 0:
            state = other.to_arrays()
            state["seed"] = np.asarray(self._seed, dtype=np.int64)
            self._load_state(state)
            return
        if other._channels != self._channels:
            raise ValueError(
                f"cannot merge observers with {self._channels} and {other._channels} channels"
            )
        na, nb = self._count, other._count
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)
        np.minimum(self._ch_min, other._ch_min, out=self._ch_min)
        np.maximum(self._ch_max, other._ch_max, out=self._ch_max)
        np.maximum(self._ch_absmax, other._ch_absmax, out=self._ch_absmax)

        c = self._channels
        moved = _shift_power_sums(nb * c, other._moments, other._shift - self._shift)
        self._moments = self._moments + moved
        ch_moved = _shift_power_sums(
            float(nb), np.stack([other._ch_sum, other._ch_sumsq]), other._ch_shift - self._ch_shift
        )
        self._ch_sum = self._ch_sum + ch_moved[0]
        self._ch_sumsq = self._ch_sumsq + ch_moved[1]

        hist_other = other._hist.copy()
        range_other = other._range
        while range_other < self._range:
            hist_other = _double_range(hist_other)
            range_other *= 2.0
        self._grow_to(range_other)
        self._hist = self._hist + hist_other

        if self._sample_rows:
            self._merge_reservoir(other, na, nb)
        self._count = na + nb

    def _merge_reservoir(self, other: TensorObserver, na: int, nb: int) -> None:
        cap = self._sample_rows
        sa = self.sample if self.sample is not None else np.zeros((0, self._channels), np.float32)
        sb = other.sample if other.sample is not None else np.zeros((0, self._channels), np.float32)
        if na + nb <= cap:
            merged = np.concatenate([sa, sb])
        else:
            rng = np.random.default_rng([self._seed, na, nb, 1])
            if na < 10**9 and nb < 10**9:
                take_a = int(rng.hypergeometric(na, nb, cap))
            else:  # numpy's hypergeometric limit; the binomial is an excellent approximation here
                take_a = int(rng.binomial(cap, na / (na + nb)))
            take_a = min(max(take_a, cap - len(sb)), len(sa))
            pick_a = rng.choice(len(sa), size=take_a, replace=False)
            pick_b = rng.choice(len(sb), size=cap - take_a, replace=False)
            merged = np.concatenate([sa[np.sort(pick_a)], sb[np.sort(pick_b)]])
        self._sample = np.zeros((cap, self._channels), dtype=np.float32)
        self._sample[: len(merged)] = merged
        self._sample_n = len(merged)

    # ------------------------------------------------------------ persistence
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to restore the observer, as numpy arrays.

        Returns:
            A dict of arrays (scalars are 0-d arrays); pass it to
            :meth:`from_arrays` to rebuild an equal observer.
        """
        sample = self.sample
        if sample is None:
            sample = np.zeros((0, self._channels), dtype=np.float32)
        return {
            "version": np.asarray(_ARRAYS_VERSION, dtype=np.int64),
            "bins": np.asarray(self._bins, dtype=np.int64),
            "sample_rows": np.asarray(self._sample_rows, dtype=np.int64),
            "seed": np.asarray(self._seed, dtype=np.int64),
            "count": np.asarray(self._count, dtype=np.int64),
            "range": np.asarray(self._range, dtype=np.float64),
            "min": np.asarray(self._min, dtype=np.float64),
            "max": np.asarray(self._max, dtype=np.float64),
            "shift": np.asarray(self._shift, dtype=np.float64),
            "moments": self._moments.copy(),
            "hist": self._hist.copy(),
            "ch_min": self._ch_min.copy(),
            "ch_max": self._ch_max.copy(),
            "ch_absmax": self._ch_absmax.copy(),
            "ch_shift": self._ch_shift.copy(),
            "ch_sum": self._ch_sum.copy(),
            "ch_sumsq": self._ch_sumsq.copy(),
            "sample": np.array(sample, dtype=np.float32, copy=True),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TensorObserver:
        """Rebuild an observer from :meth:`to_arrays` output.

        Args:
            arrays: Mapping of field name to array.

        Returns:
            The restored observer.

        Raises:
            ValueError: If keys are missing or unexpected, or shapes, dtypes or
                values are inconsistent.
        """
        state = _validate_arrays(arrays)
        obs = cls(
            bins=int(state["bins"]), sample_rows=int(state["sample_rows"]), seed=int(state["seed"])
        )
        obs._load_state(state)
        return obs

    def _load_state(self, state: Mapping[str, np.ndarray]) -> None:
        self._count = int(state["count"])
        self._seed = int(state["seed"])
        self._range = float(state["range"])
        self._min = float(state["min"])
        self._max = float(state["max"])
        self._shift = float(state["shift"])
        self._moments = np.array(state["moments"], dtype=np.float64)
        self._hist = np.array(state["hist"], dtype=np.int64)
        self._channels = int(np.asarray(state["ch_min"]).shape[0])
        for key in _CHANNEL_KEYS:
            setattr(self, "_" + key, np.array(state[key], dtype=np.float64))
        sample = np.asarray(state["sample"], dtype=np.float32)
        self._sample_n = int(sample.shape[0])
        if self._sample_rows and self._count:
            self._sample = np.zeros((self._sample_rows, self._channels), dtype=np.float32)
            self._sample[: self._sample_n] = sample
        else:
            self._sample = None

    # ------------------------------------------------------------- properties
    @property
    def bins(self) -> int:
        """Number of histogram bins."""
        return self._bins

    @property
    def sample_rows(self) -> int:
        """Capacity of the reservoir sample (0: disabled)."""
        return self._sample_rows

    @property
    def count(self) -> int:
        """Number of rows observed (after masking)."""
        return self._count

    @property
    def channels(self) -> int:
        """Number of channels (0 before the first update)."""
        return self._channels

    @property
    def min(self) -> float:
        """Smallest value observed."""
        self._require_data()
        return self._min

    @property
    def max(self) -> float:
        """Largest value observed."""
        self._require_data()
        return self._max

    @property
    def absmax(self) -> float:
        """Largest absolute value observed."""
        self._require_data()
        return max(-self._min, self._max)

    @property
    def ch_min(self) -> np.ndarray:
        """Per-channel minimum, shape ``(C,)``."""
        return self._ch_min.copy()

    @property
    def ch_max(self) -> np.ndarray:
        """Per-channel maximum, shape ``(C,)``."""
        return self._ch_max.copy()

    @property
    def ch_absmax(self) -> np.ndarray:
        """Per-channel maximum absolute value, shape ``(C,)``."""
        return self._ch_absmax.copy()

    @property
    def ch_mean(self) -> np.ndarray:
        """Per-channel mean, shape ``(C,)``."""
        self._require_data()
        return self._ch_shift + self._ch_sum / self._count

    @property
    def ch_std(self) -> np.ndarray:
        """Per-channel population standard deviation, shape ``(C,)``."""
        self._require_data()
        m = self._ch_sum / self._count
        return np.sqrt(np.maximum(self._ch_sumsq / self._count - m * m, 0.0))

    @property
    def ch_sum(self) -> np.ndarray:
        """Per-channel sum of the values, shape ``(C,)``."""
        return self._ch_sum + self._count * self._ch_shift

    @property
    def ch_sumsq(self) -> np.ndarray:
        """Per-channel sum of squared values, shape ``(C,)``."""
        k = self._ch_shift
        return self._ch_sumsq + 2.0 * k * self._ch_sum + self._count * k * k

    @property
    def range(self) -> float:
        """Half-range ``R`` of the histogram (0 before the first update)."""
        return self._range

    @property
    def hist(self) -> np.ndarray:
        """Signed histogram counts (int64, ``bins`` entries) over ``[-R, R]``."""
        return self._hist.copy()

    def hist_edges(self) -> np.ndarray:
        """Bin edges of :attr:`hist`, ``np.linspace(-R, R, bins + 1)``."""
        return np.linspace(-self._range, self._range, self._bins + 1)

    @property
    def sample(self) -> np.ndarray | None:
        """Reservoir sample of rows, shape ``(min(count, sample_rows), C)``, or None."""
        if self._sample is None:
            return None
        return self._sample[: self._sample_n]

    @property
    def mean(self) -> float:
        """Mean over all observed values."""
        self._require_data()
        return self._shift + float(self._moments[0]) / self._num_values()

    @property
    def std(self) -> float:
        """Population standard deviation over all observed values."""
        return math.sqrt(max(self._central_moments()[0], 0.0))

    def kurtosis(self) -> float:
        """Pearson (plain, not excess) kurtosis ``E[(x-mu)^4] / sigma^4``.

        A normal distribution gives 3.  Returns NaN for constant data.
        """
        mu2, _, mu4 = self._central_moments()
        if mu2 <= 0.0:
            return float("nan")
        return mu4 / (mu2 * mu2)

    def skewness(self) -> float:
        """Skewness ``E[(x-mu)^3] / sigma^3``; NaN for constant data."""
        mu2, mu3, _ = self._central_moments()
        if mu2 <= 0.0:
            return float("nan")
        return mu3 / mu2**1.5

    def quantile_abs(self, q: float) -> float:
        """Quantile of ``|x|`` from the histogram (linear inside a bin).

        Args:
            q: Probability in ``[0, 1]``.

        Returns:
            The estimated ``q``-quantile of the absolute values, at most :attr:`absmax`.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        self._require_data()
        counts = self._abs_hist()
        edges = np.linspace(0.0, self._range, counts.shape[0] + 1)
        return float(min(_hist_quantile(counts, edges, q), self.absmax))

    # ---------------------------------------------------------------- helpers
    def _require_data(self) -> None:
        if self._count == 0:
            raise ValueError("observer has seen no data")

    def _num_values(self) -> int:
        return self._count * self._channels

    def _central_moments(self) -> tuple[float, float, float]:
        self._require_data()
        n = float(self._num_values())
        s1, s2, s3, s4 = (float(s) / n for s in self._moments)
        m = s1
        mu2 = s2 - m * m
        mu3 = s3 - 3 * m * s2 + 2 * m**3
        mu4 = s4 - 4 * m * s3 + 6 * m * m * s2 - 3 * m**4
        return mu2, mu3, mu4

    def _abs_hist(self) -> np.ndarray:
        half = self._bins // 2
        return self._hist[half:] + self._hist[:half][::-1]

    def __repr__(self) -> str:
        if self._count == 0:
            return f"TensorObserver(bins={self._bins}, empty)"
        return (
            f"TensorObserver(rows={self._count}, channels={self._channels}, "
            f"min={self._min:.6g}, max={self._max:.6g}, range={self._range:.6g})"
        )


def _validate_arrays(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    keys = set(arrays)
    missing = sorted(_ALL_KEYS - keys)
    extra = sorted(keys - _ALL_KEYS)
    if missing:
        raise ValueError(f"observer arrays are missing keys: {', '.join(missing)}")
    if extra:
        raise ValueError(f"observer arrays have unexpected keys: {', '.join(extra)}")
    state = {k: np.asarray(v) for k, v in arrays.items()}
    for key in (*_SCALAR_INT_KEYS, *_SCALAR_FLOAT_KEYS):
        if state[key].shape != ():
            raise ValueError(f"observer field {key!r} must be a scalar, got shape {state[key].shape}")
    for key in _SCALAR_INT_KEYS:
        if state[key].dtype.kind not in "iu":
            raise ValueError(f"observer field {key!r} must be an integer, got {state[key].dtype}")
    for key, arr in state.items():
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"observer field {key!r} has non-numeric dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"observer field {key!r} contains NaN or Inf")
    if int(state["version"]) != _ARRAYS_VERSION:
        raise ValueError(f"observer arrays have layout version {int(state['version'])}")
    bins, count = int(state["bins"]), int(state["count"])
    sample_rows = int(state["sample_rows"])
    if bins < 4 or bins % 4:
        raise ValueError(f"observer field 'bins' must be a positive multiple of 4, got {bins}")
    if count < 0 or sample_rows < 0 or int(state["seed"]) < 0:
        raise ValueError("observer fields 'count', 'sample_rows' and 'seed' must be >= 0")
    if state["hist"].shape != (bins,) or state["hist"].dtype.kind not in "iu":
        raise ValueError(f"observer field 'hist' must be {bins} integers, got {state['hist'].shape}")
    if (state["hist"] < 0).any():
        raise ValueError("observer field 'hist' has negative counts")
    if state["moments"].shape != (4,):
        raise ValueError(f"observer field 'moments' must have shape (4,), got {state['moments'].shape}")
    channels = state["ch_min"].shape
    if len(channels) != 1:
        raise ValueError(f"observer field 'ch_min' must be 1-d, got shape {channels}")
    for key in _CHANNEL_KEYS:
        if state[key].shape != channels:
            raise ValueError(
                f"observer field {key!r} has shape {state[key].shape}, expected {channels}"
            )
    c = channels[0]
    expected_sample = (min(count, sample_rows), c)
    if state["sample"].shape != expected_sample and not (
        expected_sample[0] == 0 and state["sample"].ndim == 2 and state["sample"].shape[0] == 0
    ):
        raise ValueError(
            f"observer field 'sample' has shape {state['sample'].shape}, expected {expected_sample}"
        )
    if count:
        if c == 0:
            raise ValueError("observer has data but zero channels")
        if not _is_pow2(float(state["range"])):
            raise ValueError(f"observer field 'range' must be a power of two, got {float(state['range'])}")
        if int(state["hist"].sum()) != count * c:
            raise ValueError(
                f"observer histogram holds {int(state['hist'].sum())} values, expected {count * c}"
            )
        if float(state["min"]) > float(state["max"]) or (state["ch_min"] > state["ch_max"]).any():
            raise ValueError("observer minimum exceeds maximum")
        if max(-float(state["min"]), float(state["max"])) > float(state["range"]):
            raise ValueError("observer extremes lie outside the histogram range")
    elif int(state["hist"].sum()) != 0 or c != 0:
        raise ValueError("observer with count 0 must have an empty histogram and no channels")
    return state


def _hist_quantile(counts: np.ndarray, edges: np.ndarray, q: float) -> float:
    """``q``-quantile of a histogram, linear inside the bin holding it."""
    total = float(counts.sum())
    nonzero = np.flatnonzero(counts)
    if total <= 0 or nonzero.size == 0:
        return 0.0
    target = q * total
    if target <= 0.0:
        return float(edges[nonzero[0]])
    if target >= total:
        return float(edges[nonzero[-1] + 1])
    cum = np.concatenate([[0.0], np.cumsum(counts, dtype=np.float64)])
    k = int(np.searchsorted(cum, target, side="right")) - 1
    k = min(max(k, 0), counts.shape[0] - 1)
    frac = (target - cum[k]) / counts[k] if counts[k] > 0 else 0.0
    return float(edges[k] + frac * (edges[k + 1] - edges[k]))


def _with_zero(lo: float, hi: float) -> tuple[float, float]:
    return float(min(lo, 0.0)), float(max(hi, 0.0))


def minmax_range(obs: TensorObserver) -> tuple[float, float]:
    """Observed minimum and maximum, widened to include zero.

    Args:
        obs: Observer with data.

    Returns:
        ``(lo, hi)`` with ``lo <= 0 <= hi``.
    """
    return _with_zero(obs.min, obs.max)


def percentile_range(obs: TensorObserver, percentile: float = 99.999) -> tuple[float, float]:
    """Range between the ``100 - p`` and ``p`` percentiles of the signed histogram.

    Args:
        obs: Observer with data.
        percentile: ``p`` in ``[50, 100]``.

    Returns:
        ``(lo, hi)`` clamped to the observed extremes, with ``lo <= 0 <= hi``.
    """
    if not 50.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be in [50, 100], got {percentile}")
    obs._require_data()
    edges = obs.hist_edges()
    counts = obs._hist
    lo = _hist_quantile(counts, edges, (100.0 - percentile) / 100.0)
    hi = _hist_quantile(counts, edges, percentile / 100.0)
    lo = min(max(lo, obs.min), obs.max)
    hi = min(max(hi, obs.min), obs.max)
    return _with_zero(lo, hi)


def _kl_threshold_bins(hist: np.ndarray, num_quant_bins: int) -> int | None:
    """TensorRT threshold search; returns the number of kept bins or None."""
    last = int(np.flatnonzero(hist)[-1]) + 1
    if last < num_quant_bins:
        return None
    hist = hist[:last].astype(np.float64)
    suffix = np.concatenate([np.cumsum(hist[::-1])[::-1], [0.0]])  # suffix[i] = sum(hist[i:])
    eps = 1e-4
    best_i, best_kl = None, math.inf
    for i in range(num_quant_bins, last + 1):
        ref = hist[:i]
        p = ref.copy()
        p[-1] += suffix[i]
        nonzero = p > 0
        bounds = np.linspace(0, i, num_quant_bins + 1).astype(np.int64)
        sizes = np.diff(bounds)
        chunk_sum = np.add.reduceat(ref, bounds[:-1])
        chunk_nz = np.add.reduceat(nonzero.astype(np.float64), bounds[:-1])
        per_bin = np.divide(chunk_sum, chunk_nz, out=np.zeros_like(chunk_sum), where=chunk_nz > 0)
        q = np.where(nonzero, np.repeat(per_bin, sizes), 0.0)
        q_total = q.sum()
        if q_total <= 0:
            continue
        p = p / p.sum()
        q = q / q_total
        holes = nonzero & (q == 0)
        if holes.any():  # smooth like TensorRT: give empty Q bins a little mass
            q = np.where(holes, eps, q)
            q = q / q.sum()
        kl = float(np.sum(p[nonzero] * np.log(p[nonzero] / q[nonzero])))
        # Ties (within rounding) go to the larger threshold: clipping less is the safe choice.
        if kl <= best_kl + 1e-12 * max(1.0, abs(best_kl)):
            best_kl, best_i = kl, i
    return best_i


def entropy_range(obs: TensorObserver, *, num_quant_bins: int = 128) -> tuple[float, float]:
    """TensorRT-style KL-divergence threshold on the ``|x|`` histogram.

    Falls back to :func:`minmax_range` when the data is too degenerate for the
    search to mean anything: all zeros, fewer occupied ``|x|`` bins than
    ``max(2, num_quant_bins // 4)`` (constants, one-hot, few discrete
    values), or a histogram with fewer ``|x|`` bins than ``num_quant_bins``.

    Args:
        obs: Observer with data.
        num_quant_bins: Number of quantization levels on one side (128 for int8).

    Returns:
        ``(-T, T)`` with ``0 < T <= absmax``, or the min/max range on fallback.
    """
    if num_quant_bins < 2:
        raise ValueError(f"num_quant_bins must be >= 2, got {num_quant_bins}")
    obs._require_data()
    absmax = obs.absmax
    hist = obs._abs_hist()
    occupied = int(np.count_nonzero(hist))
    if absmax == 0.0 or occupied < max(2, num_quant_bins // 4):
        return minmax_range(obs)
    kept = _kl_threshold_bins(hist, num_quant_bins)
    if kept is None:
        return minmax_range(obs)
    threshold = min(kept * (obs.range / hist.shape[0]), absmax)
    return -float(threshold), float(threshold)


def _expected_mse(
    centres: np.ndarray, counts: np.ndarray, grid_lo: np.ndarray, grid_hi: np.ndarray,
    step: np.ndarray,
) -> np.ndarray:
    """Expected squared error per candidate (rows) under the noise+clipping model."""
    c = centres[None, :]
    below = np.clip(grid_lo[:, None] - c, 0.0, None)
    above = np.clip(c - grid_hi[:, None], 0.0, None)
    clip_err = below * below + above * above
    inside = (below == 0) & (above == 0)
    round_err = np.where(inside, (step[:, None] ** 2) / 12.0, 0.0)
    return ((clip_err + round_err) * counts[None, :]).sum(axis=1)


def mse_range(
    obs: TensorObserver, *, bits: int = 8, symmetric: bool = True, num_candidates: int = 100
) -> tuple[float, float]:
    """Clipping range minimising the expected quantization MSE.

    Candidates are ``k / num_candidates`` (``k = 1..num_candidates``) times
    the full range: ``absmax`` for the symmetric signed grid
    ``[-2^(b-1), 2^(b-1) - 1] * T / (2^(b-1) - 1)``; the min/max range for
    the asymmetric unsigned grid ``[0, 2^b - 1]`` with a zero point.  The error
    of each candidate is estimated from the histogram bin centres (see the
    module docstring).

    Args:
        obs: Observer with data.
        bits: Bit width of the integer grid (2..16).
        symmetric: Symmetric signed grid (returns ``(-T, T)``) or asymmetric.
        num_candidates: Number of candidate ranges.

    Returns:
        ``(lo, hi)`` with ``lo <= 0 <= hi``.
    """
    if not 2 <= bits <= 16:
        raise ValueError(f"bits must be in [2, 16], got {bits}")
    if num_candidates < 1:
        raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
    obs._require_data()
    lo, hi = minmax_range(obs)
    if lo == hi:  # all zeros
        return lo, hi
    edges = obs.hist_edges()
    centres = 0.5 * (edges[:-1] + edges[1:])
    counts = obs._hist.astype(np.float64)
    fractions = np.arange(1, num_candidates + 1, dtype=np.float64) / num_candidates
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        thresholds = fractions * max(-lo, hi)
        step = thresholds / qmax
        err = _expected_mse(centres, counts, -(qmax + 1) * step, qmax * step, step)
        t = float(thresholds[int(np.argmin(err))])
        return -t, t
    levels = 2**bits - 1
    cand_lo, cand_hi = fractions * lo, fractions * hi
    step = (cand_hi - cand_lo) / levels
    zp = np.clip(np.rint(-cand_lo / step), 0, levels)
    err = _expected_mse(centres, counts, -zp * step, (levels - zp) * step, step)
    best = int(np.argmin(err))
    return _with_zero(float(cand_lo[best]), float(cand_hi[best]))


_METHODS: dict[str, Any] = {
    "minmax": minmax_range,
    "percentile": percentile_range,
    "entropy": entropy_range,
    "mse": mse_range,
}


def compute_range(obs: TensorObserver, method: str, **kwargs: Any) -> tuple[float, float]:
    """Dispatch to a range estimator by name.

    Args:
        obs: Observer with data.
        method: One of :data:`OBSERVER_METHODS`.
        **kwargs: Passed to the estimator.

    Returns:
        ``(lo, hi)`` with ``lo <= 0 <= hi``.

    Raises:
        ValueError: For an unknown method.

    ``"percentile:<p>"`` selects :func:`percentile_range` with ``percentile=p``
    (``"percentile:99.99"``), so a per-tensor method string can carry its percentile.
    """
    if isinstance(method, str) and method.startswith("percentile:"):
        try:
            p = float(method.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad percentile in range method {method!r}") from None
        return percentile_range(obs, percentile=p, **kwargs)
    try:
        fn = _METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown range method {method!r}; choose one of {', '.join(OBSERVER_METHODS)}"
        ) from None
    return fn(obs, **kwargs)


def qparams(lo: float, hi: float, *, dtype: str, symmetric: bool) -> tuple[float, int]:
    """Scale and zero point for a range, ``x ~ (q - zero_point) * scale``.

    The range is first widened to include zero.  The scale is floored at
    ``1e-12`` so that an all-zero range still gives a valid (positive)
    scale, and rounded to float32 (the zero point is computed from the rounded
    scale).  Zero points round half to even, like ONNX ``QuantizeLinear``.

    Args:
        lo: Lower end of the range.
        hi: Upper end of the range.
        dtype: ``"int8"`` (-128..127) or ``"uint8"`` (0..255).
        symmetric: Symmetric (zero point 0 for int8, 128 for uint8, scale
            ``max(|lo|, |hi|) / 127``) or asymmetric (min/max mapped to the
            ends of the integer range).

    Returns:
        ``(scale, zero_point)`` as a Python float (float32-representable) and int.

    Raises:
        ValueError: For an unknown dtype or a non-finite range.
    """
    if dtype == "int8":
        qmin, qmax = -128, 127
    elif dtype == "uint8":
        qmin, qmax = 0, 255
    else:
        raise ValueError(f"unknown quantized dtype {dtype!r}; choose 'int8' or 'uint8'")
    lo, hi = float(lo), float(hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"range ({lo}, {hi}) is not finite")
    lo, hi = _with_zero(lo, hi)
    if symmetric:
        scale = float(np.float32(max(max(-lo, hi) / 127.0, _MIN_SCALE)))
        return scale, (0 if dtype == "int8" else 128)
    scale = float(np.float32(max((hi - lo) / (qmax - qmin), _MIN_SCALE)))
    zero_point = int(np.clip(np.rint(qmin - lo / scale), qmin, qmax))
    return scale, zero_point
