"""Training: one jit-compiled, data-parallel `train_step`, Orbax checkpoints, metrics, resume.

Shape of the loop (big_vision / flax examples):
- the model is built once and split, `graphdef, params = nnx.split(model)`; the step is a plain
  `jax.jit` over a pytree state {step, params, opt_state, rng} with the state donated, and
  `nnx.merge` happens only inside it;
- one code path for 1..N devices: a 1-D `jax.make_mesh` over all devices named 'data', batches
  sharded `P('data')`, parameters and optimiser state replicated;
- the host fetches metrics only on log steps (`metrics.jsonl`, progress bar with loss, steps/s
  and ETA) and stops with a clear error on non-finite values;
- the workdir identifies the run: checkpoints (with the grain iterator state) are restored on
  start, so rerunning the same command resumes.
"""

import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

import kinetix.kinetics as kk
from kinetix import losses, models
from kinetix.data import pipeline

BATCH_KEYS = ("frames", "mask", "plasma_times", "plasma", "whole_blood", "valid")


# ----------------------------------------------------------------------------------- config ---
def validate_config(config: ml_collections.ConfigDict, schedule: kk.FrameSchedule, shape) -> None:
    """One clear sentence for configurations that cannot work with these data or devices."""
    n_dev = jax.device_count()
    bs = config.data.batch_size
    if bs < 1 or bs % n_dev:
        raise ValueError(
            f"config.data.batch_size = {bs} must be a positive multiple of the {n_dev} devices."
        )
    if bs % jax.process_count():
        raise ValueError(f"config.data.batch_size = {bs} must divide by the process count.")
    ebs, n_local = config.train.eval_batch_size, jax.local_device_count()
    if ebs < 1 or ebs % n_local:
        raise ValueError(
            f"config.train.eval_batch_size = {ebs} must be a positive multiple of the {n_local} "
            "devices of this process."
        )
    bad = [w for w in config.model.widths if w <= 0 or w % 16]
    if bad:
        raise ValueError(f"config.model.widths must be positive multiples of 16, got {bad}.")
    expected = config.data.expected_frames
    if expected and schedule.n_frames != expected:
        raise ValueError(
            f"The data have {schedule.n_frames} frames but config.data.expected_frames is "
            f"{expected}."
        )
    if config.model.n_early >= schedule.n_frames:
        raise ValueError(
            f"config.model.n_early = {config.model.n_early} leaves no frame to predict in a "
            f"{schedule.n_frames}-frame schedule."
        )
    multiple = 2 ** (len(config.model.widths) - 1)
    if shape[0] % multiple or shape[1] % multiple:
        raise ValueError(
            f"Slices of {shape[0]}×{shape[1]} do not divide by {multiple}, the U-Net's size "
            f"multiple for {len(config.model.widths)} levels."
        )
    if config.loss.kind not in ("paper", "paper_faithful"):
        raise ValueError(
            f"config.loss.kind must be 'paper' or 'paper_faithful', got {config.loss.kind!r}."
        )
    if config.loss.patlak_slope not in ("reference", "prediction"):
        raise ValueError("config.loss.patlak_slope must be 'reference' or 'prediction'.")
    if config.loss.get("patlak_frames", "model") not in ("model", "splice"):
        raise ValueError("config.loss.patlak_frames must be 'model' or 'splice'.")
    if config.model.get("input_norm", "none") not in ("none", "plasma"):
        raise ValueError(
            f"config.model.input_norm must be 'none' or 'plasma', got {config.model.input_norm!r}."
        )
    curve_frames = config.model.get("curve_frames", 0)
    if curve_frames not in (0, schedule.n_frames):
        raise ValueError(
            f"config.model.curve_frames must be 0 (the paper) or the schedule's "
            f"{schedule.n_frames} frames (the head sees the plasma input's mean over each "
            f"frame), got {curve_frames!r}."
        )
    early_weight = config.loss.get("early_weight", 0.0)
    if not (isinstance(early_weight, (int, float)) and math.isfinite(early_weight)) or (
        early_weight < 0
    ):
        raise ValueError(
            f"config.loss.early_weight must be a finite number >= 0, got {early_weight!r}."
        )
    early_steps = config.loss.get("early_weight_steps", 0)
    if not isinstance(early_steps, int) or early_steps < 0:
        raise ValueError(
            f"config.loss.early_weight_steps must be an integer >= 0, got {early_steps!r}."
        )
    sat_weight = config.loss.get("saturation_weight", 0.0)
    sat_margin = config.loss.get("saturation_margin", 5.0)
    for name, value in (("saturation_weight", sat_weight), ("saturation_margin", sat_margin)):
        if not (isinstance(value, (int, float)) and math.isfinite(value)) or value < 0:
            raise ValueError(f"config.loss.{name} must be a finite number >= 0, got {value!r}.")
    if sat_weight > 0 and (
        config.model.kind != "kinetic" or config.model.activation not in models.BOUNDED_ACTIVATIONS
    ):
        raise ValueError(
            "config.loss.saturation_weight > 0 guards the scaled sigmoids of the kinetic model's "
            f"head; it does not apply to model.kind = {config.model.kind!r} with activation "
            f"{config.model.activation!r}."
        )
    trials = config.train.get("init_trials", 1)
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"config.train.init_trials must be an integer >= 1, got {trials!r}.")
    trial_steps, num_steps = config.train.get("init_trial_steps", 200), config.train.num_steps
    if trials > 1 and (not isinstance(trial_steps, int) or not 1 <= trial_steps <= num_steps):
        raise ValueError(
            f"config.train.init_trial_steps must be an integer from 1 to num_steps = {num_steps} "
            f"when init_trials > 1, got {trial_steps!r}."
        )
    if config.optim.name not in ("adam", "rmsprop"):
        raise ValueError(
            f"config.optim.name must be 'adam' or 'rmsprop', got {config.optim.name!r}."
        )


