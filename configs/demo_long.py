"""The demo at 8× its training: the schedule on which the kinetic network overtakes the direct
ablation (docs/results.md, "9600 steps, three seeds").

    python -m kinetix.train --config configs/demo_long.py
    # the direct ablation on the same cohort and split, for the comparison:
    python -m kinetix.train --config configs/demo_long.py --workdir runs/demo_long_direct \\
        --config.data.root=runs/demo_long/data --config.model.kind=direct \\
        --config.model.input_norm=none --config.train.init_trials=1
    python -m kinetix.evaluate --workdir runs/demo_long --ablation_workdir runs/demo_long_direct

Everything as `configs/demo.py` (cohort, widths, loss, three initialisation trials) except the
schedule: 9600 steps at learning rate 1e-3, ÷ 10 at 6400 (the demo: 1200, ÷ 10 at 800).
Measured 2026-11-27/28 on 2-vCPU VMs (`benchmarks/demo_target.py --steps 9600`, both networks
side by side at ≈ 1.0–1.3 s per step, about 3 h for the pair; one network alone at the demo's
≈ 0.58 s per step would take about 1 h 40 min, estimated, not timed). Ki SSIM against the
65-min reference at 9600 steps, kinetic against direct: seed 0 0.8834 / 0.8861 (level),
seed 1 0.8776 / 0.8663, seed 2 0.8978 / 0.8843.
"""

from kinetix.training.config import sibling_config

demo = sibling_config(__file__, "demo")


def get_config():
    config = demo.get_config()
    config.name = "demo_long"
    config.train.num_steps = 9600
    config.optim.decay_every = 6400
    config.train.eval_every_steps = 800  # as in the measured runs (checkpoints: the demo's 400)
    return config
