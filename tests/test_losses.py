"""Loss values on hand-made cases (kinetix.training.losses)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kinetix.kinetics as kk
from kinetix import maps
from kinetix.training import losses

SCHED = kk.PAPER_SCHEDULE


def test_huber_matches_optax_and_hand_values():
    r = jnp.array([-3.0, -0.5, 0.0, 0.2, 1.0, 4.0])
    for delta in (0.5, 1.0, 20.0):
        np.testing.assert_allclose(
            losses.huber(r, delta), optax.huber_loss(r, delta=delta), rtol=1e-6
        )
    np.testing.assert_allclose(losses.huber(jnp.array([0.5, 3.0]), 1.0), [0.125, 2.5])


def test_masked_mean_hand_case():
    v = jnp.arange(8.0).reshape(1, 2, 2, 2)
    m = jnp.array([[[1.0, 0.0], [0.0, 1.0]]])
    # voxels (0,0) -> [0, 1], (1,1) -> [6, 7]: mean of 0, 1, 6, 7 = 3.5
    assert float(losses.masked_mean(v, m)) == pytest.approx(3.5)
    assert float(losses.masked_mean(v, jnp.zeros_like(m))) == 0.0


def _linear_patlak_batch(ki, v0):
    """Frames that lie exactly on a Patlak line y = ki·x + v0 for every frame with cp > 0."""
    inp = kk.FengInput(kk.FENG_FDG)
    x, cp = kk.patlak_x(inp, SCHED)
    x4, cp4 = x.reshape(1, 1, 1, -1), cp.reshape(1, 1, 1, -1)
    frames = (ki[..., None] * x4 + v0[..., None]) * cp4  # [B,H,W,T]
    batch_inp = jax.tree.map(lambda a: jnp.stack([a, a]), inp)
    xb, cpb = maps.patlak_coordinates(batch_inp, SCHED)
    return frames, xb, cpb


def test_paper_loss_zero_on_exact_patlak_line_and_hand_value():
    ki = jnp.full((2, 3, 3), 0.03)
    v0 = jnp.full((2, 3, 3), 0.4)
    frames, x, cp = _linear_patlak_batch(ki, v0)
    mask = jnp.ones((2, 3, 3))
    late, linear = losses.frame_indices(SCHED, 22, 9.0)
    loss, parts = losses.paper_loss(
        frames, frames, mask, x, cp, late_idx=late, linear_idx=linear, delta=1.0, lam=2.0
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    # Raise the last frame by 0.3 SUV everywhere: loss_SUV = huber(0.3)/6 frames = 0.045/6.
    pred = frames.at[..., -1].add(0.3)
    loss, parts = losses.paper_loss(
        pred, frames, mask, x, cp, late_idx=late, linear_idx=linear, delta=1.0, lam=2.0
    )
    np.testing.assert_allclose(parts["loss_suv"], 0.5 * 0.3**2 / 6, rtol=1e-5)
    # Only the last Patlak difference changes, by 0.3 / cp_last; 12 differences in the window.
    dy = 0.3 / float(cp[0, -1])
    np.testing.assert_allclose(parts["loss_patlak"], 0.5 * dy**2 / 12, rtol=1e-4)
    np.testing.assert_allclose(loss, parts["loss_suv"] + 2.0 * parts["loss_patlak"], rtol=1e-6)


def test_paper_loss_respects_mask():
    ki = jnp.full((2, 2, 2), 0.02)
    frames, x, cp = _linear_patlak_batch(ki, ki * 10)
    late, linear = losses.frame_indices(SCHED, 22, 9.0)
    pred = frames.at[:, 0, 0, :].add(5.0)  # error only outside the mask
    mask = jnp.ones((2, 2, 2)).at[:, 0, 0].set(0.0)
    loss, _ = losses.paper_loss(
        pred, frames, mask, x, cp, late_idx=late, linear_idx=linear, delta=1.0, lam=1.0
    )
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_paper_faithful_loss_hand_value():
    ki = jnp.full((2, 2, 2), 0.03)
    v0 = jnp.full((2, 2, 2), 0.4)
    frames, x, cp = _linear_patlak_batch(ki, v0)
    _, linear = losses.frame_indices(SCHED, 22, 9.0)
    mask = jnp.ones((2, 2, 2))
    loss, _ = losses.paper_faithful_loss(frames, frames, mask, x, cp, linear_idx=linear)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    # Shift y of every linear frame by 0.1: points term 10·½·0.01, differences unchanged.
    pred = frames.at[..., linear].add(0.1 * cp[0, linear].reshape(1, 1, 1, -1))
    loss, parts = losses.paper_faithful_loss(pred, frames, mask, x, cp, linear_idx=linear)
    np.testing.assert_allclose(parts["loss_patlak_points"], 0.5 * 0.1**2, rtol=1e-4)
    np.testing.assert_allclose(parts["loss_patlak"], 0.0, atol=1e-7)
    np.testing.assert_allclose(loss, 10 * 0.5 * 0.1**2, rtol=1e-4)


def test_frame_indices_and_errors():
    late, linear = losses.frame_indices(SCHED, 22, 9.0)
    np.testing.assert_array_equal(late, np.arange(22, 28))
    np.testing.assert_array_equal(linear, np.arange(15, 28))
    with pytest.raises(ValueError, match="nothing is left to predict"):
        losses.frame_indices(SCHED, 28, 9.0)


def test_gradients_flow_only_through_prediction():
    ki = jnp.full((2, 2, 2), 0.03)
    frames, x, cp = _linear_patlak_batch(ki, ki * 10)
    late, linear = losses.frame_indices(SCHED, 22, 9.0)
    mask = jnp.ones((2, 2, 2))
    f = lambda p, t: losses.paper_loss(
        p, t, mask, x, cp, late_idx=late, linear_idx=linear, delta=1.0, lam=1.0
    )[0]
    g_pred, g_true = jax.grad(f, argnums=(0, 1))(frames * 1.1, frames)
    assert bool(jnp.all(jnp.isfinite(g_pred))) and float(jnp.abs(g_pred).sum()) > 0
    # The reference slope is a stop-gradient; only loss_SUV depends on the target frames.
    np.testing.assert_array_equal(np.asarray(g_true[..., :15]), 0.0)


def test_splice_option_sees_measured_early_frames():
    """loss.patlak_frames = 'splice': the Patlak term sees measured early + predicted late
    frames, so errors in the model's early frames cost nothing, and the late ones as before."""
    from configs import smoke
    from kinetix import training

    ki = jnp.full((2, 3, 3), 0.03)
    frames, x, cp = _linear_patlak_batch(ki, jnp.full((2, 3, 3), 0.4))
    batch = {"frames": frames, "mask": jnp.ones((2, 3, 3)), "valid": jnp.ones((2,))}
    config = smoke.get_config()
    early_wrong = frames.at[..., 10:22].add(1.0)  # inside the Patlak window, before frame 23
    late_wrong = frames.at[..., -1].add(0.3)
    results = {}
    for mode in ("model", "splice"):
        config.loss.patlak_frames = mode
        results[mode] = [
            training.compute_loss(p, batch, x, cp, config, SCHED)[1]["loss_patlak"]
            for p in (early_wrong, late_wrong)
        ]
    assert float(results["model"][0]) > 1e-5  # ≈ 1.8e-4: Δy changes at the block edges
    assert float(results["splice"][0]) == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_allclose(results["splice"][1], results["model"][1], rtol=1e-6)
    config.loss.patlak_frames = "both"
    with pytest.raises(ValueError, match="patlak_frames"):
        training.validate_config(config, SCHED, (16, 16))


