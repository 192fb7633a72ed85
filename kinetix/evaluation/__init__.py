"""The held-out evaluation: Ki routes, image metrics, tables, the report, and the run itself.

- `routes`: the Ki routes as a registry (`ROUTES`, `register`; adding a route is one entry), the
  fit windows (`KiWindows`) and the batched Ki maps of every route;
- `metrics`: the authors' per-slice image metrics (SSIM, PSNR, NRMSE, NMI) and MS-SSIM in JAX;
- `tables`: which rows each comparison has, summaries, tumour ROIs, Bland–Altman, per tissue;
- `truth`: the simulator's ground truth of a cohort;
- `accumulate`: one batch's maps and the accumulators fed batch by batch;
- `report`: the printed table, `report.md` and the conventions;
- `run`: `evaluate_run` (a model on held-out subjects) and `evaluate_workdir` (a trained run
  directory: what `python -m kinetix.evaluate` does).

The figures are drawn by `kinetix.figures`.
"""

from kinetix.evaluation.routes import (
    ROUTES,
    KiWindows,
    Route,
    available_routes,
    method_labels,
    register,
    unregister,
)
from kinetix.evaluation.run import evaluate_run, evaluate_workdir

__all__ = [
    "ROUTES",
    "KiWindows",
    "Route",
    "available_routes",
    "evaluate_run",
    "evaluate_workdir",
    "method_labels",
    "register",
    "unregister",
]
