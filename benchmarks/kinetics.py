"""Throughput and memory of the kinetics core against named NumPy baselines, side by side.

Two parts, each run in one invocation (every measurement in its own fresh subprocess, so peak
memory is per item):

(a) `kk.pet_frames`: exact decay-corrected 2TCM frames of a S×H×W volume (default 71×256×256)
    for the 28-frame paper schedule, F-18 decay, Feng FDG input, float32, random physiological
    parameters. kinetix: one `jax.jit`, the volume processed in slice chunks of a fixed shape.
    Baselines (NumPy float64, the authors' approximation on a 1-s grid 0..3900 s):
      - "fft": per voxel C_T = Cp ⊗ (a·e^{−α1 t} + b·e^{−α2 t}) as the trapezoid-rule
        convolution on the 1-s grid, vectorised over voxels with `np.fft.rfft` (zero-padded to
        8192, trapezoid end-weight correction); C_PET = (1 − fv)·C_T + fv·Cp; frames are
        trapezoid-rule decay-weighted averages of the 1-s samples (f_m/Δ_m·∫ C e^{−λt}), applied
        as one matrix product with a precomputed [3901, 28] weight matrix.
      - "recursion": the same trapezoid convolution by the O(N) exponential recursion
        z_n = r·(z_{n−1} + h/2·g_{n−1}) + h/2·g_n, r = e^{−(α+λ)h}, g = Cp·e^{−λt} (the decay
        weight folded into the recursion), vectorised over voxels (both rates at once), with the
        trapezoid frame integrals accumulated on the fly.
    The baselines are too slow for the whole volume: they run on a voxel subset and their time
    is extrapolated linearly per voxel to the full volume (the output says so). A separate
    float64 run compares both baselines (and kinetix float32) with kinetix float64.
(b) Patlak (t* = 9 min, frames to 65 min, OLS) on a S×H×W×28 float32 frame volume:
    kinetix in one jit call for the whole volume, `jax.lax.map` over slices inside it (peak
    memory ≈ the volume), and the plain `jax.jit(lambda v: kk.patlak(v, inp, sched, 9.0))` on
    the whole array, vs NumPy float64 `np.linalg.lstsq(A, Y)` (one LAPACK gelsd call, the
    design matrix A = [x, 1] [13, 2] shared by all voxels, Y [13, voxels]).

Peak memory: each item runs as `--worker PART IMPL` in a fresh process that reports its
high-water resident memory (/proc/self/status VmHWM) minus its resident memory after imports,
i.e. input arrays + outputs + working memory (+ XLA compilation for kinetix). It is printed next
to the size of the 28-frame float32 volume (the output of (a), the input of (b)). The driver
also records how much CPU other processes used while each item ran (figures taken on a busy
machine are not comparable).

Usage (from the repository root, venv active):

    python benchmarks/kinetics.py                  # both parts, 71×256×256 volume (~1.5 min idle)
    python benchmarks/kinetics.py --part b         # Patlak only (~35 s)
    python benchmarks/kinetics.py --quick          # 8×64×64 volume, small subsets (~30 s)

Figures and the machine they were measured on: benchmarks/README.md.
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

PARAM_LO = np.array([0.0, 0.01, 0.05, 0.005, 0.0])
"""Lower bounds of the random parameters (fv, K1, k2, k3, k4) in (1, mL/min/mL, 1/min ×3)."""
PARAM_HI = np.array([0.3, 1.5, 2.0, 0.5, 0.05])
"""Upper bounds of the random parameters."""
GRID_STEP_S = 1.0
"""Baseline time grid step (s), as in the authors' code."""
GRID_END_S = 3900.0
"""Baseline time grid end (s): 65 min."""
FFT_LENGTH = 8192
"""Zero-padded FFT length (≥ 2·3901 − 1, a power of two)."""
T_STAR = 9.0
"""Patlak start time (min)."""
TPCCLIB_PATLAK = (
    "TPCCLIB image Patlak on this volume: 3.4 s compute / 6.3 s wall (external, not measured here)"
)

TARGETS = {
    "a_fft_ratio": 20.0,  # kinetix ≥ 20× the 1-s-grid FFT baseline
    "b_seconds": 0.5,  # kinetix Patlak ≤ 0.5 s compute
    "b_ratio": 5.0,  # ≥ 5× the NumPy lstsq baseline
    "memory_factor": 2.0,  # peak memory ≤ 2× the 28-frame volume
}