# -------------------------------------------------------------------------------- optimiser ---
def learning_rate_schedule(optim: ml_collections.ConfigDict):
    """Paper: lr ÷10 every `decay_every` steps with a floor (staircase exponential decay)."""
    return optax.exponential_decay(
        init_value=optim.learning_rate,
        transition_steps=optim.decay_every,
        decay_rate=optim.decay_factor,
        staircase=True,
        end_value=optim.min_lr,
    )


def make_optimizer(optim: ml_collections.ConfigDict) -> optax.GradientTransformationExtraArgs:
    """Adam with the paper's step schedule, or RMSprop with plateau reduction (authors' code)."""
    parts = []
    if optim.grad_clip:
        parts.append(optax.clip_by_global_norm(optim.grad_clip))
    if optim.name == "adam":
        parts.append(optax.adam(learning_rate_schedule(optim)))
    else:
        parts.append(optax.rmsprop(optim.learning_rate))
        parts.append(
            optax.contrib.reduce_on_plateau(
                factor=optim.plateau_factor,
                patience=optim.plateau_patience,
                min_scale=optim.plateau_min_scale,
            )
        )
    return optax.chain(*parts)


# ------------------------------------------------------------------------------ model + state ---
def create_model(config: ml_collections.ConfigDict):
    return models.build_model(config.model, rngs=nnx.Rngs(config.seed))


def create_train_state(config: ml_collections.ConfigDict):
    """(graphdef, tx, state): state = {step, params, opt_state, rng}, a plain pytree.

    The initialisation is one jitted program (op by op it took 9.9 s for the demo model on
    2 cores, jitted 6.6 s); the values are the same bits as eager initialisation.
    """
    tx = make_optimizer(config.optim)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: create_model(config)))

    @jax.jit
    def init():
        _, params = nnx.split(create_model(config))
        return params, tx.init(params)

    params, opt_state = init()
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": opt_state,
        "rng": jax.random.key_data(jax.random.key(config.seed)),
    }
    return graphdef, tx, state


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
    if config.model.get("input_norm", "none") == "plasma":
        t_end = float(schedule.end[config.model.n_early - 1])
        scale = plasma_scale(inp, t_end).astype(frames_early.dtype)  # [B] SUV
        x = frames_early / scale[:, None, None, None]
    curve = None
    if config.model.get("curve_frames", 0):
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
    weight = float(config.loss.get("early_weight", 0.0))
    steps = int(config.loss.get("early_weight_steps", 0))
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
    if config.loss.get("patlak_frames", "model") == "splice":
        # The measured early frames followed by the predicted late ones (a no-op for the direct
        # model, whose prediction is already this splice).
        pred = losses.splice(batch["frames"], pred, config.model.n_early)
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

    sat_weight = float(config.loss.get("saturation_weight", 0.0))
    sat_margin = float(config.loss.get("saturation_margin", 5.0))

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
        x, cp = losses.patlak_coordinates(inp, schedule)
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
        x, cp = losses.patlak_coordinates(inp, schedule)
        loss, _ = compute_loss(pred, batch, x, cp, config, schedule)
        return pred, pmap, loss

    return jax.jit(eval_step)


