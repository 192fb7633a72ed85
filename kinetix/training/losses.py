"""Training losses: Huber on the late SUV frames plus λ · Huber on Patlak time differences.

Liang et al. 2023, Eqs. 8–10 (the paper's loss):

    loss_SUV  = mean_{late frames, body voxels} huber(pred_t, gt_t)
    y_t = pred_t / Cp_t,   x_t = ∫0^t Cp / Cp_t               (Patlak coordinates)
    loss_diff = mean_{k, body voxels} huber(y_{k+1} − y_k,  K·(x_{k+1} − x_k))
    loss      = loss_SUV + λ · loss_diff

over the frames of the linear Patlak phase (mid-time ≥ t*), where K is the voxel's Patlak slope:
by default the reference 65-min Patlak Ki of the measured frames ("reference"), or the slope of
the predicted curve itself ("prediction", gradient stopped). Patlak coordinates follow
`kinetix.kinetics.patlak_x` (∫ to the frame mid-time over the frame-mean Cp).

`paper_faithful_loss` is what the authors' code optimises instead (their public training script;
docs/conventions.md): in Patlak coordinates on the frames with t ≥ t*, against the reference Patlak
*line* y_line = Ki·x + V0,  10·huber_δ(y, y_line) + huber_δ(Δ(10·y), Δ(10·y_line)), δ = 20.

All means are weighted by a body mask `[B, H, W]`, so the background never enters the loss.
Shapes: frames `[B, H, W, T]` (SUV), x `[B, T]`, cp `[B, T]`.
"""

import jax
import jax.numpy as jnp
import numpy as np

import kinetix.kinetics as kk
from kinetix.maps.patlak import batch_patlak, expand_batch, patlak_y


def huber(residual, delta: float):
    """Elementwise Huber loss (PyTorch `HuberLoss` convention: ½r² inside δ, δ(|r| − ½δ) out)."""
    a = jnp.abs(residual)
    quad = jnp.minimum(a, delta)
    return 0.5 * quad * quad + delta * (a - quad)


def masked_mean(values, mask):
    """Mean of values [B, H, W, ...] over body voxels; mask [B, H, W] (0/1 or weights)."""
    extra = values.ndim - mask.ndim
    m = jnp.reshape(mask, mask.shape + (1,) * extra)
    m = jnp.broadcast_to(m, values.shape)
    return jnp.sum(values * m) / jnp.maximum(jnp.sum(m), 1.0)


def suv_loss(pred_late, true_late, mask, delta: float):
    """Huber on the late SUV frames, averaged over frames and body voxels."""
    return masked_mean(huber(pred_late - true_late, delta), mask)


def patlak_difference_loss(pred_frames, slope, x, cp, idx, mask, delta: float):
    """The paper's Eq. 9: Huber between Δy of the prediction and K·Δx, on frames `idx`."""
    y = patlak_y(pred_frames[..., idx], cp[:, idx])
    dy = y[..., 1:] - y[..., :-1]
    dx = expand_batch(x[:, idx], pred_frames.ndim)
    target = slope[..., None] * (dx[..., 1:] - dx[..., :-1])
    return masked_mean(huber(dy - target, delta), mask)


def saturation_penalty(z, mask, margin: float):
    """Mean over body voxels and outputs of max(|z| − margin, 0)²; z [B, H, W, P], mask [B, H, W].

    A guard for the head's bounded outputs (`loss.saturation_weight`): z are the pre-activations
    of the scaled sigmoid (`KineticHead.preactivations`). The sigmoid's slope is 0.25 at 0,
    0.0066 at |z| = 5 and 4.5e-5 at 10, so a parameter pushed against a bound stops receiving
    gradient; the penalty is zero inside the margin and pulls z back towards it outside.
    """
    excess = jax.nn.relu(jnp.abs(z.astype(jnp.float32)) - margin)
    return masked_mean(jnp.mean(excess * excess, axis=-1), mask)


def paper_loss(
    pred_frames,
    batch_frames,
    mask,
    x,
    cp,
    *,
    late_idx,
    linear_idx,
    delta,
    lam,
    slope_source="reference",
):
    """loss_SUV + λ·loss_diff (the paper). Returns (loss, dict of components).

    Args:
      pred_frames: [B,H,W,T] all frames of the prediction (measured frames may be spliced in
        for models that only predict the late ones).
      batch_frames: [B,H,W,T] measured frames (the target; the late ones are the labels).
      mask: [B,H,W] body mask.
      x, cp: [B,T] Patlak coordinates of each example's input.
      late_idx, linear_idx: static frame indices (NumPy) of the target frames and of the linear
        Patlak phase.
      delta: Huber δ (SUV for loss_SUV, Patlak-y units for loss_diff).
      lam: λ.
      slope_source: "reference" (65-min Patlak Ki of the measured frames) or "prediction".
    """
    l_suv = suv_loss(pred_frames[..., late_idx], batch_frames[..., late_idx], mask, delta)
    src = batch_frames if slope_source == "reference" else pred_frames
    slope, _ = batch_patlak(jax.lax.stop_gradient(src), x, cp, linear_idx)
    l_diff = patlak_difference_loss(pred_frames, slope, x, cp, linear_idx, mask, delta)
    return l_suv + lam * l_diff, {"loss_suv": l_suv, "loss_patlak": l_diff}


def paper_faithful_loss(pred_frames, batch_frames, mask, x, cp, *, linear_idx, delta=20.0):
    """The authors' code: 10·huber(y, y_line) + huber(Δ(10y), Δ(10 y_line)) on t ≥ t*."""
    ki, v0 = batch_patlak(jax.lax.stop_gradient(batch_frames), x, cp, linear_idx)
    xs = expand_batch(x[:, linear_idx], pred_frames.ndim)
    y_line = ki[..., None] * xs + v0[..., None]
    y = patlak_y(pred_frames[..., linear_idx], cp[:, linear_idx])
    l_pt = masked_mean(huber(y - y_line, delta), mask)
    d = lambda v: 10.0 * (v[..., 1:] - v[..., :-1])
    l_diff = masked_mean(huber(d(y) - d(y_line), delta), mask)
    return 10.0 * l_pt + l_diff, {"loss_patlak_points": l_pt, "loss_patlak": l_diff}


def frame_indices(schedule: kk.FrameSchedule, n_early: int, t_star: float):
    """Static (late_idx, linear_idx): frames after the network input, and mid-time ≥ t*."""
    late = np.arange(n_early, schedule.n_frames)
    if late.size == 0:
        raise ValueError(
            f"The schedule has {schedule.n_frames} frames; nothing is left to predict after "
            f"the {n_early} input frames."
        )
    return late, schedule.select(t_star)
