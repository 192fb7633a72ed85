"""Voxelwise 2TCM fitting: `kk.fit_2tcm` against a scipy `least_squares` loop, side by side.

    python benchmarks/fit.py [--voxels 2000] [--scipy-voxels 200] [--part speed,solvers,starts]
                             [--quick] [--json out.json]

Curves: XCAT-like FDG tissues (shared/reference/KINETICS.md) with ±25 % log-normal variation,
k4 = 0 in half of them, image-domain noise σ = 0.3·√(C·e^{λt}/Δ) (about 10 % in a late 5-min
frame), Feng's input scaled to plasma SUV; the paper's schedule cut to 0–35 min (22 frames),
weights "duration_decay", the default bounds and 3 Patlak starts per voxel.

Parts (each prints its table):

- speed: kinetix (float32, `jax.jit`, all voxels in one batch; compilation timed apart) against
  `scipy.optimize.least_squares(method="trf")` with bounds, looping over voxels and starts in
  float64 with the same model and exact Jacobian (`kk.frames_and_jacobian` under `jax.jit`, one
  call per residual evaluation), from the same starts. scipy runs on `--scipy-voxels` of them
  and is extrapolated per voxel. Also the cost agreement on those voxels.
- solvers: on the scipy voxels, the weighted cost each solver reaches against scipy's from the
  same starts: kinetix's Levenberg–Marquardt (float32 and float64) and optimistix's
  `LevenbergMarquardt` (float64, vmapped, bounds by a scaled sigmoid, the same Jacobian through
  `jax.custom_jvp`, 100 and 1000 steps), with their run times.
- starts: float64 on 1000 curves, how often the best of n starts (n = 1..4) reaches the best
  cost known for the curve (all 8 starts together) when the starts come from the Patlak plot
  (`kk.fit_starts`) or from a fixed grid of typical FDG values.

`--quick` shrinks everything (200 voxels, 20 for scipy, 100 curves for the starts) for a smoke run.
"""

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import least_squares

import kinetix.kinetics as kk

LAM = kk.F18_DECAY_CONSTANT
SCHED = kk.PAPER_SCHEDULE
N_EARLY = 22
WINDOW = (0.0, 35.0)
FENG_SUV = np.asarray(kk.FENG_FDG) * np.array([0.05, 0.05, 0.05, 1, 1, 1, 1])  # plasma SUV
# One input object per precision: JAX reuses a NumPy constant converted under jax_enable_x64
# after the flag changes, so float32 and float64 code must not share one.
INPUT32, INPUT64 = kk.FengInput(FENG_SUV.copy()), kk.FengInput(FENG_SUV.copy())
LOWER = np.asarray(kk.DEFAULT_BOUNDS.lower)
UPPER = np.asarray(kk.DEFAULT_BOUNDS.upper)
N_STARTS = 3
TISSUES = np.array(  # fv, K1, k2, k3 of the XCAT FDG table
    [
        [0.029, 0.047, 0.325, 0.084],
        [0.151, 0.114, 0.291, 0.036],
        [0.165, 1.256, 1.329, 0.020],
        [0.545, 0.196, 1.022, 0.149],
        [0.019, 0.131, 0.199, 0.344],
        [0.25, 1.207, 1.909, 0.008],
        [0.02, 0.16, 0.2, 0.06],
        [0.251, 0.214, 0.201, 0.4],
    ]
)
FIXED_STARTS = np.array(  # typical FDG values (fv, K1, k2, k3, k4), the "fixed grid"
    [
        [0.05, 0.10, 0.30, 0.05, 0.01],
        [0.10, 0.50, 1.00, 0.05, 0.01],
        [0.05, 0.05, 0.10, 0.10, 0.01],
        [0.20, 1.00, 1.50, 0.02, 0.01],
    ]
)