# ---------------------------------------------------------------------------------- devices ---
def host_device_plan(cpu_devices: int, batch_size: int, cores: int) -> int:
    """How many single-threaded CPU devices `config.train.cpu_devices` asks for (0: none).

    -1 (auto) gives one device per core when 2 ≤ cores ≤ batch and the cores divide the batch
    (2 cores: XLA's threaded convolutions use ≈ 1.6 of them, two single-threaded data-parallel
    devices ≈ 2: 0.60 vs 0.70 s per demo step); otherwise XLA's default.
    """
    if cpu_devices == -1:
        return cores if 2 <= cores <= batch_size and batch_size % cores == 0 else 0
    if cpu_devices < 0:
        raise ValueError(f"train.cpu_devices must be -1 (auto), 0 or a count, got {cpu_devices}.")
    return cpu_devices


def configure_host_devices(config) -> int:
    """Apply `config.train.cpu_devices` before JAX initialises its backends; returns the count.

    Sets `jax_num_cpu_devices` and turns off XLA:CPU's intra-op threads (each device then runs
    on its own thread, as many threads as cores). Does nothing when the user already chose a
    device count in XLA_FLAGS, or in multi-process runs. Raises if the backends already exist.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    n = host_device_plan(int(config.train.get("cpu_devices", 0)), config.data.batch_size, cores)
    if n == 0 or "xla_force_host_platform_device_count" in flags or config.train.multiprocess:
        return 0
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError as err:
        raise RuntimeError(
            "train.cpu_devices must be applied before JAX starts its backends (before the "
            "first array or jax.devices() call)."
        ) from err
    if "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return n


def make_mesh():
    """1-D mesh over every device, axis 'data' (Auto axis type: XLA propagates shardings)."""
    return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(batch, sharding):
    """Process-local numpy batch -> global arrays sharded over the 'data' axis."""
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
        for k in BATCH_KEYS
    }


# ------------------------------------------------------------------------------------- data ---
def build_cohort(config, workdir: pathlib.Path):
    """The cohort: `config.data.root` (BIDS), or a cohort simulated once into workdir/data."""
    root = config.data.root
    if not root:
        root = workdir / "data"
        # Only process 0 decides and writes; participants.tsv is written last.
        if jax.process_index() == 0 and not (root / "participants.tsv").exists():
            from kinetix import simulate
            from kinetix.data.phantom import SimulationConfig

            logging.info(
                "No data root: simulating %d subjects into %s", config.data.sim_subjects, root
            )
            cfg = SimulationConfig(
                size=config.data.sim_size,
                slices=config.data.sim_slices,
                noise=config.data.sim_noise,
                counts_per_slice=config.data.sim_counts_per_slice,
                noise_scale=config.data.sim_noise_scale,
            )
            simulate.simulate_cohort(
                root, config.data.sim_subjects, config.seed, cfg, overwrite=True
            )
        if jax.process_count() > 1:
            # Every process waits, simulated or not: one that saw participants.tsv and skipped
            # the barrier would leave process 0 waiting in it forever.
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("kinetix: simulated cohort written")
    return pipeline.Cohort.from_bids(root)


def split_seed(config) -> int:
    """The subject split's seed: ``config.data.split_seed``, or ``config.seed`` when it is < 0."""
    seed = int(config.data.get("split_seed", -1))
    return int(config.seed) if seed < 0 else seed


