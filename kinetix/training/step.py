"""The model's forward pass, the objective, and the jitted `train_step` / `eval_step`.

`train_step(state, batch) -> (state, metrics)` is pure, jitted with the state donated; `nnx.merge`
happens only inside it (the Flax performance guide's functional pattern).
"""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import kinetix.kinetics as kk
from kinetix import maps, models
from kinetix.training import losses
from kinetix.training.optim import learning_rate_schedule


def batch_inputs(batch, use_whole_blood: bool):
    """Batched plasma (and whole-blood) inputs from a batch dict: leaves [B, K]."""
    inp = kk.SampledInput(batch["plasma_times"], batch["plasma"])
    blood = (
        kk.SampledInput(batch["plasma_times"], batch["whole_blood"]) if use_whole_blood else None
    )
    return inp, blood


def predict_frames(
    graphdef, params, frames_early, inp, blood, config, schedule, *, with_preactivations=False
):
    """All T frames of the prediction [B,H,W,T] (+ the 2TCM parameters for kinetic models).

    Kinetic: U-Net → head → 2TCM → every frame. Direct: measured early frames followed by the
    predicted late ones (the model has no parameters, `None` is returned for them). With
    ``config.model.input_norm == "plasma"`` the network sees the early frames divided by each
    example's `plasma_scale` (a direct model's outputs are multiplied back by it). With
    ``config.model.curve_frames`` > 0 its head also sees `curve_features` (the subject's plasma
    input, one mean per frame). ``with_preactivations=True`` returns the head's unbounded
    outputs [B,H,W,P] as a third item (for `losses.saturation_penalty`).
    """
    model = nnx.merge(graphdef, params)
    x, scale = frames_early, None
    if config.model.input_norm == "plasma":
        t_end = float(schedule.end[config.model.n_early - 1])
        scale = plasma_scale(inp, t_end).astype(frames_early.dtype)  # [B] SUV
        x = frames_early / scale[:, None, None, None]
    curve = None
    if config.model.curve_frames:
        curve = curve_features(inp, schedule, scale).astype(frames_early.dtype)
    z = model.preactivations(x, curve)
    out = model.from_preactivations(z)
    extra = (z,) if with_preactivations else ()
    if config.model.kind == "kinetic":
        pred = models.params_to_frames(
            out,
            inp,
            schedule,
            float(config.kinetics.decay_constant),
            point_samples=bool(config.model.point_samples),
            blood=blood,
        )
        return (pred, out, *extra)
    late = out.astype(frames_early.dtype)
    if scale is not None:
        late = late * scale[:, None, None, None]  # back to SUV
    return (jnp.concatenate([frames_early, late], axis=-1), None, *extra)


def plasma_scale(inp, t_end: float) -> jax.Array:
    """Each example's mean plasma activity over [0, t_end]: ∫0^t_end Cp dt / t_end.

    `model.input_norm = "plasma"` divides the network's input frames by it, so the input is in
    units of the subject's own plasma level: the 2TCM parameters do not change when the whole
    input function is scaled (the frames scale with it), and the network no longer has to guess
    a subject's plasma amplitude, which it cannot see in the images, to find them.

    Args:
      inp: batched plasma input (leaves [B, K]), SUV, minutes.
      t_end: end of the input window (min), e.g. 35.

    Returns:
      [B] mean plasma SUV (positive for any real input curve).
    """
    return jax.vmap(lambda i: i.integral(jnp.asarray(t_end, jnp.float32)) / t_end)(inp)


def curve_features(inp, schedule, scale=None) -> jax.Array:
    """Each example's plasma input as its mean over every frame: the head's curve inputs.

    With ``config.model.curve_frames = T`` the pointwise head sees these T values beside every
    voxel's U-Net features, so it can invert the tissue curves for the 2TCM parameters knowing
    the subject's input-function shape (which the images alone do not show).

    Args:
      inp: batched plasma input (leaves [B, K]), SUV, minutes.
      schedule: `kk.FrameSchedule` with T frames (minutes).
      scale: optional [B] divisor (the `plasma_scale` under ``input_norm = "plasma"``, so the
        curve is in the same units as the input frames); None: SUV.

    Returns:
      [B, T]: ∫ Cp over each frame / its duration, no decay weighting (decay-corrected SUV):
      `kk.blood_frames` with λ = 0, the frame-mean Cp that Patlak also uses.
    """
    means = jax.vmap(lambda i: kk.blood_frames(i, schedule, 0.0))(inp)
    return means if scale is None else means / scale[:, None]


def loss_mask(batch):
    """Body mask of the real examples [B, H, W] (padding examples have valid = 0)."""
    return batch["mask"] * batch["valid"][:, None, None]