def curves(n, seed):
    """[n, 28] noisy frames (float64) and their true parameters [n, 5]."""
    rng = np.random.default_rng(seed)
    rates = TISSUES[rng.integers(0, len(TISSUES), n)] * np.exp(0.25 * rng.standard_normal((n, 4)))
    k4 = np.where(rng.random(n) < 0.5, rng.uniform(0.0, 0.02, n), 0.0)
    params = np.concatenate([rates, k4[:, None]], axis=1)
    params[:, 0] = np.clip(params[:, 0], 0.0, 0.9)
    params[:, 1:4] = np.clip(params[:, 1:4], 0.005, 1.9)
    with jax.enable_x64(True):
        clean = np.asarray(jax.jit(lambda p: kk.pet_frames(p, INPUT64, SCHED))(params))
    sd = 0.3 * np.sqrt(np.maximum(clean, 0.0) * np.exp(LAM * SCHED.mid) / SCHED.duration)
    return clean + sd * rng.standard_normal(clean.shape), params


def weights():
    return kk.frame_weights(SCHED, "duration_decay")[:N_EARLY]


def inner_starts(starts):
    """Starts moved inside the box as kk.fit_2tcm moves them (0.1 % of the box)."""
    margin = 1e-3 * (UPPER - LOWER)
    return np.clip(starts, LOWER + margin, UPPER - margin)


def timed(fn):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


# --------------------------------------------------------------------------------- scipy ----
def scipy_fits(frames, starts):
    """Best weighted cost per curve over its starts; seconds per curve (float64 TRF)."""
    sw = np.sqrt(weights())
    sub = SCHED[:N_EARLY]
    with jax.enable_x64(True):
        model = jax.jit(lambda p: kk.frames_and_jacobian(p, INPUT64, sub))
        jax.block_until_ready(model(inner_starts(starts[0, 0])))  # compile outside the timing
        best = np.full(len(frames), np.inf)
        t0 = time.perf_counter()
        for i, y in enumerate(frames[:, :N_EARLY]):
            for p0 in inner_starts(starts[i]):
                cache = {}

                def res(p, y=y, cache=cache):
                    x, jac = jax.device_get(model(p))
                    cache.update(p=p.copy(), jac=jac)
                    return sw * (x - y)

                def jac(p, cache=cache):
                    if not np.array_equal(cache["p"], p):
                        res(p)
                    return sw[:, None] * cache["jac"]

                sol = least_squares(res, p0, jac=jac, bounds=(LOWER, UPPER), method="trf")
                best[i] = min(best[i], 2.0 * sol.cost)
        seconds = (time.perf_counter() - t0) / len(frames)
    return best, seconds


def agreement(ours, ref, rtol):
    rel = (ours - ref) / ref
    return {
        f"no_worse_{rtol:g}": float(np.mean(rel <= rtol)),
        "lower_by_1e-6": float(np.mean(rel < -1e-6)),
        "median_rel_diff": float(np.median(rel)),
        "max_rel_diff": float(np.max(rel)),
    }


# ---------------------------------------------------------------------------- optimistix ----
def optimistix_fit(frames, starts, max_steps=100):
    """optimistix LM per voxel (vmapped), bounds by a scaled sigmoid, kinetix's Jacobian via a
    custom JVP. Returns (best wrss per curve, seconds, converged fraction). Float64."""
    import optimistix as optx

    sub = SCHED[:N_EARLY]
    w = weights()
    lo, hi = LOWER, UPPER

    def to_params(u):
        s = jax.nn.sigmoid(u)
        return lo + (hi - lo) * s, (hi - lo) * s * (1.0 - s)

    @jax.custom_jvp
    def residuals(u, y):
        p, _ = to_params(u)
        return jnp.sqrt(w) * (kk.frames_and_jacobian(p, INPUT64, sub)[0] - y)

    @residuals.defjvp
    def residuals_jvp(primals, tangents):
        u, y = primals
        du, dy = tangents
        p, dp = to_params(u)
        x, jac = kk.frames_and_jacobian(p, INPUT64, sub)
        sw = jnp.sqrt(w)
        return sw * (x - y), sw * (jac @ (dp * du) - dy)

    def one(y, p0):
        frac = (p0 - lo) / (hi - lo)
        sol = optx.least_squares(
            residuals,
            optx.LevenbergMarquardt(rtol=1e-8, atol=1e-10),
            jnp.log(frac) - jnp.log1p(-frac),
            args=y,
            max_steps=max_steps,
            throw=False,
        )
        r = residuals(sol.value, y)
        return jnp.sum(r * r), sol.result == optx.RESULTS.successful

    with jax.enable_x64(True):
        y = np.repeat(frames[:, :N_EARLY], starts.shape[1], axis=0)
        p0 = inner_starts(starts).reshape(-1, 5)
        run = jax.jit(jax.vmap(one))
        jax.block_until_ready(run(y, p0))  # compile
        (cost, ok), seconds = timed(lambda: run(y, p0))
    cost = np.asarray(cost).reshape(len(frames), -1)
    best = np.argmin(cost, axis=1)
    ok = np.asarray(ok).reshape(len(frames), -1)[np.arange(len(frames)), best]
    return cost.min(axis=1), seconds, float(ok.mean())