def split_cohort(config, cohort):
    return pipeline.split_subjects(
        cohort.subjects,
        val_fraction=config.data.val_fraction,
        test_fraction=config.data.test_fraction,
        seed=split_seed(config),
        val=list(config.data.val_subjects) or None,
        test=list(config.data.test_subjects) or None,
    )


# ------------------------------------------------------------------------------------- loop ---
def _check_finite(step, metrics):
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
        raise FloatingPointError(
            f"Non-finite {', '.join(bad)} at step {step}; lower config.optim.learning_rate or "
            "set config.optim.grad_clip, then rerun (the run resumes from the last checkpoint)."
        )


def evaluate_loss(eval_step, params, cohort, subjects, config, sharding):
    """The objective's mean over every body voxel of ``subjects`` (the run's val_loss).

    Each batch's loss (`make_eval_step`: a mean over the batch's body voxels) is weighted by the
    batch's body-voxel count (`loss_mask`), so the value is the same whatever the batch size
    and the number of devices or processes (up to float32 summation order). With P processes a
    global batch holds P × ``train.eval_batch_size`` slices; every process reads and feeds only
    its own block of them (process 0's first, `pipeline.eval_batches` with shard_index /
    shard_count), so no process repeats another's reading or work, and the blocks' body-voxel
    counts are summed across processes (one all-gather at the end).
    """
    index, count = jax.process_index(), jax.process_count()
    weights, losses = [], []
    for block in pipeline.eval_batches(
        cohort,
        subjects,
        int(config.train.eval_batch_size),
        input_points=config.data.input_points,
        mask_threshold=config.data.mask_threshold,
        shard_index=index,
        shard_count=count,
    ):
        weights.append(float(np.sum(loss_mask(block))))
        # Kept on device: no host round trip per batch, so reading the next batch overlaps
        # this one's computation (fetched once, below).
        losses.append(eval_step(params, shard_batch(block, sharding))[2])
    losses = np.asarray(jax.device_get(losses), np.float64)
    weights = np.asarray(weights)  # this process's body voxels per global batch
    if count > 1:
        from jax.experimental import multihost_utils

        # Gathered as float32 (exact while a block holds < 2^24 voxels), summed in float64.
        gathered = multihost_utils.process_allgather(weights.astype(np.float32))
        weights = np.asarray(gathered, np.float64).sum(axis=0)
    if weights.sum() == 0:
        raise ValueError(
            f"The validation subjects {list(subjects)} have no body voxels (mask threshold "
            f"{config.data.mask_threshold}): there is nothing to validate on."
        )
    real = weights > 0  # an all-padding batch's loss is 0/0
    return float(np.sum(losses[real] * weights[real]) / weights.sum())