def test_early_weight_adds_a_huber_term_on_the_input_frames():
    """loss.early_weight = w adds w · mean Huber over the early frames for the kinetic model
    (hand value), nothing at w = 0 or for the direct model, and rejects a negative weight."""
    from configs import smoke
    from kinetix import training

    frames, x, cp = _linear_patlak_batch(jnp.full((2, 3, 3), 0.03), jnp.full((2, 3, 3), 0.4))
    batch = {"frames": frames, "mask": jnp.ones((2, 3, 3)), "valid": jnp.ones((2,))}
    config = smoke.get_config()
    # Frames 0–4 off by 2 SUV (Huber, δ = 1: 1.5 each), frame 5 by 0.5 (0.125): mean over 22.
    pred = frames.at[..., :5].add(2.0).at[..., 5].add(-0.5)
    base, parts0 = training.compute_loss(pred, batch, x, cp, config, SCHED)
    assert "loss_early" not in parts0
    config.loss.early_weight = 0.5
    loss, parts = training.compute_loss(pred, batch, x, cp, config, SCHED)
    expected = (5 * 1.5 + 0.125) / 22
    np.testing.assert_allclose(parts["loss_early"], expected, rtol=1e-5)
    np.testing.assert_allclose(loss, base + 0.5 * expected, rtol=1e-5)
    config.model.kind = "direct"
    loss_direct, parts_direct = training.compute_loss(pred, batch, x, cp, config, SCHED)
    assert "loss_early" not in parts_direct
    np.testing.assert_allclose(loss_direct, base, rtol=1e-6)
    config.model.kind = "kinetic"
    config.loss.early_weight = -1.0
    with pytest.raises(ValueError, match="early_weight"):
        training.validate_config(config, SCHED, (16, 16))


