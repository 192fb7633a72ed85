"""Time `kinetix.simulate` against a 1-s-grid NumPy frame integration, side by side.

Parts (all in one process, CPU, float32 JAX):

(a) Image-domain noise, N subjects × S slices of H×H (default 24 × 8 × 64²):
    - simulation only: `phantom.simulate_subject` for subjects 0..N−1; the first call includes
      JIT compilation (reported separately), so "cold" is what a fresh `python -m
      kinetix.simulate` spends simulating;
    - with BIDS writing: `simulate_cohort` into a temporary directory (warm: already
      compiled), without and with the preview PNGs.
(b) Projection-domain noise (Poisson sinograms + OSEM): simulation only, cold.
(c) Baseline, one subject (subject 0 of part a): the noise-free frames of every body voxel.
    - kinetix: `jax.jit(kk.pet_frames)` on the [M, 5] voxel parameters (exact closed form on
      the frame edges; Feng plasma, sampled whole blood), warm, best of 5;
    - NumPy float64, the authors' approximation: per voxel C_T = Cp ⊗ (a·e^{−α1 t} + b·e^{−α2 t})
      as the trapezoid-rule convolution on the 1-s grid 0..3900 s (computed with zero-padded
      FFTs in chunks of 1024 voxels, which is the same sum as a direct convolution but faster),
      C_PET = fraction·((1 − fv)·C_T + fv·C_WB), frames = f_m/Δ_m·∫ C_PET e^{−λt} by the
      trapezoid rule on the same grid. Also its largest deviation from kinetix's exact frames.

Usage (repository root, venv active):

    python benchmarks/simulate.py                       # ≈ 2 min on 2 cores
    python benchmarks/simulate.py --subjects 4 --skip-projection

Figures and the machine they were measured on: benchmarks/README.md (section "simulate").
"""

import argparse
import os
import platform
import tempfile
import time

import jax
import numpy as np

import kinetix.kinetics as kk
from kinetix.data import phantom as ph
from kinetix.data.phantom.cohort import simulate_cohort

GRID_STEP_S = 1.0
"""Baseline time grid step (s), as in the authors' code."""
CHUNK = 1024
"""Voxels per NumPy chunk (bounds the baseline's memory to ≈ 0.3 GB)."""


def numpy_frames_1s(
    params, fraction, feng, wb_times, wb_values, schedule, decay_constant, step_s=GRID_STEP_S
):
    """Noise-free frames [M, T] of M voxels by trapezoid convolution on a 1-s grid (float64).

    Args:
      params: [M, 5] (fv, K1, k2, k3, k4) (1, mL/min/mL, 1/min ×3).
      fraction: [M] tissue fraction.
      feng: [7] Feng plasma parameters (SUV units, `phantom.feng_curve`).
      wb_times, wb_values: [K] whole-blood samples (min, SUV), linearly interpolated.
      schedule: frame schedule (min) with boundaries on whole seconds.
      decay_constant: λ (1/min).
      step_s: grid step (s); frame boundaries must fall on the grid.

    Returns:
      [M, T] decay-corrected frame values (SUV).
    """
    end_s = round(float(schedule.end[-1]) * 60.0)
    t = np.arange(0.0, end_s + step_s / 2, step_s) / 60.0  # [N] min
    dt = step_s / 60.0
    n = t.size
    n_fft = 1 << (2 * n - 1).bit_length()
    cp = ph.feng_curve(feng, t)
    cwb = np.interp(t, wb_times, wb_values)
    cp_f = np.fft.rfft(cp, n_fft)
    decay = np.exp(-decay_constant * t)
    i_s = np.round(schedule.start * 60.0 / step_s).astype(int)
    i_e = np.round(schedule.end * 60.0 / step_s).astype(int)
    scale = schedule.decay_factors(decay_constant) / schedule.duration
    out = np.empty((params.shape[0], schedule.n_frames))
    p = params.astype(np.float64)
    for lo in range(0, p.shape[0], CHUNK):
        fv, k1, k2, k3, k4 = (p[lo : lo + CHUNK, i, None] for i in range(5))
        s = k2 + k3 + k4
        disc = np.sqrt(np.maximum(s * s - 4.0 * k2 * k4, 0.0))
        a1, a2 = 0.5 * (s - disc), 0.5 * (s + disc)
        h = k1 / (a2 - a1) * ((k3 + k4 - a1) * np.exp(-a1 * t) + (a2 - k3 - k4) * np.exp(-a2 * t))
        conv = np.fft.irfft(np.fft.rfft(h, n_fft) * cp_f, n_fft)[:, :n] * dt
        ct = conv - 0.5 * dt * (h[:, :1] * cp + h * cp[0])  # trapezoid end weights
        c = fraction[lo : lo + CHUNK, None] * ((1.0 - fv) * ct + fv * cwb) * decay
        cum = np.concatenate(
            [np.zeros((c.shape[0], 1)), np.cumsum(0.5 * dt * (c[:, 1:] + c[:, :-1]), axis=1)],
            axis=1,
        )
        out[lo : lo + CHUNK] = (cum[:, i_e] - cum[:, i_s]) * scale
    return out