def run_init_trials(
    config, train_step, eval_step, first, make_iterator, cohort, val_subjects, shardings
):
    """Train ``config.train.init_trials`` initialisations briefly and keep the best one.

    Trial k starts from the initialisation of seed ``config.seed + k`` (trial 0 is the plain
    run's) and trains ``config.train.init_trial_steps`` steps on a fresh iterator, so every trial
    sees the same batches. The winner has the lowest loss on the validation subjects
    (`evaluate_loss`, the run's val_loss); it goes on with its own optimiser state and iterator,
    so the rest of the run is the plain run of that initialisation. Trials whose validation loss
    is not finite lose. With several processes, process 0's choice is broadcast.

    Args:
      config: the resolved config.
      train_step, eval_step: `make_train_step` / `make_eval_step` (one graphdef serves every
        seed).
      first: (state, iterator) of trial 0, the run's own fresh state (replicated) and
        untouched iterator, so that they are not built twice.
      make_iterator: () -> a fresh training iterator, for the other trials.
      cohort, val_subjects: the data and the validation subjects (at least one).
      shardings: (mesh, data sharding, replicated sharding).

    Returns:
      (state, iterator, trials): the winning state and its iterator, and one record per trial,
      {"trial", "init_seed", "steps", "loss" (its last training loss), "val_loss", "chosen"}.
    """
    mesh, data_sharding, replicated = shardings
    n, steps = int(config.train.init_trials), int(config.train.init_trial_steps)
    trials, best = [], None
    for k in range(n):
        seed = int(config.seed) + k
        if k == 0:
            state, iterator = first
        else:
            trial_config = config.copy_and_resolve_references()
            trial_config.seed = seed
            state = jax.device_put(create_train_state(trial_config)[2], replicated)
            iterator = make_iterator()
        with jax.set_mesh(mesh):
            for _ in tqdm(
                range(steps),
                desc=f"init trial {k + 1}/{n} (seed {seed})",
                disable=jax.process_index() != 0,
                dynamic_ncols=True,
                leave=False,
            ):
                state, metrics = train_step(state, shard_batch(next(iterator), data_sharding))
            val = evaluate_loss(
                eval_step, state["params"], cohort, val_subjects, config, data_sharding
            )
        record = {
            "trial": k,
            "init_seed": seed,
            "steps": steps,
            "loss": float(jax.device_get(metrics["loss"])),
            "val_loss": val,
        }
        logging.info(
            "Init trial %d/%d (seed %d): val loss %.5g", k + 1, n, record["init_seed"], val
        )
        trials.append(record)
        score = val if math.isfinite(val) else math.inf
        if best is None or score < best[0]:
            best = (score, k, state, iterator)
    chosen = best[1]
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
        if chosen != best[1]:
            raise RuntimeError(
                f"Process {jax.process_index()} chose init trial {best[1]} but process 0 chose "
                f"{chosen}: the validation losses differ between processes."
            )
    for record in trials:
        record["chosen"] = record["trial"] == chosen
    logging.info("Continuing init trial %d (seed %d).", chosen + 1, trials[chosen]["init_seed"])
    return best[2], best[3], trials


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir, provenance_kw: dict | None = None
) -> dict:
    """Train (resuming from workdir if it holds a checkpoint), then evaluate held-out subjects.

    Args:
      config: the resolved config.
      workdir: the run directory.
      provenance_kw: passed to `provenance.write` (e.g. `config_file` and `overrides` of the
        command line, so that `provenance.command_line` can rebuild it).
    """
    from kinetix import checkpoint, provenance

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cohort = build_cohort(config, workdir)
    schedule = cohort.schedule
    validate_config(config, schedule, cohort.shape)
    splits = split_cohort(config, cohort)
    with_trials = config.train.get("init_trials", 1) > 1
    if with_trials and not splits["val"]:
        raise ValueError(
            "config.train.init_trials > 1 chooses an initialisation by the validation loss, but "
            "the split has no validation subjects (config.data.val_fraction / val_subjects)."
        )

    def write_run_files():
        provenance.write(workdir, config, extra={"splits": splits}, **(provenance_kw or {}))
        (workdir / "splits.json").write_text(json.dumps(splits, indent=1))
        (workdir / "schedule.json").write_text(
            json.dumps(
                {"start": schedule.start.tolist(), "end": schedule.end.tolist(), "units": "min"}
            )
        )

    logging.info(
        "Subjects: %d train, %d val, %d test", *(len(splits[k]) for k in ("train", "val", "test"))
    )

    mesh = make_mesh()
    data_sharding = NamedSharding(mesh, P("data"))
    replicated = NamedSharding(mesh, P())
    graphdef, tx, state = create_train_state(config)
    state = jax.device_put(state, replicated)
    train_step = make_train_step(graphdef, tx, config, schedule)
    eval_step = make_eval_step(graphdef, config, schedule)

    per_process = config.data.batch_size // jax.process_count()

    def make_iterator():
        return pipeline.slice_dataset(
            cohort,
            splits["train"],
            per_process,
            seed=config.seed,
            shuffle=True,
            shard_index=jax.process_index(),
            shard_count=jax.process_count(),
            input_points=config.data.input_points,
            mask_threshold=config.data.mask_threshold,
            prefetch=config.data.prefetch,
            worker_count=config.data.worker_count,
        )

    train_iter = make_iterator()
    ckpt = checkpoint.Checkpointer(
        workdir / "checkpoints",
        save_interval_steps=config.train.checkpoint_every_steps,
        keep=config.train.keep_checkpoints,
        keep_steps=config.train.get("keep_checkpoint_steps", ()),
    )
    num_steps = int(config.train.num_steps)
    history = []
    try:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        restored = ckpt.restore_latest(abstract, train_iter)
        if restored is not None:
            start, state = restored
            logging.info("Resumed from step %d in %s", start, workdir)
        else:
            start = 0
        # Written after the restore, so a rerun with a mismatching model leaves the run's
        # files alone; an evaluation-only rerun (nothing left to train) keeps the training
        # run's config.json and provenance.json (they describe how the weights were made).
        if jax.process_index() == 0:
            if restored is not None and start >= num_steps:
                logging.info(
                    "Nothing to train (checkpoint at step %d, num_steps %d): evaluation only; "
                    "config.json and provenance.json of the training run are kept.",
                    start,
                    num_steps,
                )
            else:
                write_run_files()
        if restored is None and with_trials:
            state, train_iter, trials = run_init_trials(
                config,
                train_step,
                eval_step,
                (state, train_iter),
                make_iterator,
                cohort,
                splits["val"],
                (mesh, data_sharding, replicated),
            )
            if jax.process_index() == 0:
                (workdir / "init_trials.json").write_text(json.dumps(trials, indent=1))
            # A resumed run continues the winner instead of repeating the trials.
            ckpt.save(int(jax.device_get(state["step"])), state, train_iter, force=True)
        metrics_path = workdir / "metrics.jsonl"
        writer = open(metrics_path, "a") if jax.process_index() == 0 else None  # noqa: SIM115
        try:
            start = int(jax.device_get(state["step"]))
            bar = tqdm(
                total=num_steps,
                initial=start,
                desc=f"train {config.name}",
                disable=jax.process_index() != 0 or start >= num_steps,
                dynamic_ncols=True,
            )
            t_last, s_last = time.perf_counter(), start
            in_flight = None  # the previous step's metrics: one step runs while the next is fed
            with jax.set_mesh(mesh):
                for step in range(start + 1, num_steps + 1):
                    batch = shard_batch(next(train_iter), data_sharding)
                    if step == start + 1:
                        logging.info("Compiling the first step…")
                        t0 = time.perf_counter()
                    state, metrics = train_step(state, batch)
                    if step == start + 1:
                        jax.block_until_ready(state)
                        logging.info("First step took %.1f s", time.perf_counter() - t0)
                    if in_flight is not None:
                        # Count finished steps, not dispatched ones (steps run asynchronously).
                        jax.block_until_ready(in_flight)
                        bar.update(1)
                    in_flight = metrics
                    last = step == num_steps
                    if step % config.train.log_every_steps == 0 or last:
                        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                        _check_finite(step, m)
                        now = time.perf_counter()
                        m["steps_per_sec"] = (step - s_last) / max(now - t_last, 1e-9)
                        t_last, s_last = now, step
                        if step % config.train.eval_every_steps == 0 or last:
                            if splits["val"]:
                                m["val_loss"] = evaluate_loss(
                                    eval_step,
                                    state["params"],
                                    cohort,
                                    splits["val"],
                                    config,
                                    data_sharding,
                                )
                        record = {"step": step, **m}
                        history.append(record)
                        if writer:
                            writer.write(json.dumps(record) + "\n")
                            writer.flush()
                        bar.set_postfix(loss=f"{m['loss']:.4g}", refresh=False)
                    ckpt.save(step, state, train_iter, force=last)
                    if ckpt.reached_preemption(step):
                        ckpt.wait()
                        logging.warning("Preemption at step %d: checkpoint written, exiting.", step)
                        return {"preempted_at": step}
                if in_flight is not None:
                    jax.block_until_ready(in_flight)
                    bar.update(1)
            bar.close()
        finally:
            if writer:
                writer.close()
        ckpt.wait()
    finally:
        ckpt.close()

    result = {"history": history, "final_step": num_steps}
    if config.eval.run_after_training:
        from kinetix import evaluate

        if jax.process_index() == 0:
            # The evaluation reads every test slice on one host and writes files: process 0 runs
            # it on its own devices (no collective, so the others need not feed batches).
            local_mesh = jax.make_mesh(
                (jax.local_device_count(),),
                ("data",),
                axis_types=(jax.sharding.AxisType.Auto,),
                devices=jax.local_devices(),
            )
            params = jax.device_put(local_copy(state["params"]), NamedSharding(local_mesh, P()))
            predict_fn = make_predict_fn(eval_step, params, NamedSharding(local_mesh, P("data")))
            result["eval"] = evaluate.evaluate_run(
                config,
                workdir,
                cohort,
                splits["test"],
                predict_fn,
                step=int(local_copy(state["step"])),
            )
        if jax.process_count() > 1:  # the others wait until the report is written
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("kinetix: evaluation written")
    return result