def test_early_weight_steps_make_the_early_term_a_warm_up():
    """loss.early_weight_steps = N: the early-frame term counts for steps < N only, and never
    in the evaluation objective (step None); N = 0 keeps it throughout (hand values)."""
    from configs import smoke
    from kinetix import training

    frames, x, cp = _linear_patlak_batch(jnp.full((2, 3, 3), 0.03), jnp.full((2, 3, 3), 0.4))
    batch = {"frames": frames, "mask": jnp.ones((2, 3, 3)), "valid": jnp.ones((2,))}
    config = smoke.get_config()
    pred = frames.at[..., :5].add(2.0)  # early frames off: Huber 1.5 on 5 of 22 frames
    base, _ = training.compute_loss(pred, batch, x, cp, config, SCHED)
    config.loss.early_weight = 2.0
    config.loss.early_weight_steps = 400
    expected = 2.0 * 5 * 1.5 / 22
    for step, extra in ((0, expected), (399, expected), (400, 0.0), (5000, 0.0)):
        loss, parts = training.compute_loss(pred, batch, x, cp, config, SCHED, jnp.asarray(step))
        np.testing.assert_allclose(loss, base + extra, rtol=1e-5)
        np.testing.assert_allclose(parts["loss_early"], 5 * 1.5 / 22, rtol=1e-5)
    loss, parts = training.compute_loss(pred, batch, x, cp, config, SCHED)  # evaluation
    assert "loss_early" not in parts
    np.testing.assert_allclose(loss, base, rtol=1e-6)
    config.loss.early_weight_steps = 0
    loss, _ = training.compute_loss(pred, batch, x, cp, config, SCHED)
    np.testing.assert_allclose(loss, base + expected, rtol=1e-5)
    config.loss.early_weight_steps = -1  # (ml_collections itself refuses a float here)
    with pytest.raises(ValueError, match="early_weight_steps must be an integer >= 0"):
        training.validate_config(config, SCHED, (16, 16))


def test_saturation_penalty_hand_values_and_its_pull_out_of_saturation():
    """mean over outputs of max(|z| − m, 0)², averaged over masked voxels; where a scaled
    sigmoid's own gradient has vanished (z = −20: 2e-9) the penalty's gradient pushes z back."""
    z = jnp.array([[[[0.0, 6.0, -7.0, 5.0, -5.5], [-20.0, 0.0, 0.0, 0.0, 0.0]]]])  # [1,1,2,5]
    # voxel 0: excess (0, 1, 2, 0, 0.5) -> squares mean 5.25 / 5; voxel 1: 15² / 5.
    only_first = jnp.array([[[1.0, 0.0]]])
    assert float(losses.saturation_penalty(z, only_first, 5.0)) == pytest.approx(1.05)
    both = jnp.ones((1, 1, 2))
    assert float(losses.saturation_penalty(z, both, 5.0)) == pytest.approx((1.05 + 45.0) / 2)
    assert float(losses.saturation_penalty(z, both, 25.0)) == 0.0
    g = jax.grad(lambda v: losses.saturation_penalty(v, both, 5.0))(z)
    # d/dz of ½ · (1/5) · (|z| − 5)² at z = −20: −(15) · 2 / 10 = −3 (descent raises z).
    assert float(g[0, 0, 1, 0]) == pytest.approx(-3.0)
    assert float(g[0, 0, 0, 0]) == 0.0 and float(g[0, 0, 1, 1]) == 0.0
    assert float(jax.grad(jax.nn.sigmoid)(-20.0)) < 1e-8


def test_saturation_guard_config_checks():
    from configs import smoke
    from kinetix import training

    config = smoke.get_config()
    config.loss.saturation_weight = 0.1
    training.validate_config(config, SCHED, (16, 16))  # kinetic + scaled sigmoid: accepted
    config.model.activation = "log_scaled_sigmoid"
    training.validate_config(config, SCHED, (16, 16))  # and on the log scale
    for field, value, match in (
        ("saturation_weight", -0.1, "saturation_weight must be a finite number >= 0"),
        ("saturation_margin", float("nan"), "saturation_margin must be a finite number"),
    ):
        bad = smoke.get_config()
        setattr(bad.loss, field, value)
        with pytest.raises(ValueError, match=match):
            training.validate_config(bad, SCHED, (16, 16))
    for section, field, value in (("model", "kind", "direct"), ("model", "activation", "none")):
        bad = smoke.get_config()
        bad.loss.saturation_weight = 0.1
        setattr(getattr(bad, section), field, value)
        with pytest.raises(ValueError, match="guards the scaled sigmoid"):
            training.validate_config(bad, SCHED, (16, 16))


def test_splice_keeps_measured_early_and_predicted_late_frames():
    measured = np.arange(12.0).reshape(2, 6)
    predicted = -np.arange(12.0).reshape(2, 6)
    out = maps.splice(measured, predicted, 4)
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out, [[0, 1, 2, 3, -4, -5], [6, 7, 8, 9, -10, -11]])
    jitted = jax.jit(maps.splice, static_argnums=2)(jnp.asarray(measured), predicted, 4)
    assert isinstance(jitted, jax.Array)
    np.testing.assert_array_equal(jitted, out)