# -- process memory ----------------------------------------------------------------------------
def _status_mib(key: str) -> float:
    """A /proc/self/status entry (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {key} entry.")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux /proc/self/clear_refs); False if not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def aligned_empty(shape, dtype=np.float32) -> np.ndarray:
    """An uninitialised array whose data start on a 64-byte boundary.

    `jax.device_put` on CPU aliases such an array instead of copying it (an unaligned NumPy
    array is copied: one more volume in memory).
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off : off + nbytes].view(dtype).reshape(shape)


# -- shared inputs -----------------------------------------------------------------------------
def random_params(n_slices: int, size: int, seed: int) -> np.ndarray:
    """[S, H, W, 5] float32 uniform random 2TCM parameters in [PARAM_LO, PARAM_HI].

    Filled slice by slice, so no float64 temporary of the volume is ever held.
    """
    rng = np.random.default_rng(seed)
    out = aligned_empty((n_slices, size, size, 5))
    lo, span = PARAM_LO.astype(np.float32), (PARAM_HI - PARAM_LO).astype(np.float32)
    for s in range(n_slices):
        out[s] = lo + span * rng.random((size, size, 5), dtype=np.float32)
    return out


def patlak_axes():
    """(x [28] min, cp [28]) float64: kinetix's Patlak abscissa and frame-mean Cp (Feng FDG)."""
    import kinetix.kinetics as kk

    x, cp = kk.patlak_x(kk.FengInput(kk.FENG_FDG), kk.PAPER_SCHEDULE)
    return np.asarray(x, np.float64), np.asarray(cp, np.float64)


def patlak_volume(n_slices: int, size: int, x: np.ndarray, cp: np.ndarray, seed: int):
    """[S, H, W, T] float32 frames on Patlak lines with 5% noise.

    C_m = Ki·x_m·cp_m + V0·cp_m (the exact Patlak plot for abscissa x and frame Cp cp),
    Ki ∈ [0, 0.1] 1/min, V0 ∈ [0, 1], multiplied by (1 + 0.05·N(0, 1)); filled slice by slice.
    """
    slope_row = (x * cp).astype(np.float32)
    icpt_row = cp.astype(np.float32)
    rng = np.random.default_rng(seed)
    out = aligned_empty((n_slices, size, size, x.size))
    for s in range(n_slices):
        ki = rng.uniform(0.0, 0.1, (size, size, 1)).astype(np.float32)
        v0 = rng.uniform(0.0, 1.0, (size, size, 1)).astype(np.float32)
        noise = rng.standard_normal((size, size, x.size), dtype=np.float32)
        out[s] = (ki * slope_row + v0 * icpt_row) * (1.0 + 0.05 * noise)
    return out


# -- NumPy baselines for (a): the 1-s grid ------------------------------------------------------
def feng_cp_numpy(t_min: np.ndarray, p) -> np.ndarray:
    """Feng model-2 plasma input Cp(t) in NumPy float64 (t in min; 0 for t ≤ τ)."""
    a1, a2, a3, l1, l2, l3, tau = (float(v) for v in p)
    s = np.maximum(t_min - tau, 0.0)
    val = (a1 * s - a2 - a3) * np.exp(l1 * s) + a2 * np.exp(l2 * s) + a3 * np.exp(l3 * s)
    return np.where(t_min > tau, val, 0.0)


def grid_setup(start_min: np.ndarray, end_min: np.ndarray, decay_constant: float, feng) -> dict:
    """Voxel-independent pieces of the 1-s-grid baselines.

    Returns:
      dict with t [N] (min), h (min), cp [N], edge indices of each frame's start / end on the
      grid [T], the frame scale f_m/Δ_m [T] (1/min), the [N, T] trapezoid weight matrix with
      the decay weight and scale folded in, and the rfft of the zero-padded cp.
    """
    n = int(round(GRID_END_S / GRID_STEP_S)) + 1
    t = np.arange(n) * (GRID_STEP_S / 60.0)
    h = GRID_STEP_S / 60.0
    i_s = np.rint(start_min * 60.0 / GRID_STEP_S).astype(int)
    i_e = np.rint(end_min * 60.0 / GRID_STEP_S).astype(int)
    if not np.allclose(i_s * h, start_min) or not np.allclose(i_e * h, end_min) or i_e[-1] >= n:
        raise ValueError("the frame edges must lie on the 1-s baseline grid (0..3900 s).")
    lam = decay_constant
    dur = end_min - start_min
    f_m = lam * dur * np.exp(lam * start_min) / -np.expm1(-lam * dur) if lam > 0 else 1.0
    scale = f_m / dur
    cp = feng_cp_numpy(t, feng)
    decay = np.exp(-lam * t)
    weights = np.zeros((n, start_min.size))
    for m, (a, b) in enumerate(zip(i_s, i_e, strict=True)):
        w = np.full(b - a + 1, h)
        w[[0, -1]] *= 0.5
        weights[a : b + 1, m] = w * decay[a : b + 1] * scale[m]
    return dict(
        t=t,
        h=h,
        cp=cp,
        i_s=i_s,
        i_e=i_e,
        scale=scale,
        lam=lam,
        weights=weights,
        cp_fft=np.fft.rfft(cp, n=FFT_LENGTH),
    )


