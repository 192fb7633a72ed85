""" "Without model" ablation (Liang et al. 2023): predict the late SUV frames directly.

Same backbone and pointwise head as `KineticNet`, but the head outputs the ``n_late`` late frames
(paper: 6 frames, 35–65 min) per voxel with no final activation and no kinetic model.
"""

from collections.abc import Sequence

from flax import nnx

from kinetix.models.kinetic_net import PAPER_HEAD_HIDDEN, EarlyFramesNet
from kinetix.models.unet import PAPER_WIDTHS


class DirectNet(EarlyFramesNet):
    """Early frames [B, H, W, n_early] → late frames [B, H, W, n_late] (SUV), unbounded.

    Args:
      n_early: input frames (paper: 22).
      n_late: predicted late frames (paper: 6).
      features_per_frame, widths, residual, head_hidden, dtype: as `KineticNet`.
      init_params: optional ``n_late`` values for the final bias (None: zero bias).
      n_curve: extra per-example head inputs (see `EarlyFramesNet`; default 0, the paper).
      rngs: NNX random streams.
    """

    def __init__(
        self,
        *,
        n_early: int = 22,
        n_late: int = 6,
        features_per_frame: int = 10,
        widths: Sequence[int] = PAPER_WIDTHS,
        residual: bool = True,
        head_hidden: Sequence[int] = PAPER_HEAD_HIDDEN,
        init_params: Sequence[float] | None = None,
        n_curve: int = 0,
        dtype=None,
        rngs: nnx.Rngs,
    ) -> None:
        if not isinstance(n_late, int) or n_late <= 0:
            raise ValueError(f"DirectNet n_late must be a positive integer, got {n_late!r}.")
        super().__init__(
            n_early=n_early,
            n_out=n_late,
            features_per_frame=features_per_frame,
            widths=widths,
            residual=residual,
            head_hidden=head_hidden,
            activation="none",
            init_params=init_params,
            n_curve=n_curve,
            dtype=dtype,
            rngs=rngs,
        )
        self.n_late = n_late