def local_copy(tree):
    """Host (NumPy) copy of a pytree of fully replicated, possibly multi-process, arrays."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def make_predict_fn(eval_step, params, sharding):
    """numpy batch -> {"frames": [B,H,W,T], "params": [B,H,W,5] or None} (host arrays)."""

    def predict_fn(batch):
        pred, pmap, _ = eval_step(params, shard_batch(batch, sharding))
        return {
            "frames": np.asarray(jax.device_get(pred)),
            "params": None if pmap is None else np.asarray(jax.device_get(pmap)),
        }

    return predict_fn


def load_config(workdir) -> ml_collections.ConfigDict:
    """The config a run was trained with (workdir/config.json)."""
    path = pathlib.Path(workdir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: is {workdir} a kinetix training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def checkpoint_steps(workdir) -> list[int]:
    """Steps of the checkpoints in ``workdir/checkpoints``, ascending (empty if none)."""
    from kinetix import checkpoint

    directory = pathlib.Path(workdir) / "checkpoints"
    if not directory.is_dir():
        return []
    with checkpoint.Checkpointer(directory, save_interval_steps=1) as ckpt:
        return ckpt.all_steps()


def restore_params(config, workdir, step: int | None = None):
    """(graphdef, params) of a checkpoint in workdir (the latest, or ``step``), restored into an
    abstract target.

    Raises:
      FileNotFoundError: workdir holds no checkpoint.
      ValueError: there is no checkpoint at ``step`` (the sentence lists those there are), or
        the checkpoint does not match the config's model.
    """
    from kinetix import checkpoint

    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    graphdef, _, state = create_train_state(config)
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state
    )
    ckpt = checkpoint.Checkpointer(
        pathlib.Path(workdir) / "checkpoints",
        save_interval_steps=1,
        keep=config.train.keep_checkpoints,
        with_data=True,
    )
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise FileNotFoundError(f"{workdir} holds no checkpoint: train it first.")
        restored = ckpt.restore(steps[-1] if step is None else step, abstract)
    finally:
        ckpt.close()
    return graphdef, restored["params"]


def load_for_inference(workdir, data_root=None, step: int | None = None):
    """(config, predict_fn, cohort, splits) of a trained workdir; `data_root` overrides the data,
    `step` picks a checkpoint (default: the latest).

    Raises:
      FileNotFoundError: no config.json or no checkpoint in workdir.
      ValueError: the data do not fit the trained configuration.
    """
    workdir = pathlib.Path(workdir)
    config = load_config(workdir)
    if data_root:
        cohort = pipeline.Cohort.from_bids(data_root)
    else:
        cohort = build_cohort(config, workdir)
    validate_config(config, cohort.schedule, cohort.shape)
    splits_path = workdir / "splits.json"
    if data_root or not splits_path.exists():
        splits = {"train": [], "val": [], "test": list(cohort.subjects)}
    else:
        splits = json.loads(splits_path.read_text())
    graphdef, params = restore_params(config, workdir, step)
    mesh = make_mesh()
    eval_step = make_eval_step(graphdef, config, cohort.schedule)
    return (
        config,
        make_predict_fn(eval_step, params, NamedSharding(mesh, P("data"))),
        cohort,
        splits,
    )
