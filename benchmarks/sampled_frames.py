"""Frames from a sampled input, as in training: `pet_frames` forward and forward + backward.

    python benchmarks/sampled_frames.py [--batch 2] [--size 64] [--points 64] [--repeats 20]

Training feeds `kk.pet_frames` a `SampledInput` (each subject's blood curve on `input_points`
samples) for every voxel of the batch, and differentiates through it. Two implementations of
the running integral it needs, on the same parameters in one process:

- kinetix: `SampledInput.conv_integral` (knots and frame edges merged into one grid, one
  `lax.scan` with one expm1 and a short polynomial per rate and segment, rematerialised in the
  backward pass);
- baseline: the general recursion `SampledInput.conv(...)[1]` (kinetix's implementation before
  2026-11-26: six `expconv.kernels` per segment and edge, an associative scan and gathers).

Prints seconds per call (median of --repeats), the ratio baseline ÷ kinetix, and the largest
difference between the two relative to the frames' maximum.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import kinetix.kinetics as kk


@jax.tree_util.register_pytree_node_class
class GeneralRecursionInput(kk.SampledInput):
    """A SampledInput whose frame integrals use the general recursion (the baseline)."""

    def conv_integral(self, beta, t, decay_constant=0.0):
        return self.conv(beta, t, decay_constant)[1]


def random_params(key, shape):
    """[*shape, 5] 2TCM parameters spread over the demo's bounds (k4 = 0 in a tenth)."""
    lo = jnp.asarray([0.0, 0.01, 0.01, 0.0, 0.0])
    hi = jnp.asarray([0.6, 1.5, 1.5, 0.5, 0.1])
    p = lo + (hi - lo) * jax.random.uniform(key, (*shape, 5))
    k4_zero = jax.random.uniform(jax.random.fold_in(key, 1), shape) < 0.1
    return p.at[..., 4].set(jnp.where(k4_zero, 0.0, p[..., 4]))


def median_seconds(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--points", type=int, default=64, help="samples of the input curve")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    schedule = kk.PAPER_SCHEDULE
    # Each subject's curve on its own grid, dense early (as the data pipeline resamples).
    times = np.geomspace(0.05, 65.0, args.points - 1)
    times = np.concatenate([[0.0], times])
    subjects = []
    for b in range(args.batch):
        feng = kk.FengInput(kk.FENG_FDG._replace(tau=0.5 + 0.1 * b))
        subjects.append(np.asarray(feng(jnp.asarray(times)), np.float32))
    t_b = jnp.asarray(np.tile(times.astype(np.float32), (args.batch, 1)))
    v_b = jnp.asarray(np.stack(subjects))
    params = random_params(jax.random.PRNGKey(0), (args.batch, args.size, args.size))
    weights = jax.random.uniform(jax.random.PRNGKey(2), (1, 1, 1, schedule.n_frames))

    def frames_fn(cls):
        def frames(p, t, v):
            return jax.vmap(lambda pb, tb, vb: kk.pet_frames(pb, cls(tb, vb), schedule))(p, t, v)

        def loss(p, t, v):
            return jnp.sum(weights * frames(p, t, v) ** 2)

        return jax.jit(frames), jax.jit(jax.value_and_grad(loss))

    rows = {}
    outs = {}
    for name, cls in (("kinetix", kk.SampledInput), ("baseline", GeneralRecursionInput)):
        fwd, grad = frames_fn(cls)
        outs[name] = np.asarray(fwd(params, t_b, v_b))
        rows[name] = (
            median_seconds(fwd, (params, t_b, v_b), args.repeats),
            median_seconds(grad, (params, t_b, v_b), args.repeats),
        )
    voxels = args.batch * args.size * args.size
    print(
        f"pet_frames, SampledInput with {args.points} samples, {voxels} voxels × "
        f"{schedule.n_frames} frames, {jax.devices()[0].platform} × {jax.device_count()}, "
        f"jax {jax.__version__}"
    )
    print(f"{'implementation':<26}{'forward s':>11}{'fwd+bwd s':>11}")
    for name, (f, g) in rows.items():
        print(f"{name:<26}{f:>11.4f}{g:>11.4f}")
    kf, kg = rows["kinetix"]
    bf, bg = rows["baseline"]
    print(f"ratio baseline ÷ kinetix: forward {bf / kf:.1f}×, forward + backward {bg / kg:.1f}×")
    diff = np.abs(outs["kinetix"] - outs["baseline"]).max() / np.abs(outs["baseline"]).max()
    print(f"max |kinetix − baseline| / max frame = {diff:.2e} (float32)")


if __name__ == "__main__":
    main()
