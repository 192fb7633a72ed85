"""The corrected method at paper scale (GPU).

    python -m kinetix.train --config configs/default.py --workdir runs/default \
        --config.data.root=/path/to/bids

Differences from the paper (see configs/paper.py) and the authors' code (paper_faithful.py):
exact decay-weighted frame integrals, physiological parameter bounds through a scaled sigmoid,
whole-blood curve for the vascular term when the data have one. Expected run time on one H100:
not yet measured (see launch/README.md); on CPU it is impractical (use configs/demo.py).
"""

import ml_collections

import kinetix.kinetics as kk


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.name = "default"
    config.seed = 0  # model init, data order and simulation seed

    config.model = m = ml_collections.ConfigDict()
    m.kind = "kinetic"  # 'kinetic' (U-Net + 2TCM head) or 'direct' (no-model ablation)
    m.widths = (64, 128, 256, 512, 1024)  # U-Net channel widths per level (multiples of 16)
    m.residual = True  # residual skips in DoubleConv (paper text: yes; authors' code: no)
    m.features_per_frame = 10  # U-Net output features per early frame
    m.n_early = kk.N_EARLY_FRAMES  # input frames (0–35 min)
    m.head_hidden = (256, 128, 128, 64)  # pointwise head widths (1×1 convs)
    # 'scaled_sigmoid' (physiological bounds), 'log_scaled_sigmoid' (the same bounds on a log
    # scale: equal relative steps over the range; lower bounds log_bounds_lower) or
    # 'hardsigmoid' (the authors' code, all in [0, 1]).
    m.activation = "scaled_sigmoid"
    m.bounds_lower = (0.0, 0.0, 0.0, 0.0, 0.0)  # fv, K1, k2, k3, k4 lower bounds
    m.bounds_upper = (1.0, 2.0, 3.0, 1.0, 0.2)  # upper bounds (K1 mL/min/mL, k 1/min)
    m.log_bounds_lower = (1e-3, 1e-3, 1e-3, 1e-4, 1e-5)  # lower bounds of the log scale (> 0)
    m.init_params = (0.05, 0.1, 0.2, 0.05, 0.005)  # head output at init: typical soft tissue
    # What the head's bounded outputs are: 'rates' (the paper: fv, K1, k2, k3, k4 within the
    # bounds above) or 'macro' (fv, K1, Vd = K1/(k2+k3), E = k3/(k2+k3), k4 within the macro
    # bounds, converted to rates by kk.rates_from_macro; Vd in mL/mL, E unitless) or
    # 'uncoupled' (fv, K1v = (1 − fv)·K1, k2, k3, k4 within the rate bounds, converted by
    # kk.rates_from_uncoupled: the tissue term's gradient does not vanish as fv → 1).
    m.parameterization = "rates"
    m.macro_bounds_lower = (0.0, 0.0, 0.05, 0.0, 0.0)
    m.macro_bounds_upper = (1.0, 2.0, 2.0, 1.0, 0.2)
    m.point_samples = False  # True: frames as point samples at frame start, no decay (authors)
    m.dtype = "float32"  # compute dtype of the networks ('float32' or 'bfloat16')
    # Network input: 'none' (the paper: SUV frames) or 'plasma' (frames divided by the subject's
    # mean plasma SUV over the input window, training.plasma_scale).
    m.input_norm = "none"
    # Head inputs beside the U-Net features: 0 (the paper) or the schedule's frame count (28):
    # the subject's plasma input as its mean over each frame (÷ the plasma scale under
    # input_norm = "plasma"), the same for every voxel (training.curve_features).
    m.curve_frames = 0

    config.data = d = ml_collections.ConfigDict()
    d.root = ""  # BIDS-PET root; empty: a cohort simulated once into <workdir>/data
    # Which scan of each subject to take, by BIDS entity: comma-separated key-label pairs, e.g.
    # "ses-baseline,trc-18FFDG,rec-acdyn,run-1" (a key twice allows either label); "": every
    # scan (a subject with several is refused). docs/conventions.md, "Entities, scans and
    # blood recordings".
    d.entities = ""
    # The blood recording to read, e.g. "autosampler" (the label of *_recording-<label>_blood.tsv);
    # "": each subject's only recording, or "manual" when it has several.
    d.recording = ""
    d.sim_subjects = 24  # simulated cohort: number of subjects
    d.sim_slices = 8  # slices per simulated subject
    d.sim_size = 64  # matrix size of simulated slices
    d.sim_noise = "projection"  # 'projection' (Poisson + OSEM), 'image' (fast) or 'none'
    d.sim_counts_per_slice = 20e6  # projection noise: events per slice over the scan
    d.sim_noise_scale = 0.5  # image noise: scale s of the decay/duration-aware sigma
    d.val_fraction = 0.1  # subject-level split fractions (explicit lists override)
    d.test_fraction = 0.1
    d.split_seed = -1  # seed of the random subject split; < 0: config.seed
    d.val_subjects = ()  # explicit validation subject ids, e.g. ('sub-84', ...)
    d.test_subjects = ()  # explicit test subject ids
    d.batch_size = 8  # global batch of slices (divisible by the device count)
    d.input_points = 128  # knots of each subject's plasma curve in the training path
    d.mask_threshold = 0.05  # body mask: fraction of the subject's robust max mean SUV
    d.prefetch = 2  # batches prefetched by grain
    d.worker_count = 0  # grain worker processes (0: in the main process)
    d.expected_frames = 28  # frames per scan the config is written for (0: any)
    # Refuse implausible images and blood curves when reading (SUV range for the stated units,
    # blood sampling; docs/conventions.md, "Plausibility checks"); False: warn and go on.
    d.check_plausibility = True

    config.kinetics = k = ml_collections.ConfigDict()
    k.decay_constant = kk.F18_DECAY_CONSTANT  # 1/min, F-18
    k.t_star = 9.0  # start of the linear Patlak phase (min)
    k.use_whole_blood = True  # vascular term with the whole-blood curve when present

    config.loss = lo = ml_collections.ConfigDict()
    lo.kind = "paper"  # 'paper' (SUV + λ·Patlak differences) or 'paper_faithful' (authors' code)
    lo.huber_delta = 1.0  # Huber δ of the paper loss (SUV)
    lo.lambda_patlak = 100.0  # λ: Patlak-difference errors are ~100× smaller than SUV errors
    lo.patlak_slope = "reference"  # slope K in loss_diff: 'reference' (65-min Ki) or 'prediction'
    lo.faithful_delta = 20.0  # Huber δ of the authors' loss
    # Frames the Patlak terms see for the kinetic model: 'model' (all frames from the 2TCM, the
    # paper) or 'splice' (measured early + predicted late frames, the series the proposed Ki is
    # computed on, and what the direct ablation's loss sees anyway).
    lo.patlak_frames = "model"
    # Weight of a Huber term on the early (input) frames, which the kinetic model predicts too:
    # 0 is the paper (the early frames enter only through the Patlak term).
    lo.early_weight = 0.0
    # Steps the early-frame term lasts (0: all of training; N > 0: a warm-up over the first N
    # steps, after which, and in the validation loss, the objective is the paper's).
    lo.early_weight_steps = 0
    # Guard against saturated outputs of the kinetic head's scaled sigmoid: weight · mean of
    # max(|z| − margin, 0)² over the pre-activations z (0: off, the paper). Not in the
    # validation loss. At |z| = 5 the sigmoid's slope is 0.0066 (0.25 at 0); inside the margin
    # every output stays above lower + 0.0067 · (upper − lower) and below the mirror value.
    lo.saturation_weight = 0.0
    lo.saturation_margin = 5.0

    config.optim = o = ml_collections.ConfigDict()
    o.name = "adam"  # 'adam' (paper) or 'rmsprop' (authors' code)
    o.learning_rate = 1e-4  # initial learning rate
    o.decay_every = 10_000  # steps between ×decay_factor reductions (paper: 10k)
    o.decay_factor = 0.1
    o.min_lr = 1e-7  # floor of the step schedule (paper: 1e-7)
    o.plateau_patience = 5500  # rmsprop: ReduceLROnPlateau patience in steps (authors)
    o.plateau_factor = 0.1
    o.plateau_min_scale = 1e-4  # rmsprop: lr floor as a fraction of learning_rate (1e-8 / 1e-4)
    o.grad_clip = 0.0  # global-norm clipping (0: off)

    config.train = t = ml_collections.ConfigDict()
    t.num_steps = 71_710  # paper: 10 epochs × 7171 iterations
    t.log_every_steps = 100
    t.eval_every_steps = 5000
    t.checkpoint_every_steps = 1000
    t.keep_checkpoints = 3
    # Steps whose checkpoints are kept for good besides the newest keep_checkpoints (saved even
    # off checkpoint_every_steps), e.g. (2400, 4800) for a learning curve: evaluate each with
    # `python -m kinetix.evaluate --workdir W --step 2400` (writes W/eval-step2400).
    t.keep_checkpoint_steps = ()
    # Initialisation trials against degenerate starts (1: off, the paper): train init_trials
    # initialisations (seeds seed, seed + 1, ...) for init_trial_steps steps each on the same
    # batches, continue the one with the lowest validation loss (needs validation subjects).
    t.init_trials = 1
    t.init_trial_steps = 200
    # Slices per batch and process in validation and evaluation (a multiple of each process's
    # devices); the validation loss is a mean over body voxels and does not depend on it.
    t.eval_batch_size = 8
    t.multiprocess = False  # call jax.distributed.initialize() (also set by launchers)
    # Split a CPU into this many single-threaded XLA devices for data parallelism (0: XLA's
    # default, one multi-threaded device; -1: one per core when the cores divide the batch).
    # Only `python -m kinetix.train` applies it, before JAX starts its backends.
    t.cpu_devices = 0

    config.eval = e = ml_collections.ConfigDict()
    e.method = "ols"  # Patlak fit for the Ki maps ('ols' as the authors, or 'perpendicular')
    e.baseline_t_end = 35.0  # 30-min Patlak baseline: frames with mid-time in [t*, 35] min
    e.run_after_training = True  # evaluate the held-out subjects when training ends
    e.max_figures = 4  # slices drawn in the report figures
    # The baseline a kinetic modeller would try first: voxelwise 2TCM fits (kk.fit_2tcm) of the
    # measured frames of 0-35 min (Ki from the rates; the fit extrapolated to 65 min, then
    # Patlak) and of 0-65 min (a second reference), as extra Ki routes of the evaluation.
    e.fit_2tcm = True
    e.fit_weights = "duration"  # kk.frame_weights kind
    e.fit_starts = 2  # Patlak-seeded starts per voxel (kk.fit_starts)
    e.fit_max_steps = 100  # solver iterations per start
    e.fit_chunk_voxels = 4096  # voxels per jitted fit call
    # A 35-min protocol has no blood after 35 min: how the evaluation obtains Cp(t) for 35-65
    # min (docs/input.md): 'measured' (the blood as given), 'fit' (a Feng model fitted to the
    # blood of 0-35 min, extrapolated) or 'population' (the training subjects' median shape,
    # population_input.json, scaled to the subject's 0-35 min). The network, its Patlak term
    # and every Ki route but the full-hour references use the completed curve.
    e.late_input = "measured"
    # With 'fit' or 'population': > 0 adds one late plasma sample at this time (min), read off
    # the measured curve (a venous sample); 0: none.
    e.late_sample_min = 0.0
    return config
