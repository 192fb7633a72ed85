"""Input-curve packing: compress to at most K samples, pad to exactly K.

Pure NumPy helpers of `kinetix.data.pipeline` (see its module docstring for why compression is
the only approximation in the training path). Import these names from `kinetix.data.pipeline`.
"""

import bisect

import numpy as np

DEFAULT_INPUT_POINTS = 128
"""Samples per input curve in a batch (K)."""

DEFAULT_MASK_THRESHOLD = 0.05
"""Body mask (`kinetix.maps.mask`, rule "threshold"): time-averaged SUV above this fraction of
the subject's 99th percentile."""


# ------------------------------------------------------------------------------------------------
# Input curves: compress to at most K samples, then pad to exactly K
# ------------------------------------------------------------------------------------------------
def _check_curve(times, values) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(times)
    v = np.asarray(values)
    if t.ndim != 1 or t.size < 1:
        raise ValueError(f"times must be a non-empty 1-D array, got shape {t.shape}.")
    if v.ndim not in (1, 2) or v.shape[-1] != t.size:
        raise ValueError(
            f"values must be [K] or [C, K] with K = {t.size} samples (len(times)), got shape "
            f"{v.shape}."
        )
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(v))):
        raise ValueError("times and values must be finite.")
    if np.any(np.diff(t) <= 0):
        raise ValueError("times must be strictly increasing.")
    return t, v


def _segment_error(t: np.ndarray, v: np.ndarray, a: int, b: int) -> np.ndarray:
    """|v - chord| on samples a..b (inclusive) for the chord a→b; v is [C, K] -> [C, b-a+1]."""
    frac = (t[a : b + 1] - t[a]) / (t[b] - t[a])  # [n]
    chord = v[:, a : a + 1] + (v[:, b : b + 1] - v[:, a : a + 1]) * frac[None, :]
    return np.abs(v[:, a : b + 1] - chord)


def compress_curve(times, values, max_points: int = DEFAULT_INPUT_POINTS):
    """Keeps at most `max_points` of a piecewise-linear curve's samples, minimising the error.

    The curve (as `kk.SampledInput` reads it: linear between samples, 0 before the first, held
    after the last) is replaced by the piecewise-linear curve through a subset of its own
    samples. The first and last samples are always kept; the rest are chosen greedily
    (Douglas–Peucker-style insertion): repeatedly add the sample where the current
    approximation is worst. Both curves are piecewise linear with the kept breakpoints a subset
    of the original ones, so the maximum error over all t is attained at an original sample and
    the error reported by the greedy loop is the true sup-norm error. This is the only
    approximation in kinetix's training path (see the module docstring).

    Args:
      times: [K] sample times (min), strictly increasing.
      values: [K] values, or [C, K] several curves sharing `times` (e.g. plasma and whole
        blood); then one subset serves all, chosen on the error relative to each curve's peak
        |value| (max over curves).
      max_points: the largest number of samples to keep (>= 2).

    Returns:
      (times [M], values [M] or [C, M]), M = min(K, max_points): the input arrays themselves
      (same dtype, copied) when K <= max_points, otherwise the kept samples, in order.
    """
    t, v = _check_curve(times, values)
    max_points = int(max_points)
    if max_points < 2:
        raise ValueError(f"max_points must be >= 2, got {max_points}.")
    k = t.size
    if k <= max_points:
        return t.copy(), v.copy()
    t64 = t.astype(np.float64)
    v64 = np.atleast_2d(v).astype(np.float64)  # [C, K]
    scale = np.max(np.abs(v64), axis=1, keepdims=True)
    v64 = v64 / np.where(scale > 0, scale, 1.0)  # relative to each curve's peak
    kept = [0, k - 1]  # sorted indices of kept samples
    err = np.max(_segment_error(t64, v64, 0, k - 1), axis=0)  # [K]
    err[[0, k - 1]] = 0.0
    while len(kept) < max_points:
        i = int(np.argmax(err))
        if err[i] <= 0.0:
            break  # already exact
        pos = bisect.bisect(kept, i)
        a, b = kept[pos - 1], kept[pos]
        kept.insert(pos, i)
        err[a : i + 1] = np.max(_segment_error(t64, v64, a, i), axis=0)
        err[i : b + 1] = np.max(_segment_error(t64, v64, i, b), axis=0)
        err[[a, i, b]] = 0.0  # kept samples are exact (not a rounding error of the segment)
    idx = np.asarray(kept)
    return t[idx], v[..., idx]


def interpolation_error(times, values, kept_times) -> float:
    """Max |curve − curve through the samples at `kept_times`| (the sup norm over all t).

    Args:
      times: [K] sample times (min) of the full curve.
      values: [K] its values.
      kept_times: [M] a subset of `times` that includes the first and last.

    Returns:
      The largest absolute difference, in the units of `values`.
    """
    t, v = _check_curve(times, values)
    kept = np.asarray(kept_times)
    idx = np.searchsorted(t, kept)
    if np.any(idx >= t.size) or np.any(t[np.minimum(idx, t.size - 1)] != kept):
        raise ValueError("kept_times must be a subset of times.")
    approx = np.interp(t, t[idx], v[idx])
    return float(np.max(np.abs(v - approx)))


def pad_curve(times, values, n_points: int):
    """Pads a sampled curve to exactly `n_points` samples without changing it.

    Appends samples at t_last + 1, t_last + 2, ... minutes holding the last value. The curve is
    held constant after its last sample (`kk.SampledInput`), so the padded curve is the same
    function of time: values, integrals and convolutions are unchanged exactly.

    Args:
      times: [K] sample times (min), strictly increasing.
      values: [K] or [C, K] values.
      n_points: the target length (>= K).

    Returns:
      (times [n_points], values [n_points] or [C, n_points]), dtypes preserved.
    """
    t, v = _check_curve(times, values)
    n_points = int(n_points)
    k = t.size
    if n_points < k:
        raise ValueError(
            f"n_points {n_points} is smaller than the curve's {k} samples; use compress_curve "
            "first."
        )
    extra = n_points - k
    new_t = t[-1] + np.arange(1, extra + 1, dtype=t.dtype)
    new_v = np.repeat(v[..., -1:], extra, axis=-1)
    return np.concatenate([t, new_t]), np.concatenate([v, new_v], axis=-1)
