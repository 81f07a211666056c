"""Tests of onnxq.calibration.observers against numpy references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnxq.calibration.observers import (
    OBSERVER_METHODS,
    TensorObserver,
    compute_range,
    entropy_range,
    minmax_range,
    mse_range,
    percentile_range,
    qparams,
)


def _feed(obs: TensorObserver, data: np.ndarray, batches: int) -> None:
    for part in np.array_split(data, batches, axis=0):
        obs.update(part)


def _fake_quant(x: np.ndarray, lo: float, hi: float, *, dtype: str, symmetric: bool) -> np.ndarray:
    scale, zp = qparams(lo, hi, dtype=dtype, symmetric=symmetric)
    qmin, qmax = (-128, 127) if dtype == "int8" else (0, 255)
    q = np.clip(np.rint(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_extremes_and_moments_match_numpy(rng: np.random.Generator) -> None:
    data = rng.normal(0.5, 2.0, size=(6, 50, 16)).astype(np.float32)
    obs = TensorObserver(bins=256)
    _feed(obs, data, 4)
    flat = data.reshape(-1, 16).astype(np.float64)
    assert obs.count == flat.shape[0]
    assert obs.channels == 16
    assert obs.min == flat.min() and obs.max == flat.max()
    np.testing.assert_array_equal(obs.ch_min, flat.min(axis=0))
    np.testing.assert_array_equal(obs.ch_max, flat.max(axis=0))
    np.testing.assert_array_equal(obs.ch_absmax, np.abs(flat).max(axis=0))
    np.testing.assert_allclose(obs.mean, flat.mean(), rtol=1e-10)
    np.testing.assert_allclose(obs.std, flat.std(), rtol=1e-10)
    np.testing.assert_allclose(obs.ch_mean, flat.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(obs.ch_std, flat.std(axis=0), rtol=1e-10)
    np.testing.assert_allclose(obs.ch_sum, flat.sum(axis=0), rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(obs.ch_sumsq, (flat**2).sum(axis=0), rtol=1e-10)
    centred = flat - flat.mean()
    kurt = (centred**4).mean() / (centred**2).mean() ** 2
    np.testing.assert_allclose(obs.kurtosis(), kurt, rtol=1e-8)
    skew = (centred**3).mean() / (centred**2).mean() ** 1.5
    np.testing.assert_allclose(obs.skewness(), skew, rtol=1e-6, atol=1e-9)
    assert obs.hist.sum() == flat.size
    assert obs.hist.dtype == np.int64


def test_moments_stable_with_large_offset(rng: np.random.Generator) -> None:
    data = 1e6 + rng.normal(size=(4000, 1))
    obs = TensorObserver()
    _feed(obs, data, 5)
    np.testing.assert_allclose(obs.std, data.std(), rtol=1e-6)
    np.testing.assert_allclose(obs.kurtosis(), 3.0, atol=0.3)


def test_low_rank_inputs_are_one_channel() -> None:
    obs = TensorObserver(bins=64)
    obs.update(np.float32(3.0))
    obs.update(np.array([-1.0, 2.0]))
    assert obs.channels == 1 and obs.count == 3
    assert (obs.min, obs.max) == (-1.0, 3.0)


def test_channel_change_raises() -> None:
    obs = TensorObserver(bins=64)
    obs.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="channel"):
        obs.update(np.zeros((2, 4)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad: float) -> None:
    obs = TensorObserver(bins=64)
    x = np.ones((4, 2), dtype=np.float32)
    x[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        obs.update(x)
    # A NaN in a masked-out row is ignored.
    obs.update(x, row_mask=np.array([1, 1, 0, 1]))
    assert obs.count == 3


def test_row_mask_excludes_rows(rng: np.random.Generator) -> None:
    x = rng.normal(size=(2, 5, 3))
    x[:, 3:] = 100.0  # padding tokens
    mask = np.array([[True, True, True, False, False]] * 2)
    obs = TensorObserver(bins=64)
    obs.update(x, row_mask=mask)
    kept = x[:, :3].reshape(-1, 3)
    assert obs.count == 6 and obs.max == kept.max()
    assert obs.hist.sum() == kept.size
    obs.update(x, row_mask=np.zeros(10, dtype=bool))  # all masked: no-op
    assert obs.count == 6
    with pytest.raises(ValueError, match="rows"):
        obs.update(x, row_mask=np.ones(7, dtype=bool))


def test_histogram_range_growth_keeps_counts(rng: np.random.Generator) -> None:
    obs = TensorObserver(bins=128)
    obs.update(rng.uniform(-0.3, 0.3, size=(100, 2)))
    assert obs.range == 0.5
    before = obs.hist
    obs.update(np.array([[7.0, -3.0]]))
    assert obs.range == 8.0
    assert obs.hist.sum() == 202
    # The old 128 bins over [-0.5, 0.5] now sit in the 8 centre bins over [-0.5, 0.5].
    np.testing.assert_array_equal(obs.hist[60:68], before.reshape(8, 16).sum(axis=1))
    np.testing.assert_array_equal(obs.hist_edges(), np.linspace(-8, 8, 129))


def test_histogram_matches_fresh_binning(rng: np.random.Generator) -> None:
    data = rng.standard_t(3, size=(3000, 1))
    obs = TensorObserver(bins=512)
    _feed(obs, data[np.argsort(np.abs(data[:, 0]))], 10)  # growing magnitudes force growth
    ref, _ = np.histogram(data, bins=obs.hist_edges())
    assert np.abs(obs.hist - ref).sum() <= 2  # only exact-edge ties may differ


def test_all_zero_first_batch_then_growth() -> None:
    obs = TensorObserver(bins=64)
    obs.update(np.zeros((10, 1)))
    assert obs.range > 0
    obs.update(np.array([[3.0]]))
    assert obs.range == 4.0 and obs.hist.sum() == 11
    assert obs.quantile_abs(0.5) < 0.2


def test_percentile_close_to_numpy(rng: np.random.Generator) -> None:
    data = rng.normal(size=(20000, 4))
    obs = TensorObserver()
    _feed(obs, data, 7)
    width = 2 * obs.range / obs.bins
    for p in (99.0, 99.9, 99.99):
        lo, hi = percentile_range(obs, p)
        assert abs(hi - np.percentile(data, p)) <= width
        assert abs(lo - np.percentile(data, 100 - p)) <= width
    assert percentile_range(obs, 100.0) == minmax_range(obs)
    assert abs(obs.quantile_abs(0.9) - np.quantile(np.abs(data), 0.9)) <= width


def test_percentile_includes_zero_for_positive_data(rng: np.random.Generator) -> None:
    obs = TensorObserver(bins=256)
    obs.update(rng.uniform(1.0, 2.0, size=(1000, 1)))
    lo, hi = percentile_range(obs, 99.0)
    assert lo == 0.0 and 1.9 < hi <= 2.0


def test_entropy_clips_outliers(rng: np.random.Generator) -> None:
    data = rng.normal(size=(50000, 1))
    data[:5] = 40.0
    obs = TensorObserver()
    _feed(obs, data, 5)
    lo, hi = entropy_range(obs)
    assert lo == -hi
    assert 2.0 < hi < obs.absmax


@pytest.mark.parametrize(
    "data",
    [
        np.zeros((100, 4)),
        np.full((100, 4), 0.7),
        np.eye(16)[np.arange(100) % 16],  # one-hot
        np.array([[0.0], [1.0], [2.0], [-1.0]]),
        np.array([[1e-30], [0.0]]),
    ],
    ids=["zeros", "constant", "one-hot", "few-values", "tiny"],
)
def test_range_methods_survive_degenerate_data(data: np.ndarray) -> None:
    obs = TensorObserver()
    obs.update(data)
    for method in OBSERVER_METHODS:
        lo, hi = compute_range(obs, method)
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= 0.0 <= hi
    assert entropy_range(obs) == minmax_range(obs) or data.max() == 0


def test_entropy_small_histogram_falls_back() -> None:
    obs = TensorObserver(bins=64)  # 32 |x| bins < 128 quantization bins
    obs.update(np.random.default_rng(0).normal(size=(500, 1)))
    assert entropy_range(obs) == minmax_range(obs)


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_beats_minmax_on_heavy_tails(rng: np.random.Generator, symmetric: bool) -> None:
    data = rng.standard_t(3, size=(40000, 1))
    obs = TensorObserver()
    _feed(obs, data, 4)
    dtype = "int8" if symmetric else "uint8"

    def actual_mse(lo: float, hi: float) -> float:
        return float(np.mean((_fake_quant(data, lo, hi, dtype=dtype, symmetric=symmetric) - data) ** 2))

    lo, hi = mse_range(obs, symmetric=symmetric)
    if symmetric:
        assert lo == -hi and 0 < hi < obs.absmax
    else:
        assert obs.min <= lo <= 0 <= hi <= obs.max and hi - lo < obs.max - obs.min
    # Clipping the tails beats min/max, and the histogram estimate lands within
    # 2 % of the best candidate found by brute force on the raw data.
    ref_lo, ref_hi = minmax_range(obs)
    assert actual_mse(lo, hi) < 0.95 * actual_mse(ref_lo, ref_hi)
    fractions = np.linspace(0.01, 1.0, 100)
    if symmetric:
        brute = min(actual_mse(-f * obs.absmax, f * obs.absmax) for f in fractions)
    else:
        brute = min(actual_mse(f * ref_lo, f * ref_hi) for f in fractions)
    assert actual_mse(lo, hi) <= 1.02 * brute


def test_mse_keeps_full_range_for_uniform_data(rng: np.random.Generator) -> None:
    obs = TensorObserver()
    obs.update(rng.uniform(-1, 1, size=(20000, 1)))
    _, hi = mse_range(obs)
    assert hi > 0.9 * obs.absmax


def test_compute_range_unknown_method() -> None:
    obs = TensorObserver(bins=64)
    obs.update(np.ones((2, 2)))
    with pytest.raises(ValueError, match="minmax, percentile, entropy, mse"):
        compute_range(obs, "kl")
    assert compute_range(obs, "percentile", percentile=99.0) == percentile_range(obs, 99.0)


def test_empty_observer_ranges_raise() -> None:
    with pytest.raises(ValueError, match="no data"):
        minmax_range(TensorObserver())


def test_reservoir_rows_are_input_rows_and_bounded(rng: np.random.Generator) -> None:
    data = rng.normal(size=(1000, 8)).astype(np.float32)
    obs = TensorObserver(bins=64, sample_rows=50, seed=3)
    obs.update(data[:20])
    assert obs.sample is not None and obs.sample.shape == (20, 8)
    _feed(obs, data[20:], 9)
    sample = obs.sample
    assert sample.shape == (50, 8) and sample.dtype == np.float32
    rows = {r.tobytes() for r in data}
    assert all(r.tobytes() in rows for r in sample)
    assert len({r.tobytes() for r in sample}) == 50
    # Later rows must make it in (it is a sample of the whole stream, not its head).
    late = {r.tobytes() for r in data[500:]}
    assert sum(r.tobytes() in late for r in sample) >= 10
    # Deterministic for a seed.
    again = TensorObserver(bins=64, sample_rows=50, seed=3)
    again.update(data[:20])
    _feed(again, data[20:], 9)
    np.testing.assert_array_equal(again.sample, sample)


def test_reservoir_is_roughly_uniform() -> None:
    hits = np.zeros(200)
    for seed in range(200):
        obs = TensorObserver(bins=4, sample_rows=10, seed=seed)
        for part in np.array_split(np.arange(200.0)[:, None], 7):
            obs.update(part)
        hits[obs.sample[:, 0].astype(int)] += 1
    # Each row has probability 10/200 per run: expected 10 hits over 200 runs.
    first, last = hits[:100].sum(), hits[100:].sum()
    assert abs(first - last) < 0.15 * (first + last)


def test_memory_does_not_grow(rng: np.random.Generator) -> None:
    def sizes(n_updates: int) -> dict[str, tuple[int, ...]]:
        obs = TensorObserver(bins=128, sample_rows=16)
        for i in range(n_updates):
            obs.update(rng.normal(size=(8, 4)) * (1 + i))
        return {k: v.shape for k, v in obs.to_arrays().items()}

    assert sizes(10) == sizes(100)


def test_merge_equals_single_observer(rng: np.random.Generator) -> None:
    a_data = rng.normal(size=(300, 3))
    b_data = rng.normal(size=(200, 3)) * 5
    whole = TensorObserver(bins=256, sample_rows=40)
    whole.update(a_data)
    whole.update(b_data)
    a = TensorObserver(bins=256, sample_rows=40)
    a.update(a_data)
    b = TensorObserver(bins=256, sample_rows=40)
    b.update(b_data)
    a.merge(b)
    assert a.count == whole.count and a.range == whole.range
    np.testing.assert_array_equal(a.hist, whole.hist)
    assert (a.min, a.max) == (whole.min, whole.max)
    np.testing.assert_array_equal(a.ch_min, whole.ch_min)
    np.testing.assert_array_equal(a.ch_absmax, whole.ch_absmax)
    np.testing.assert_allclose(a.mean, whole.mean, rtol=1e-9)
    np.testing.assert_allclose(a.std, whole.std, rtol=1e-9)
    np.testing.assert_allclose(a.kurtosis(), whole.kurtosis(), rtol=1e-9)
    np.testing.assert_allclose(a.ch_std, whole.ch_std, rtol=1e-9)
    rows = {r.tobytes() for r in np.concatenate([a_data, b_data]).astype(np.float32)}
    assert a.sample.shape == (40, 3)
    assert all(r.tobytes() in rows for r in a.sample)

    empty = TensorObserver(bins=256, sample_rows=40)
    empty.merge(whole)
    np.testing.assert_array_equal(empty.hist, whole.hist)
    whole.merge(TensorObserver(bins=256, sample_rows=40))
    assert whole.count == 500
    with pytest.raises(ValueError, match="bins"):
        whole.merge(TensorObserver(bins=128, sample_rows=40))


def test_arrays_roundtrip(rng: np.random.Generator) -> None:
    obs = TensorObserver(bins=128, sample_rows=5, seed=9)
    obs.update(rng.normal(size=(3, 7, 4)))
    arrays = obs.to_arrays()
    assert all(isinstance(v, np.ndarray) for v in arrays.values())
    back = TensorObserver.from_arrays(arrays)
    for key, value in back.to_arrays().items():
        np.testing.assert_array_equal(value, arrays[key], err_msg=key)
    # Continuing after a restore gives the same result as never stopping.
    more = rng.normal(size=(30, 4))
    obs.update(more)
    back.update(more)
    for key, value in back.to_arrays().items():
        np.testing.assert_array_equal(value, obs.to_arrays()[key], err_msg=key)
    empty = TensorObserver.from_arrays(TensorObserver().to_arrays())
    assert empty.count == 0


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda a: a.pop("hist"), "missing"),
        (lambda a: a.update(extra=np.zeros(1)), "unexpected"),
        (lambda a: a.update(hist=np.zeros(7, dtype=np.int64)), "hist"),
        (lambda a: a.update(ch_max=np.zeros(3)), "ch_max"),
        (lambda a: a.update(min=np.asarray(np.nan)), "NaN"),
        (lambda a: a.update(count=np.asarray(99, dtype=np.int64)), "histogram|sample"),
        (lambda a: a.update(range=np.asarray(3.0)), "power of two"),
        (lambda a: a.update(sample=np.zeros((5, 2), np.float32)), "sample"),
    ],
)
def test_from_arrays_rejects_inconsistent(mutate, match: str) -> None:
    obs = TensorObserver(bins=64, sample_rows=5)
    obs.update(np.random.default_rng(0).normal(size=(10, 4)))
    arrays = obs.to_arrays()
    mutate(arrays)
    with pytest.raises(ValueError, match=match):
        TensorObserver.from_arrays(arrays)


def test_constructor_validation() -> None:
    for bad in (0, 6, 2050):
        with pytest.raises(ValueError, match="multiple of 4"):
            TensorObserver(bins=bad)


def test_qparams_known_values() -> None:
    assert qparams(-1.0, 2.54, dtype="int8", symmetric=True) == (
        float(np.float32(2.54 / 127)),
        0,
    )
    scale, zp = qparams(-1.0, 2.54, dtype="uint8", symmetric=True)
    assert zp == 128 and scale == float(np.float32(2.54 / 127))
    scale, zp = qparams(0.0, 2.55, dtype="uint8", symmetric=False)
    assert zp == 0 and scale == pytest.approx(0.01)
    scale, zp = qparams(-1.0, 1.0, dtype="int8", symmetric=False)
    assert zp in (-1, 0) and scale == pytest.approx(2 / 255)
    scale, zp = qparams(0.0, 0.0, dtype="int8", symmetric=False)
    assert scale > 0 and -128 <= zp <= 127
    scale, zp = qparams(1.0, 2.0, dtype="uint8", symmetric=False)  # widened to include 0
    assert zp == 0 and scale == pytest.approx(2 / 255)
    with pytest.raises(ValueError, match="int8"):
        qparams(0, 1, dtype="int4", symmetric=True)


@st.composite
def _batches(draw: st.DrawFn) -> list[np.ndarray]:
    channels = draw(st.integers(1, 5))
    shapes = st.tuples(st.integers(1, 4), st.integers(1, 6)).map(lambda s: (*s, channels))
    elements = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
    return draw(st.lists(hnp.arrays(np.float32, shapes, elements=elements), min_size=1, max_size=3))


@settings(max_examples=60, deadline=None)
@given(
    batches=_batches(),
    method=st.sampled_from(OBSERVER_METHODS),
    dtype=st.sampled_from(["int8", "uint8"]),
    symmetric=st.booleans(),
)
def test_property_ranges_and_qparams(batches, method, dtype, symmetric) -> None:
    obs = TensorObserver(bins=256, sample_rows=3)
    for b in batches:
        obs.update(b)
    data = np.concatenate([b.reshape(-1).astype(np.float64) for b in batches])
    lo, hi = compute_range(obs, method)
    assert lo <= 0.0 <= hi
    if method in ("minmax", "percentile"):
        assert min(data.min(), 0.0) <= lo and hi <= max(data.max(), 0.0)
    else:  # symmetric estimators (or their min/max fallback) never exceed |x|max
        assert max(-lo, hi) <= np.abs(data).max()
    assert obs.hist.sum() == data.size

    scale, zp = qparams(lo, hi, dtype=dtype, symmetric=symmetric)
    qmin, qmax = (-128, 127) if dtype == "int8" else (0, 255)
    assert scale > 0 and qmin <= zp <= qmax
    for end in (lo, hi):
        q = np.clip(np.rint(end / scale) + zp, qmin, qmax)
        assert abs((q - zp) * scale - end) <= scale * (1 + 1e-6) + 1e-12
