"""What every figure shares: saving a matplotlib `Figure`, colours, metric display names.

Figures are drawn with matplotlib's object API (`matplotlib.figure.Figure`, rendered by the Agg
canvas on `savefig`), so nothing in `kinetix.figures` touches pyplot's global state or needs a
display.
"""

import pathlib

from matplotlib.figure import Figure

DPI = 110
"""Resolution of every PNG written."""

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
"""Colour cycle of the methods in box plots."""

METRIC_TITLES = {
    "ssim": "SSIM",
    "psnr": "PSNR (dB)",
    "nrmse": "NRMSE",
    "nmi": "NMI",
    "ms_ssim": "MS-SSIM",
}
"""Display names of the image metrics (axes here, column heads in the evaluation's report)."""


def save(fig: Figure, path) -> None:
    """Writes `fig` to the PNG `path` (parent directories created) at `DPI`."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