def _time(fn, repeats=1):
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def _simulate_all(cfg, n, seed):
    """(first-call seconds, total seconds) of simulating subjects 0..n−1."""
    t0 = time.perf_counter()
    ph.simulate_subject(seed, cfg, 0)
    first = time.perf_counter() - t0
    for i in range(1, n):
        ph.simulate_subject(seed, cfg, i)
    return first, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-projection", action="store_true")
    args = parser.parse_args()
    n, seed = args.subjects, args.seed
    cfg = ph.SimulationConfig(size=args.size, slices=args.slices, noise="image")
    shape = f"{n} subjects × {args.slices} slices × {args.size}²"
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"jax {jax.__version__} {jax.default_backend()}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")  # fmt: skip
    rows = []

    # (a) image noise
    first, total = _simulate_all(cfg, n, seed)
    warm = (total - first) / max(n - 1, 1)
    rows.append((f"(a) image noise, simulate only, cold ({shape})", total, ""))
    rows.append(("    of which first subject (JIT compilation)", first, ""))
    rows.append(("    per subject, warm", warm, ""))
    with tempfile.TemporaryDirectory() as tmp:
        t_write, _ = _time(
            lambda: simulate_cohort(f"{tmp}/a", n, seed, cfg, progress=False, preview=False)
        )
        t_prev, _ = _time(lambda: simulate_cohort(f"{tmp}/b", n, seed, cfg, progress=False))
    rows.append(("(a) + BIDS writing, no previews, warm", t_write, ""))
    rows.append(("(a) + BIDS writing + preview PNGs, warm", t_prev, ""))
    rows.append(("    cold estimate with previews (first-call + this)", t_prev + first - warm, ""))

    # (b) projection noise
    if not args.skip_projection:
        pcfg = ph.SimulationConfig(size=args.size, slices=args.slices, noise="projection")
        pfirst, ptotal = _simulate_all(pcfg, n, seed)
        rows.append((f"(b) projection noise, simulate only, cold ({shape})", ptotal, ""))
        rows.append(("    of which first subject (JIT compilation)", pfirst, ""))
        rows.append(("    per subject, warm", (ptotal - pfirst) / max(n - 1, 1), ""))

    # (c) noise-free frames of one subject: kinetix vs 1-s-grid NumPy
    subj = ph.simulate_subject(seed, cfg, 0)
    body = subj["fraction"] > 0
    params, frac = subj["params"][body], subj["fraction"][body]
    blood = subj["blood"]
    lam = float(cfg.decay_constant)

    @jax.jit
    def kinetix_frames(p, f):
        inp = kk.FengInput(np.float32(blood.feng))
        wb = kk.SampledInput(np.float32(blood.times), np.float32(blood.whole_blood))
        return f[:, None] * kk.pet_frames(p, inp, cfg.schedule, lam, blood=wb)

    t_c0, _ = _time(lambda: kinetix_frames(params, frac).block_until_ready())
    t_k, ours = _time(lambda: kinetix_frames(params, frac).block_until_ready(), repeats=5)
    t_np, ref = _time(
        lambda: numpy_frames_1s(
            params, frac, blood.feng, blood.times, blood.whole_blood, cfg.schedule, lam
        )
    )
    ours = np.asarray(ours, np.float64)
    top = np.abs(ours).max(axis=0)  # [T]; 0 in frames before the bolus arrives
    rel = np.abs(ref - ours).max(axis=0) / np.where(top > 0, top, 1.0)
    np.testing.assert_allclose(ours, subj["noisefree"][body], rtol=1e-4, atol=1e-4)
    m = int(body.sum())
    rows.append((f"(c) noise-free frames, 1 subject ({m} voxels), kinetix jit warm", t_k, ""))
    rows.append(("    kinetix first call (compilation)", t_c0, ""))
    rows.append(("    NumPy float64 1-s grid, trapezoid (FFT)", t_np, f"{t_np / t_k:.0f}× kinetix"))
    worst = int(np.argmax(rel))
    sched = cfg.schedule
    rows.append(
        (
            "    NumPy − kinetix, max |Δ| / frame max: worst frame / frames ≥ 9 min",
            None,
            f"{rel[worst]:.2%} (frame {worst + 1}, {sched.start[worst] * 60:.0f}–"
            f"{sched.end[worst] * 60:.0f} s, bolus arrival at {blood.feng[6] * 60:.0f} s) / "
            f"{rel[sched.start >= 9.0].max():.3%}",
        )
    )

    width = max(len(r[0]) for r in rows)
    print(f"\n{'measurement':<{width}}  {'seconds':>8}  note")
    for name, sec, note in rows:
        print(f"{name:<{width}}  {'' if sec is None else f'{sec:8.2f}':>8}  {note}")


if __name__ == "__main__":
    main()
