"""A tiny CPU configuration for tests and CI: seconds per run.

python -m kinetix.train --config configs/smoke.py --workdir /tmp/kinetix-smoke
"""

from kinetix.training.config import sibling_config

default = sibling_config(__file__, "default")


def get_config():
    config = default.get_config()
    config.name = "smoke"
    config.model.widths = (16, 32)
    config.model.features_per_frame = 2
    config.model.head_hidden = (16,)
    config.data.sim_subjects = 4
    config.data.sim_slices = 2
    config.data.sim_size = 16
    config.data.sim_noise = "image"
    config.data.val_fraction = 0.25
    config.data.test_fraction = 0.25
    config.data.batch_size = 4
    config.data.input_points = 64
    config.optim.learning_rate = 1e-3
    config.train.num_steps = 4
    config.train.log_every_steps = 2
    config.train.eval_every_steps = 4
    config.train.checkpoint_every_steps = 2
    config.train.eval_batch_size = 4
    config.eval.max_figures = 1
    config.eval.fit_2tcm = False  # the 2TCM-fit routes cost a compilation; tested on their own
    return config
