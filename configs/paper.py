"""The paper's hyperparameters (Liang et al. 2023): paper scale, Adam 1e-4 ÷10 every 10k steps
(floor 1e-7), 10 epochs of 7171 iterations, batch 1, U-Net 64…1024, whole blood = plasma.

    python -m kinetix.train --config configs/paper.py --workdir runs/paper \
        --config.data.root=/path/to/bids

Expected run time: GPU only. On one H200 a step on a 256×256 slice (the paper's matrix) takes
65.5 ms (measured, launch/README.md), so the 71 710 steps take about 80 min plus evaluation.
"""

from kinetix.training.config import sibling_config

default = sibling_config(__file__, "default")


def get_config():
    config = default.get_config()
    config.name = "paper"
    config.data.batch_size = 1
    config.kinetics.use_whole_blood = False  # the paper uses Cp for the vascular term
    config.model.init_params = None  # mid-range initial parameters (zero final bias)
    return config
