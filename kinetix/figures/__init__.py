"""All plotting of kinetix (matplotlib's object API; NumPy in, PNG files out).

- `common`: saving a figure, colours, metric display names;
- `ki`: Ki maps, TAC / Patlak plots, Bland–Altman, per-tissue 2TCM parameters, per-subject boxes;
- `evaluation`: which slices and ROIs an evaluation report draws, and `write_figures`;
- `training`: the loss curve of a run.

This package imports NumPy, matplotlib and `kinetix.kinetics` only: every number drawn is
computed by the caller.
"""

from kinetix.figures.common import COLOURS, METRIC_TITLES, save
from kinetix.figures.evaluation import (
    ORGAN_PREFERENCE,
    figure_quota,
    organ_roi,
    pick_slices,
    tumour_roi,
    write_figures,
)
from kinetix.figures.ki import (
    plot_bland_altman,
    plot_ki_maps,
    plot_per_subject,
    plot_tac_patlak,
    plot_tissue_params,
    tissue_param_panels,
)
from kinetix.figures.training import plot_loss_curve, read_metrics_jsonl

__all__ = [
    "COLOURS",
    "METRIC_TITLES",
    "ORGAN_PREFERENCE",
    "figure_quota",
    "organ_roi",
    "pick_slices",
    "plot_bland_altman",
    "plot_ki_maps",
    "plot_loss_curve",
    "plot_per_subject",
    "plot_tac_patlak",
    "plot_tissue_params",
    "read_metrics_jsonl",
    "save",
    "tissue_param_panels",
    "tumour_roi",
    "write_figures",
]
