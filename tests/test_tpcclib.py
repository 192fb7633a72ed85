"""kinetix against the TPCCLIB 0.7.1 fixture and Patlak fits against independent least-squares
solutions (numpy polyfit / SVD, scipy linregress).

The fixture's files used here are vendored in tests/data/tpcclib-case (its README), so the suite
runs from any clone; the project's original is shared/reference/tpcclib-case beside the
checkout, and the copy is checked against it when it is there."""

import gzip
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

import kinetix.kinetics as kk

TPC = pathlib.Path(__file__).resolve().parent / "data" / "tpcclib-case"  # vendored copy
SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference" / "tpcclib-case"
REGIONS = np.array([[0, 0.1, 0.15, 0.05, 0], [0, 0.1, 0.15, 0.05, 0.01], [0, 0.2, 0.4, 0.2, 0]])
SCHED = kk.PAPER_SCHEDULE


def read_patlak_out(name):
    """{region: {method: (ki, ic)}} and the #IN rows (frame mean Cp, ∫0^mid Cp)."""
    fits, rows = {}, []
    for line in (TPC / name).read_text().splitlines():
        if line.startswith("#IN"):
            rows.append([float(v) for v in line.split()[4:6]])
        m = re.match(r"(R\d)\s+(\S+)\s+Ki=(\S+)\s+Ic=(\S+)", line)
        if m:
            fits.setdefault(m.group(1), {})[m.group(2)] = (float(m.group(3)), float(m.group(4)))
    return fits, np.array(rows)


@pytest.mark.skipif(
    not SHARED.is_dir(), reason="no shared/reference/tpcclib-case beside the checkout"
)
def test_vendored_fixture_matches_the_shared_one():
    """The vendored files equal the project's fixture byte for byte (plasma_fine.bld gunzipped)."""
    names = sorted(p.name for p in TPC.iterdir() if p.name != "README.md")
    assert len(names) == 5, names
    for name in names:
        ours = (TPC / name).read_bytes()
        if name.endswith(".gz"):
            name, ours = name[: -len(".gz")], gzip.decompress(ours)
        assert ours == (SHARED / name).read_bytes(), name


def test_frames_match_tpcclib_fine(x64):
    """TPCCLIB frame means with the 0.001-min input: ≤ 2.5e-6 relative after 1 min."""
    tac = np.loadtxt(TPC / "tissue_fine.tac", skiprows=1)
    np.testing.assert_allclose(tac[:, :2], np.stack([SCHED.start, SCHED.end], -1), atol=1e-9)
    ours = np.asarray(kk.pet_frames(REGIONS, kk.FengInput(kk.FENG_FDG), SCHED, decay_constant=0.0))
    late = SCHED.start >= 1.0
    np.testing.assert_allclose(ours[:, late], tac[late, 2:].T, rtol=2.5e-6)
    ref = np.loadtxt(TPC / "reference_frames_python.txt")  # analytic / tight ODE, independent
    mask = ref[:, 2:5].T > 0
    np.testing.assert_allclose(ours[mask], ref[:, 2:5].T[mask], rtol=1e-8)