def eigen_numpy(params: np.ndarray):
    """Textbook 2TCM eigen-decomposition in float64: (fv, α1, α2, a, b), each [V].

    α1,2 = (k2 + k3 + k4 ∓ √((k2 + k3 + k4)² − 4·k2·k4))/2, a = K1(k3 + k4 − α1)/(α2 − α1),
    b = K1(α2 − k3 − k4)/(α2 − α1).
    """
    fv, k1, k2, k3, k4 = (params[:, i] for i in range(5))
    s = k2 + k3 + k4
    root = np.sqrt(s * s - 4.0 * k2 * k4)
    alpha1, alpha2 = 0.5 * (s - root), 0.5 * (s + root)
    a = k1 * (k3 + k4 - alpha1) / (alpha2 - alpha1)
    b = k1 * (alpha2 - k3 - k4) / (alpha2 - alpha1)
    return fv, alpha1, alpha2, a, b


def frames_fft(params: np.ndarray, g: dict, chunk: int = 256) -> np.ndarray:
    """Baseline "fft": [V, 5] float64 parameters -> [V, T] frames (see the module docstring)."""
    t, h, cp = g["t"], g["h"], g["cp"]
    n = t.size
    out = np.empty((params.shape[0], g["scale"].size))
    for lo in range(0, params.shape[0], chunk):
        fv, al1, al2, a, b = eigen_numpy(params[lo : lo + chunk])
        kern = a[:, None] * np.exp(-al1[:, None] * t) + b[:, None] * np.exp(-al2[:, None] * t)
        spec = np.fft.rfft(kern, n=FFT_LENGTH, axis=1)
        spec *= g["cp_fft"]
        full = np.fft.irfft(spec, n=FFT_LENGTH, axis=1)[:, :n]
        # Trapezoid rule: half weight on the two end points of each convolution sum.
        ct = h * (full - 0.5 * (cp[0] * kern + kern[:, :1] * cp))
        cpet = (1.0 - fv)[:, None] * ct + fv[:, None] * cp
        out[lo : lo + chunk] = cpet @ g["weights"]
    return out


def frames_recursion(params: np.ndarray, g: dict) -> np.ndarray:
    """Baseline "recursion": [V, 5] float64 parameters -> [V, T] frames (module docstring).

    z_n = r·(z_{n−1} + u_{n−1}) + u_n with u = h/2·Cp·e^{−λt}, r = e^{−(α+λ)h}, is the
    trapezoid-rule convolution of the decay-weighted input on the grid. Its trapezoid running
    integral at sample n is h/2·(2·P_n − z_n), P_n = Σ_{j≤n} z_j, read at the frame edges.
    """
    h, cp, lam = g["h"], g["cp"], g["lam"]
    n = g["t"].size
    fv, al1, al2, a, b = eigen_numpy(params)
    rate = np.stack([al1, al2], axis=1) + lam  # [V, 2]
    r = np.exp(-rate * h)
    u = 0.5 * h * cp * np.exp(-lam * g["t"])  # [N]
    edges = np.unique(np.concatenate([g["i_s"], g["i_e"]]))
    slot = {int(e): k for k, e in enumerate(edges)}
    q = np.zeros((edges.size,) + r.shape)  # running integrals at the edges (÷ h/2)
    z = np.zeros_like(r)
    p = np.zeros_like(r)
    tmp = np.empty_like(r)
    for i in range(1, n):
        np.add(z, u[i - 1], out=tmp)
        np.multiply(tmp, r, out=tmp)
        np.add(tmp, u[i], out=z)
        np.add(p, z, out=p)
        k = slot.get(i)
        if k is not None:
            np.subtract(2.0 * p, z, out=q[k])
    # Input term: the same trapezoid rule on Cp·e^{−λt} (voxel independent).
    gq = np.concatenate([[0.0], np.cumsum(u[1:] + u[:-1])])[edges]
    pos_s, pos_e = np.searchsorted(edges, g["i_s"]), np.searchsorted(edges, g["i_e"])
    tissue = 0.5 * h * (q[pos_e] - q[pos_s])  # [T, V, 2]
    blood = gq[pos_e] - gq[pos_s]  # [T] (u already carries h/2)
    ct = a[None] * tissue[..., 0] + b[None] * tissue[..., 1]  # [T, V]
    return ((1.0 - fv)[None] * ct + fv[None] * blood[:, None]).T * g["scale"]


