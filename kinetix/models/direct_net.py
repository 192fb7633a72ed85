""" "Without model" ablation (Liang et al. 2023): predict the late SUV frames directly.

Same backbone and pointwise head as `KineticNet`, but the head outputs the ``n_late`` late frames
(paper: 6 frames, 35–65 min) per voxel with no final activation and no kinetic model.
"""

from collections.abc import Sequence

from flax import nnx

from kinetix.models.backbone import PAPER_BACKBONE, Backbone
from kinetix.models.kinetic_net import EarlyFramesNet

PAPER_N_LATE = 6
"""Late frames the paper's ablation predicts (35–65 min)."""


class DirectNet(EarlyFramesNet):
    """Early frames [B, H, W, n_early] → late frames [B, H, W, n_late] (SUV), unbounded.

    Args:
      backbone: the shared architecture (`Backbone`), default the paper's.
      n_late: predicted late frames (paper: 6).
      init_params: optional ``n_late`` values for the final bias (None: zero bias).
      rngs: NNX random streams.
    """

    def __init__(
        self,
        backbone: Backbone = PAPER_BACKBONE,
        *,
        n_late: int = PAPER_N_LATE,
        init_params: Sequence[float] | None = None,
        rngs: nnx.Rngs,
    ) -> None:
        if not isinstance(n_late, int) or n_late <= 0:
            raise ValueError(f"DirectNet n_late must be a positive integer, got {n_late!r}.")
        super().__init__(
            backbone, n_out=n_late, activation="none", init_params=init_params, rngs=rngs
        )
        self.n_late = n_late
