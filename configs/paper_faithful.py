"""What the authors' public code does (their training script; docs/conventions.md), for
like-for-like comparison: no residual skips, Hardsigmoid to [0, 1] for all five parameters, frames
as point samples at frame start without decay, the Patlak-line loss with Huber δ = 20, RMSprop with
plateau reduction.

    python -m kinetix.train --config configs/paper_faithful.py --workdir runs/paper_faithful \
        --config.data.root=/path/to/bids

Expected run time: as configs/paper.py (GPU).
"""

from kinetix.training.config import sibling_config

paper = sibling_config(__file__, "paper")


def get_config():
    config = paper.get_config()
    config.name = "paper_faithful"
    config.model.residual = False
    config.model.activation = "hardsigmoid"
    config.model.point_samples = True
    config.loss.kind = "paper_faithful"
    config.optim.name = "rmsprop"
    return config