@pytest.mark.parametrize("window", ["9-65", "9-35"])
def test_patlak_matches_tpcclib(x64, window):
    """Ki and intercept from OLS and perpendicular fits, ≤ 1e-6 relative, two ways:
    TPCCLIB's own frames with its sampled input, and kinetix's exact frames with the Feng input."""
    fits, rows = read_patlak_out(f"tpcclib_patlak_fine_{window}.out")
    t_end = None if window == "9-65" else 35.0
    fine = np.loadtxt(TPC / "plasma_fine.bld.gz", skiprows=1)
    sampled = kk.SampledInput(fine[:, 0], fine[:, 1])
    feng = kk.FengInput(kk.FENG_FDG)
    # The Patlak coordinates themselves (#IN rows: frame-mean Cp, ∫0^mid Cp).
    x, cp = kk.patlak_x(sampled, SCHED)
    np.testing.assert_allclose(cp, rows[:, 0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(x * cp, rows[:, 1], rtol=1e-6, atol=1e-9)
    tac = jnp.asarray(np.loadtxt(TPC / "tissue_fine.tac", skiprows=1)[:, 2:].T)
    exact = kk.pet_frames(REGIONS, feng, SCHED, decay_constant=0.0)
    for method, key in (("ols", "pearson3_OLS"), ("perpendicular", "llsqperp3")):
        for frames, inp in ((tac, sampled), (exact, feng)):
            ki, v0 = kk.patlak(frames, inp, SCHED, 9.0, t_end, method=method)
            for r, region in enumerate(("R1", "R2", "R3")):
                ref_ki, ref_ic = fits[region][key]
                np.testing.assert_allclose(ki[r], ref_ki, rtol=1e-6, err_msg=f"{region} {method}")
                np.testing.assert_allclose(v0[r], ref_ic, rtol=1e-6, err_msg=f"{region} {method}")


def _synthetic_patlak(rng, n, dtype):
    x = np.sort(rng.uniform(10, 110, size=(n, 9)), axis=-1)
    ki = rng.uniform(0, 0.08, size=(n, 1))
    v0 = rng.uniform(0.1, 0.8, size=(n, 1))
    y = ki * x + v0 + rng.normal(0, 0.05, size=x.shape)
    return x.astype(dtype), y.astype(dtype)


def test_fit_line_against_references():
    rng = np.random.default_rng(1)
    x, y = _synthetic_patlak(rng, 50, np.float64)
    w = rng.uniform(0.2, 2.0, size=x.shape)
    with jax.enable_x64(True):
        ols = kk.fit_line(x, y, method="ols")
        wols = kk.fit_line(x, y, w, method="ols")
        perp = kk.fit_line(x, y, method="perpendicular")
        wperp = kk.fit_line(x, y, w, method="perpendicular")
    for i in range(x.shape[0]):
        lr = stats.linregress(x[i], y[i])
        np.testing.assert_allclose([ols[0][i], ols[1][i]], [lr.slope, lr.intercept], rtol=1e-10)
        pw = np.polyfit(x[i], y[i], 1, w=np.sqrt(w[i]))
        np.testing.assert_allclose([wols[0][i], wols[1][i]], pw, rtol=1e-9)
        for (slope, icpt), ww in ((perp, np.ones(9)), (wperp, w[i])):
            # Total least squares: the smallest principal direction of the weighted, centred data.
            xm, ym = np.average(x[i], weights=ww), np.average(y[i], weights=ww)
            data = np.stack([x[i] - xm, y[i] - ym], -1) * np.sqrt(ww)[:, None]
            normal = np.linalg.svd(data)[2][-1]
            ref_slope = -normal[0] / normal[1]
            np.testing.assert_allclose(slope[i], ref_slope, rtol=1e-9)
            np.testing.assert_allclose(icpt[i], ym - ref_slope * xm, rtol=1e-8, atol=1e-12)


def test_patlak_float32_stays_accurate():
    """Centring keeps float32 perpendicular and OLS fits within 1e-5 of float64 on Patlak data."""
    feng = kk.FengInput(kk.FENG_FDG)
    rng = np.random.default_rng(2)
    params = np.stack(
        [
            rng.uniform(0, 0.2, 500),
            rng.uniform(0.02, 1.5, 500),
            rng.uniform(0.05, 2, 500),
            rng.uniform(0.005, 0.5, 500),
            np.zeros(500),
        ],
        -1,
    )
    with jax.enable_x64(True):
        frames64 = kk.pet_frames(jnp.asarray(params), feng, SCHED)
        ref = {m: kk.patlak(frames64, feng, SCHED, 9.0, method=m) for m in kk.METHODS}
    frames32 = jnp.asarray(np.asarray(frames64), jnp.float32)
    for m in kk.METHODS:
        ki, v0 = kk.patlak(frames32, feng, SCHED, 9.0, method=m)
        assert ki.dtype == jnp.float32
        scale_ki = np.max(np.abs(ref[m][0]))
        np.testing.assert_allclose(ki, ref[m][0], rtol=1e-5, atol=1e-5 * scale_ki, err_msg=m)
        np.testing.assert_allclose(v0, ref[m][1], rtol=1e-5, atol=1e-5, err_msg=m)


def test_patlak_recovers_ki_on_noise_free_curves(x64):
    """For k4 = 0 and late frames, Patlak Ki approaches K1·k3/(k2 + k3) (within its own bias)."""
    params = jnp.asarray([[0.05, 0.2, 0.3, 0.1, 0.0], [0.0, 0.131, 0.199, 0.344, 0.0]])
    feng = kk.FengInput(kk.FENG_FDG)
    ki, _ = kk.patlak(kk.pet_frames(params, feng, SCHED), feng, SCHED, 9.0)
    true = (1 - params[:, 0]) * kk.ki_from_rates(params[:, 1], params[:, 2], params[:, 3])
    np.testing.assert_allclose(ki, true, rtol=0.02)


def test_patlak_nan_only_where_data_nan():
    feng = kk.FengInput(kk.FENG_FDG)
    frames = np.array(kk.pet_frames(jnp.asarray([[0.0, 0.1, 0.15, 0.05, 0.0]] * 4), feng, SCHED))
    frames[1, 20] = np.nan
    frames[2] = 0.0  # all-zero voxel: a valid fit with Ki = 0
    frames[3, 3] = np.nan  # NaN outside the fit window does not matter
    for m in kk.METHODS:
        ki, v0 = jax.jit(lambda f, m=m: kk.patlak(f, feng, SCHED, 9.0, method=m))(frames)
        np.testing.assert_array_equal(np.isnan(ki), [False, True, False, False])
        np.testing.assert_array_equal(np.isnan(v0), [False, True, False, False])
        assert float(ki[2]) == 0.0 and float(v0[2]) == 0.0


def test_patlak_batched_leading_axes_and_jit():
    feng = kk.FengInput(kk.FENG_FDG)
    rng = np.random.default_rng(3)
    frames = jnp.asarray(rng.uniform(0, 5, size=(2, 3, 4, 28)), jnp.float32)
    ki, v0 = jax.jit(lambda v: kk.patlak(v, feng, SCHED, 9.0))(frames)
    assert ki.shape == v0.shape == (2, 3, 4)
    ki_loop = np.array(
        [
            [[kk.patlak(frames[i, j, k], feng, SCHED, 9.0)[0] for k in range(4)] for j in range(3)]
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(ki, ki_loop, rtol=1e-5, atol=1e-7)