# --------------------------------------------------------------------------------- parts ----
def part_speed(args, out):
    frames, _ = curves(args.voxels, seed=0)
    y32 = frames.astype(np.float32)

    def fit():
        return kk.fit_2tcm(y32, INPUT32, SCHED, window=WINDOW, weights="duration_decay")

    res, first = timed(fit)
    res, run = timed(fit)
    n_sp = min(args.scipy_voxels, args.voxels)
    with jax.enable_x64(True):
        starts = np.asarray(kk.fit_starts(frames[:n_sp], INPUT64, SCHED, window=WINDOW))
    ref, sp_per_voxel = scipy_fits(frames[:n_sp], starts)
    ours = np.asarray(res.wrss[:n_sp], np.float64)
    agree = agreement(ours, ref, 1e-4)
    per_voxel = run / args.voxels
    out["speed"] = dict(
        voxels=args.voxels,
        kinetix_first_call_s=first,
        kinetix_s=run,
        kinetix_us_per_voxel=1e6 * per_voxel,
        kinetix_voxels_per_s=args.voxels / run,
        kinetix_converged=float(np.mean(res.converged)),
        kinetix_steps_p50_p90_max=[float(v) for v in np.percentile(res.n_steps, [50, 90, 100])],
        scipy_voxels=n_sp,
        scipy_ms_per_voxel=1e3 * sp_per_voxel,
        scipy_extrapolated_s=sp_per_voxel * args.voxels,
        ratio=sp_per_voxel / per_voxel,
        cost_agreement_float32_vs_scipy=agree,
    )
    print(f"\n## speed: {args.voxels} voxels, 22 frames, {N_STARTS} starts each")
    print("| | seconds | per voxel | voxels/s |")
    print("|---|---:|---:|---:|")
    print(
        f"| kinetix fit_2tcm, float32, jit (first call {first:.1f} s incl. compilation) "
        f"| {run:.2f} | {1e6 * per_voxel:.0f} µs | {args.voxels / run:.0f} |"
    )
    sp_total = sp_per_voxel * args.voxels
    print(
        f"| scipy TRF loop, float64 ({n_sp} voxels, extrapolated) | {sp_total:.1f}"
        f" | {1e3 * sp_per_voxel:.1f} ms | {1 / sp_per_voxel:.1f} |"
    )
    print(f"ratio {sp_per_voxel / per_voxel:.0f}× (target ≥ 100×)")
    print(
        f"kinetix converged {np.mean(res.converged):.4f}; steps p50/p90/max "
        f"{out['speed']['kinetix_steps_p50_p90_max']}"
    )
    print(f"cost vs scipy on {n_sp} voxels (float32 kinetix): {agree}")
    return frames[:n_sp], starts, ref