def early_weight_at(config, step=None):
    """Weight of the early-frame term at ``step``: `loss.early_weight`, or with
    `loss.early_weight_steps` = N > 0 only for steps < N (a warm-up; 0 after it and at
    evaluation, ``step=None``, so validation losses stay comparable to the plain objective)."""
    weight = float(config.loss.early_weight)
    steps = int(config.loss.early_weight_steps)
    if steps == 0 or weight == 0:
        return weight
    if step is None:
        return 0.0
    return jnp.where(step < steps, weight, 0.0)


def compute_loss(pred, batch, x, cp, config, schedule, step=None):
    """The training objective of a prediction: `_objective` (the paper's or the authors' loss)
    plus the early-frame term (`early_weight_at(config, step)`). Returns (loss, components)."""
    late, linear = losses.frame_indices(schedule, config.model.n_early, config.kinetics.t_star)
    mask = loss_mask(batch)
    loss, parts = _objective(pred, batch, mask, x, cp, late, linear, config)
    early_weight = early_weight_at(config, step)  # a Python 0.0 when the term is off
    off = isinstance(early_weight, float) and early_weight == 0.0
    if not off and config.model.kind == "kinetic":
        # The 2TCM also predicts the measured input frames: ask it to explain them.
        n_early = config.model.n_early
        l_early = losses.suv_loss(
            pred[..., :n_early], batch["frames"][..., :n_early], mask, config.loss.huber_delta
        )
        loss = loss + early_weight * l_early
        parts = {**parts, "loss_early": l_early}
    return loss, parts


def _objective(pred, batch, mask, x, cp, late, linear, config):
    """The paper's (or the authors') loss on the prediction, without the early-frame term."""
    if config.loss.patlak_frames == "splice":
        # The measured early frames followed by the predicted late ones (a no-op for the direct
        # model, whose prediction is already this splice).
        pred = maps.splice(batch["frames"], pred, config.model.n_early)
    if config.loss.kind == "paper":
        return losses.paper_loss(
            pred,
            batch["frames"],
            mask,
            x,
            cp,
            late_idx=late,
            linear_idx=linear,
            delta=config.loss.huber_delta,
            lam=config.loss.lambda_patlak,
            slope_source=config.loss.patlak_slope,
        )
    return losses.paper_faithful_loss(
        pred, batch["frames"], mask, x, cp, linear_idx=linear, delta=config.loss.faithful_delta
    )


def make_train_step(graphdef, tx, config, schedule, wrap=None):
    """The pure step `train_step(state, batch) -> (state, metrics)`, jitted, state donated.

    `wrap` optionally decorates the Python function before `jax.jit` (tests use
    `chex.assert_max_traces(n=1)`).
    """
    n_early = config.model.n_early
    use_wb = bool(config.kinetics.use_whole_blood)
    lr_fn = learning_rate_schedule(config.optim)

    sat_weight = float(config.loss.saturation_weight)
    sat_margin = float(config.loss.saturation_margin)

    def loss_fn(params, batch, step):
        inp, blood = batch_inputs(batch, use_wb)
        pred, _, z = predict_frames(
            graphdef,
            params,
            batch["frames"][..., :n_early],
            inp,
            blood,
            config,
            schedule,
            with_preactivations=True,
        )
        x, cp = maps.patlak_coordinates(inp, schedule)
        loss, parts = compute_loss(pred, batch, x, cp, config, schedule, step)
        if sat_weight > 0:
            penalty = losses.saturation_penalty(z, loss_mask(batch), sat_margin)
            loss = loss + sat_weight * penalty
            parts = {**parts, "loss_saturation": penalty}
        return loss, parts

    def train_step(state, batch):
        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, state["step"]
        )
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"], value=loss)
        params = optax.apply_updates(state["params"], updates)
        metrics = {
            "loss": loss,
            **parts,
            "grad_norm": optax.global_norm(grads),
            "param_norm": optax.global_norm(params),
            "learning_rate": lr_fn(state["step"])
            if config.optim.name == "adam"
            else jnp.asarray(config.optim.learning_rate, jnp.float32),
        }
        new_state = {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state}
        return new_state, metrics

    if wrap is not None:
        train_step = wrap(train_step)
    return jax.jit(train_step, donate_argnums=(0,))


def make_eval_step(graphdef, config, schedule):
    """`eval_step(params, batch) -> (pred [B,H,W,T], params_map [B,H,W,5] or None, loss)`.

    ``loss`` is the batch's objective (`compute_loss` with no step, so an early-frame term
    that is only a warm-up is left out), a mean over the body voxels of the batch's real
    examples (``valid`` = 1).
    """
    n_early = config.model.n_early
    use_wb = bool(config.kinetics.use_whole_blood)

    def eval_step(params, batch):
        inp, blood = batch_inputs(batch, use_wb)
        pred, pmap = predict_frames(
            graphdef, params, batch["frames"][..., :n_early], inp, blood, config, schedule
        )
        x, cp = maps.patlak_coordinates(inp, schedule)
        loss, _ = compute_loss(pred, batch, x, cp, config, schedule)
        return pred, pmap, loss

    return jax.jit(eval_step)