# -- workers (one fresh process each) ----------------------------------------------------------
def _setup_jax(x64: bool = False):
    """Import jax and start its CPU runtime (counted with the imports in the memory baseline)."""
    import jax

    if x64:
        jax.config.update("jax_enable_x64", True)
    jax.block_until_ready(jax.numpy.zeros(8) + 1.0)
    return jax


def worker_a_kinetix(args) -> dict:
    """kinetix pet_frames on the whole volume in fixed-shape slice chunks (one device; XLA's
    CPU runtime spreads each call over the cores itself)."""
    jax = _setup_jax()

    import kinetix.kinetics as kk

    sched, inp = kk.PAPER_SCHEDULE, kk.FengInput(kk.FENG_FDG)
    rss0 = _status_mib("VmRSS")
    params = random_params(args.slices, args.size, seed=0)  # [S, H, W, 5]
    out = np.empty(params.shape[:-1] + (sched.n_frames,), np.float32)  # [S, H, W, T]
    cs = min(args.chunk_slices, args.slices)
    n_chunks = -(-args.slices // cs)
    fn = jax.jit(lambda p: kk.pet_frames(p, inp, sched))

    t0 = time.perf_counter()
    compiled = fn.lower(jax.ShapeDtypeStruct((cs,) + params.shape[1:], np.float32)).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    chunk_vox = cs * args.size * args.size
    peak_total = _status_mib("VmHWM") - rss0
    reset = _reset_peak()

    def chunk(i):
        lo = i * cs
        block = params[lo : lo + cs]
        if block.shape[0] < cs:  # pad the last chunk to the compiled shape (padding is timed)
            block = np.concatenate(
                [block, np.zeros((cs - block.shape[0],) + block.shape[1:], block.dtype)]
            )
        return compiled(block)

    jax.block_until_ready(chunk(0))  # first call: allocations, thread pools
    times = []
    for _ in range(args.repeats_a):
        t0 = time.perf_counter()
        c0 = time.process_time()
        pending = chunk(0)
        for i in range(n_chunks):
            nxt = chunk(i + 1) if i + 1 < n_chunks else None  # dispatch ahead, then copy out
            lo = i * cs
            hi = min(lo + cs, args.slices)
            out[lo:hi] = np.asarray(pending)[: hi - lo]
            pending = nxt
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    n_vox = int(np.prod(params.shape[:-1]))
    return dict(
        compile_s=compile_s,
        **_timing(times),
        voxels=n_vox,
        chunk_voxels=chunk_vox,
        n_chunks=n_chunks,
        flops_per_voxel=float(cost.get("flops", float("nan"))) / chunk_vox,
        transcendentals_per_voxel=float(cost.get("transcendentals", float("nan"))) / chunk_vox,
        finite=bool(np.isfinite(out).all()),
        peak_mib=max(peak_total, _status_mib("VmHWM") - rss0),
        compute_peak_mib=_status_mib("VmHWM") - rss0 if reset else None,
        input_mib=params.nbytes / 2**20,
        output_mib=out.nbytes / 2**20,
    )


def worker_a_baseline(args, impl: str) -> dict:
    """A 1-s-grid baseline on a voxel subset, extrapolated per voxel to the full volume."""
    import kinetix.kinetics as kk

    sched = kk.PAPER_SCHEDULE
    rss0 = _status_mib("VmRSS")
    n_sub = args.fft_subset if impl == "fft" else args.subset
    n_slices = -(-n_sub // (args.size * args.size))  # the volume's first slices, same values
    params = random_params(n_slices, args.size, seed=0).reshape(-1, 5)[:n_sub]
    params = params.astype(np.float64)
    g = grid_setup(sched.start, sched.end, kk.F18_DECAY_CONSTANT, kk.FENG_FDG)
    fn = frames_fft if impl == "fft" else frames_recursion
    fn(params[: min(64, n_sub)], g)  # warm-up
    times = []
    for _ in range(args.repeats_base):
        t0 = time.perf_counter()
        c0 = time.process_time()
        frames = fn(params, g)
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    n_full = args.slices * args.size * args.size
    best = _timing(times)
    sub_s = best["seconds"]
    return dict(
        subset_voxels=n_sub,
        subset_seconds=sub_s,
        seconds=sub_s * n_full / n_sub,  # extrapolated to the full volume
        cpu_seconds=best["cpu_seconds"] * n_full / n_sub,
        load_avg_1min=best["load_avg_1min"],
        voxels=n_full,
        finite=bool(np.isfinite(frames).all()),
        peak_mib=_status_mib("VmHWM") - rss0,
    )


def worker_a_accuracy(args) -> dict:
    """Max relative frame error (frames starting ≥ 1 min) of the baselines vs kinetix float64."""
    jax = _setup_jax(x64=True)
    import kinetix.kinetics as kk

    sched = kk.PAPER_SCHEDULE
    params = random_params(1, 64, seed=1).reshape(-1, 5)[: args.accuracy_voxels]
    p64 = params.astype(np.float64)
    ref = np.asarray(kk.pet_frames(jax.numpy.asarray(p64), kk.FengInput(kk.FENG_FDG), sched))
    f32 = np.asarray(
        jax.jit(
            lambda p: kk.pet_frames(p, kk.FengInput(np.asarray(kk.FENG_FDG, np.float32)), sched)
        )(jax.numpy.asarray(params, jax.numpy.float32))
    )
    g = grid_setup(sched.start, sched.end, kk.F18_DECAY_CONSTANT, kk.FENG_FDG)
    late = sched.start >= 1.0 - 1e-9

    def rel(x):
        return float(np.max(np.abs(x[:, late] - ref[:, late]) / np.abs(ref[:, late])))

    def rel_all(x):  # all frames, relative to each voxel's largest frame (early ones are ~0)
        return float(np.max(np.abs(x - ref) / np.max(np.abs(ref), axis=1, keepdims=True)))

    fft, rec = frames_fft(p64, g), frames_recursion(p64, g)
    return dict(
        voxels=int(p64.shape[0]),
        fft_vs_kinetix64=rel(fft),
        recursion_vs_kinetix64=rel(rec),
        fft_vs_recursion=float(
            np.max(np.abs(fft - rec) / np.max(np.abs(rec), axis=1, keepdims=True))
        ),
        kinetix32_vs_kinetix64=rel(f32),
        fft_vs_kinetix64_all_frames=rel_all(fft),
        kinetix32_dtype=str(f32.dtype),
    )


def worker_b(args, impl: str) -> dict:
    """Patlak OLS on the whole S×H×W×28 volume: kinetix (jit) or NumPy float64 lstsq.

    impl "kinetix": one jit call for the volume, `jax.lax.map` over slices inside it (peak
    memory ≈ the volume); "kinetix-whole": the plain `jax.jit(lambda v: kk.patlak(v, ...))` on
    the whole array (XLA keeps several [voxels, 13] temporaries); "numpy": `np.linalg.lstsq`.
    """
    jax = _setup_jax()
    import kinetix.kinetics as kk

    sched, inp = kk.PAPER_SCHEDULE, kk.FengInput(kk.FENG_FDG)
    x, cp = patlak_axes()  # setup (eager JAX), before the memory baseline
    rss0 = _status_mib("VmRSS")
    frames = patlak_volume(args.slices, args.size, x, cp, seed=2)
    idx = sched.select(T_STAR)
    res = dict(voxels=int(np.prod(frames.shape[:-1])), frames_used=int(idx.size))
    times = []
    if impl.startswith("kinetix"):
        vol = jax.block_until_ready(jax.device_put(frames))  # aliases the aligned array

        def fit(v):  # [..., T] -> (ki [...], v0 [...])
            return kk.patlak(v, inp, sched, T_STAR)

        fn = jax.jit(fit if impl == "kinetix-whole" else lambda v: jax.lax.map(fit, v))
        t0 = time.perf_counter()
        compiled = fn.lower(vol).compile()
        res["compile_s"] = time.perf_counter() - t0
        peak_total = _status_mib("VmHWM") - rss0
        reset = _reset_peak()
        jax.block_until_ready(compiled(vol))
        for _ in range(args.repeats_b):
            t0 = time.perf_counter()
            c0 = time.process_time()
            ki, v0 = jax.block_until_ready(compiled(vol))
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        ki = np.asarray(ki)
    else:
        peak_total = _status_mib("VmHWM") - rss0
        reset = _reset_peak()
        assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "selected frames contiguous"
        design = np.stack([x[idx], np.ones(idx.size)], axis=1)  # [13, 2]
        for _ in range(args.repeats_b):
            t0 = time.perf_counter()
            c0 = time.process_time()
            sel = frames.reshape(-1, frames.shape[-1])[:, idx[0] : idx[-1] + 1]  # a view
            y = sel.T.astype(np.float64)  # [13, V]
            y /= cp[idx, None]
            coef, *_ = np.linalg.lstsq(design, y, rcond=None)  # [2, V]
            times.append((time.perf_counter() - t0, time.process_time() - c0))
            del y
        ki = coef[0]
    res.update(
        **_timing(times),
        ki_sample=np.asarray(ki, np.float64).reshape(-1)[:: max(1, ki.size // 4096)].tolist(),
        peak_mib=max(peak_total, _status_mib("VmHWM") - rss0),
        compute_peak_mib=_status_mib("VmHWM") - rss0 if reset else None,
        input_mib=frames.nbytes / 2**20,
    )
    return res


# -- driver ------------------------------------------------------------------------------------
def _timing(times) -> dict:
    """Best repeat by wall time: its wall and CPU seconds, all wall times, the load average."""
    wall, cpu = min(times)
    return dict(
        seconds=wall,
        cpu_seconds=cpu,
        all_seconds=[t[0] for t in times],
        load_avg_1min=os.getloadavg()[0],
    )


def _busy_cpu_seconds() -> float:
    """CPU-seconds all processes of the machine have used since boot (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(v) for v in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run_worker(part: str, impl: str, argv: list[str]) -> dict:
    """Run one item in a fresh interpreter; its last stdout line is the JSON result.

    Also records `others_busy`: the fraction of the machine's CPU capacity that *other*
    processes used while the worker ran (all CPU time from /proc/stat minus the worker's), a
    direct measure of how much the figures may be disturbed by a shared machine.
    """
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", part, impl]
    print(f"  [{part}/{impl}] running ...", file=sys.stderr, flush=True)
    t0, busy0, own0 = time.perf_counter(), _busy_cpu_seconds(), _children_cpu_seconds()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    others = _busy_cpu_seconds() - busy0 - (_children_cpu_seconds() - own0)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise RuntimeError(f"worker {part}/{impl} failed with exit code {proc.returncode}.")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["others_busy"] = max(0.0, others) / (wall * (os.cpu_count() or 1))
    print(
        f"  [{part}/{impl}] done in {wall:.1f} s wall; other processes used "
        f"{100 * res['others_busy']:.0f}% of the CPUs meanwhile",
        file=sys.stderr,
    )
    return res


def _machine() -> dict:
    import jax

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    return dict(
        cpu=cpu,
        nproc=os.cpu_count(),
        python=platform.python_version(),
        jax=jax.__version__,
        numpy=np.__version__,
        load_avg=os.getloadavg(),
    )


def _fmt_s(x):
    return "-" if x is None else f"{x:.3g} s"


def _busy(*results):
    """'12% / 3%': share of the CPUs other processes used during each worker."""
    return " / ".join(f"{100 * r.get('others_busy', float('nan')):.0f}%" for r in results)


def _mem_target(cap):
    return "memory n/a" if cap == float("inf") else f"≤ {cap:.0f} MiB"


def _met(ok):
    return "met" if ok else "NOT met"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--slices", type=int, default=None, help="slices of SIZE×SIZE (71)")
    parser.add_argument("--size", type=int, default=None, help="in-plane size (256)")
    parser.add_argument(
        "--chunk-slices", type=int, default=1, help="(a) slices per jit call (1: ~1.5 KB/voxel)"
    )
    parser.add_argument("--subset", type=int, default=None, help="(a) recursion voxels (4096)")
    parser.add_argument("--fft-subset", type=int, default=None, help="(a) FFT voxels (4096)")
    parser.add_argument("--accuracy-voxels", type=int, default=256)
    parser.add_argument("--repeats-a", type=int, default=1, help="(a) kinetix full passes")
    parser.add_argument("--repeats-base", type=int, default=3, help="(a) baseline repeats")
    parser.add_argument("--repeats-b", type=int, default=5, help="(b) repeats")
    parser.add_argument("--quick", action="store_true", help="8×64×64 volume, small subsets")
    parser.add_argument("--json", default=None, help="also write all results to this file")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = dict(slices=8, size=64, subset=512, fft_subset=256)
    full = dict(slices=71, size=256, subset=4096, fft_subset=4096)
    for key, val in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, val)

    if args.worker is not None:
        part, impl = args.worker
        if part == "a":
            if impl == "kinetix":
                res = worker_a_kinetix(args)
            elif impl == "accuracy":
                res = worker_a_accuracy(args)
            else:
                res = worker_a_baseline(args, impl)
        else:
            res = worker_b(args, impl)
        print(json.dumps(res))
        return

    passthrough = [
        f"--slices={args.slices}",
        f"--size={args.size}",
        f"--chunk-slices={args.chunk_slices}",
        f"--subset={args.subset}",
        f"--fft-subset={args.fft_subset}",
        f"--accuracy-voxels={args.accuracy_voxels}",
        f"--repeats-a={args.repeats_a}",
        f"--repeats-base={args.repeats_base}",
        f"--repeats-b={args.repeats_b}",
    ]
    machine = _machine()
    vol_mib = args.slices * args.size * args.size * 28 * 4 / 2**20
    n_vox = args.slices * args.size * args.size
    print(
        f"volume {args.slices}×{args.size}×{args.size} = {n_vox} voxels; 28-frame float32 "
        f"volume {vol_mib:.0f} MiB; machine: {machine['cpu']}, nproc {machine['nproc']}, "
        f"jax {machine['jax']}, numpy {machine['numpy']}, load avg at start "
        f"{', '.join(f'{v:.2f}' for v in machine['load_avg'])}",
        file=sys.stderr,
    )
    results = dict(args=vars(args), machine=machine)
    if args.part in ("a", "all"):
        for impl in ("kinetix", "fft", "recursion", "accuracy"):
            results[f"a_{impl}"] = _run_worker("a", impl, passthrough)
    if args.part in ("b", "all"):
        for impl in ("kinetix", "kinetix-whole", "numpy"):
            results[f"b_{impl}"] = _run_worker("b", impl, passthrough)
    results["load_avg_end"] = os.getloadavg()
    report(results, vol_mib)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)


def report(r: dict, vol_mib: float) -> None:
    """Print the details and the summary table."""
    mem_cap = TARGETS["memory_factor"] * vol_mib
    if r["args"]["quick"]:  # fixed runtime overheads dominate a tiny volume
        mem_cap = float("inf")
        print("\n--quick: small volume; the memory target applies to the full volume only.")
    rows = []
    if "a_kinetix" in r:
        k, fft, rec, acc = r["a_kinetix"], r["a_fft"], r["a_recursion"], r["a_accuracy"]
        print("\n(a) pet_frames, 28 frames, F-18 decay, Feng FDG input")
        print(
            f"  kinetix float32: compile {k['compile_s']:.2f} s (once); steady state "
            f"{k['seconds']:.2f} s wall ({k['cpu_seconds']:.1f} CPU-s, load "
            f"{k['load_avg_1min']:.2f}) for {k['voxels']} voxels in {k['n_chunks']} calls of "
            f"{k['chunk_voxels']} voxels = {k['voxels'] / k['seconds'] / 1e6:.3f} Mvoxel/s; "
            f"peak {k['peak_mib']:.0f} MiB (params {k['input_mib']:.0f} + frames "
            f"{k['output_mib']:.0f} MiB included); XLA cost analysis "
            f"{k['flops_per_voxel']:.0f} flop + {k['transcendentals_per_voxel']:.0f} "
            "transcendental per voxel (XLA counts a loop body once: the lax.scan over the "
            "frame edges in FengInput.conv_integral runs once per edge)"
        )
        for name, b in (("fft", fft), ("recursion", rec)):
            print(
                f"  baseline {name} (NumPy float64, 1-s grid): {b['subset_seconds']:.3f} s for "
                f"{b['subset_voxels']} voxels, EXTRAPOLATED per voxel to {b['voxels']} voxels: "
                f"{b['seconds']:.1f} s wall ({b['cpu_seconds']:.1f} CPU-s, load "
                f"{b['load_avg_1min']:.2f}) = {b['voxels'] / b['seconds'] / 1e6:.4f} Mvoxel/s"
            )
        print(
            f"  accuracy on {acc['voxels']} voxels, max relative frame error, frames starting "
            f">= 1 min, vs kinetix float64: fft {acc['fft_vs_kinetix64']:.2e}, recursion "
            f"{acc['recursion_vs_kinetix64']:.2e}, kinetix float32 "
            f"{acc['kinetix32_vs_kinetix64']:.2e}; all frames, relative to the voxel's largest "
            f"frame: fft {acc['fft_vs_kinetix64_all_frames']:.2e}, fft vs recursion "
            f"{acc['fft_vs_recursion']:.1e}"
        )
        ratio_fft = fft["seconds"] / k["seconds"]
        rows += [
            (
                "(a) pet_frames vs 1-s FFT*",
                _fmt_s(k["seconds"]),
                _fmt_s(fft["seconds"]),
                f"{ratio_fft:.1f}×",
                f"≥ {TARGETS['a_fft_ratio']:.0f}×, {_mem_target(mem_cap)}",
                _met(ratio_fft >= TARGETS["a_fft_ratio"] and k["peak_mib"] <= mem_cap),
                f"{k['peak_mib']:.0f} / {fft['peak_mib']:.0f}†",
                _busy(k, fft),
            ),
            (
                "(a) pet_frames vs 1-s recursion*",
                _fmt_s(k["seconds"]),
                _fmt_s(rec["seconds"]),
                f"{rec['seconds'] / k['seconds']:.1f}×",
                "(reported)",
                "-",
                f"{k['peak_mib']:.0f} / {rec['peak_mib']:.0f}†",
                _busy(k, rec),
            ),
        ]
    if "b_kinetix" in r:
        k, kw, b = r["b_kinetix"], r["b_kinetix-whole"], r["b_numpy"]
        diff = np.max(np.abs(np.array(k["ki_sample"]) - np.array(b["ki_sample"])))
        print(
            f"\n(b) Patlak OLS, t* = {T_STAR} min, {k['frames_used']} frames, {k['voxels']} voxels"
        )
        for name, res in (("lax.map over slices", k), ("plain, whole array", kw)):
            print(
                f"  kinetix float32 jit, {name}: compile {res['compile_s']:.2f} s; compute "
                f"{res['seconds']:.3f} s wall (min of {len(res['all_seconds'])}; "
                f"{res['cpu_seconds']:.2f} CPU-s, load {res['load_avg_1min']:.2f}); peak "
                f"{res['peak_mib']:.0f} MiB (compute phase {res['compute_peak_mib']:.0f} MiB)"
            )
        print(
            f"  NumPy float64 np.linalg.lstsq: {b['seconds']:.3f} s wall (min of "
            f"{len(b['all_seconds'])}; {b['cpu_seconds']:.2f} CPU-s, load "
            f"{b['load_avg_1min']:.2f}); peak {b['peak_mib']:.0f} MiB; max |Ki kinetix − NumPy| "
            f"on a sample {diff:.1e} 1/min"
        )
        print(f"  reference: {TPCCLIB_PATLAK}")
        for name, res in (("(b) Patlak, lax.map over slices", k), ("(b) Patlak, plain jit", kw)):
            ratio = b["seconds"] / res["seconds"]
            ok = (
                res["seconds"] <= TARGETS["b_seconds"]
                and ratio >= TARGETS["b_ratio"]
                and res["peak_mib"] <= mem_cap
            )
            rows.append(
                (
                    name,
                    _fmt_s(res["seconds"]),
                    _fmt_s(b["seconds"]),
                    f"{ratio:.1f}×",
                    f"≤ {TARGETS['b_seconds']} s, ≥ {TARGETS['b_ratio']:.0f}×, "
                    + _mem_target(mem_cap),
                    _met(ok),
                    f"{res['peak_mib']:.0f} / {b['peak_mib']:.0f}",
                    _busy(res, b),
                )
            )
    m = r["machine"]
    print(
        f"\nmachine: {m['cpu']}, nproc {m['nproc']}, python {m['python']}, jax {m['jax']}, "
        f"numpy {m['numpy']}; load avg start {m['load_avg'][0]:.2f} / end "
        f"{r['load_avg_end'][0]:.2f} (1 min)"
    )
    header = (
        "item",
        "kinetix",
        "baseline",
        "ratio",
        "target",
        "met?",
        "peak MiB k / base",
        "others busy k / base",
    )
    widths = [max(len(str(row[i])) for row in rows + [header]) for i in range(len(header))]
    line = " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    print("\n" + line + "\n" + "-" * len(line))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"\n28-frame float32 volume: {vol_mib:.0f} MiB (memory target ≤ 2× volume: "
        f"{_mem_target(mem_cap)}). "
        "Peak = process high-water RSS minus RSS after imports.\n"
        "* baseline time measured on a voxel subset and extrapolated linearly per voxel to the "
        "full volume.\n† baseline peak memory is for the subset only.\n"
        "others busy: share of the machine's CPU capacity used by other processes while each "
        "worker ran (from /proc/stat); figures taken above a few % are disturbed."
    )


if __name__ == "__main__":
    main()