def part_solvers(args, out, frames, starts, ref):
    rows = {}
    for dtype in (np.float32, np.float64):
        with jax.enable_x64(dtype == np.float64):

            def fit(dtype=dtype):
                inp = INPUT64 if dtype == np.float64 else INPUT32
                return kk.fit_2tcm(
                    frames.astype(dtype), inp, SCHED, window=WINDOW, weights="duration_decay"
                )

            timed(fit)
            res, sec = timed(fit)
        rows[f"kinetix LM, {np.dtype(dtype).name}"] = (
            np.asarray(res.wrss, np.float64),
            sec,
            float(np.mean(res.converged)),
        )
    for steps in (100, 1000):
        rows[f"optimistix LM + sigmoid, float64, {steps} steps"] = optimistix_fit(
            frames, starts, max_steps=steps
        )
    out["solvers"] = {}
    print(f"\n## solvers: {len(frames)} voxels, {N_STARTS} starts, cost against scipy's")
    print("| solver | seconds | converged | no worse (1e-6) | no worse (1e-4) | lower (1e-6) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, (cost, sec, conv) in rows.items():
        a6, a4 = agreement(cost, ref, 1e-6), agreement(cost, ref, 1e-4)
        out["solvers"][name] = dict(
            seconds=sec,
            converged=conv,
            no_worse_1e6=a6["no_worse_1e-06"],
            no_worse_1e4=a4["no_worse_0.0001"],
            lower_by_1e6=a6["lower_by_1e-6"],
            median_rel_diff=a6["median_rel_diff"],
            max_rel_diff=a6["max_rel_diff"],
        )
        print(
            f"| {name} | {sec:.2f} | {conv:.3f} | {a6['no_worse_1e-06']:.3f} | "
            f"{a4['no_worse_0.0001']:.3f} | {a6['lower_by_1e-6']:.3f} |"
        )


def part_starts(args, out):
    n = 100 if args.quick else 1000
    frames, _ = curves(n, seed=1)
    kw = dict(window=WINDOW, weights="duration_decay")
    with jax.enable_x64(True):
        patlak = np.asarray(kk.fit_starts(frames, INPUT64, SCHED, window=WINDOW, n_starts=4))
        fixed = np.broadcast_to(FIXED_STARTS, (n, 4, 5))
        cost = {}
        for name, starts in (("Patlak", patlak), ("fixed grid", fixed)):
            for k in range(1, 5):
                res = kk.fit_2tcm(frames, INPUT64, SCHED, starts=starts[:, :k], **kw)
                cost[name, k] = np.asarray(res.wrss)
        every = np.concatenate([patlak, fixed], axis=1)
        best = np.minimum(
            np.asarray(kk.fit_2tcm(frames, INPUT64, SCHED, starts=every, **kw).wrss),
            np.min(np.stack(list(cost.values())), axis=0),
        )
    out["starts"] = {}
    print(f"\n## starts: {n} curves (float64), share reaching the best known cost")
    print("| starts | n = 1 | 2 | 3 | 4 |")
    print("|---|---:|---:|---:|---:|")
    for name in ("Patlak", "fixed grid"):
        for tol in (1e-6, 1e-3):
            share = [float(np.mean(cost[name, k] <= best * (1 + tol))) for k in range(1, 5)]
            out["starts"][f"{name}, within {tol:g}"] = share
            print(f"| {name}, within {tol:g} | " + " | ".join(f"{v:.3f}" for v in share) + " |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--voxels", type=int, default=2000)
    ap.add_argument("--scipy-voxels", type=int, default=200)
    ap.add_argument("--part", default="speed,solvers,starts")
    ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args()
    if args.quick:
        args.voxels, args.scipy_voxels = 200, 20
    parts = set(args.part.split(","))
    out = dict(
        date=time.strftime("%Y-%m-%d"),
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        load_average_start=os.getloadavg(),
        jax=jax.__version__,
        devices=[str(d) for d in jax.devices()],
    )
    if parts & {"speed", "solvers"}:
        frames, starts, ref = part_speed(args, out)
        if "solvers" in parts:
            part_solvers(args, out, frames, starts, ref)
    if "starts" in parts:
        part_starts(args, out)
    out["load_average_end"] = os.getloadavg()
    print(f"\nload average: start {out['load_average_start']}, end {out['load_average_end']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
