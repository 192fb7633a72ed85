"""Simulate a BIDS-PET FDG thorax cohort with ground truth (`kinetix.data.phantom.cohort`).

    python -m kinetix.simulate --out DIR --subjects N [--seed S] [--size 64] [--slices 8]
        [--noise image|projection|none] [--counts_per_slice C] [--noise_scale s] [--overwrite]
        [--nopreview]
    python -m kinetix.simulate --config configs/demo.py --out DIR [--config.data.sim_size=32]

With --config, the cohort is the one `kinetix.train` simulates for that config (no data root):
subjects, seed, matrix, slices and noise come from the config and may not be given as flags.
"""

import pathlib
import time

from absl import flags
from ml_collections import config_flags

from kinetix import cli as cli_lib
from kinetix.data.bids import check_writable_dir, cut_scan
from kinetix.data.phantom.cohort import simulate_cohort, simulation_config, simulation_settings

PROG = "kinetix.simulate"
USAGE = "--out DIR (--subjects N [--seed S] [--size 64] ... | --config configs/X.py) [flags]"
COHORT_FLAGS = ("subjects", "seed", "size", "slices", "noise", "counts_per_slice", "noise_scale")


def define_flags(fv: flags.FlagValues, argv=()) -> None:
    """The command's flags, on its own `FlagValues` (`argv`: the command line being parsed)."""
    flags.DEFINE_string("out", None, "Output directory of the BIDS-PET cohort.", flag_values=fv)
    config_flags.DEFINE_config_file(
        "config",
        None,
        "A configs/*.py file: simulate the cohort it trains on.",
        flag_values=fv,
        lock_config=True,
        sys_argv=list(argv),
    )
    define = {"flag_values": fv}
    flags.DEFINE_integer("subjects", None, "Number of subjects (>= 1).", **define)
    flags.DEFINE_integer("seed", 0, "Random seed (non-negative integer).", **define)
    flags.DEFINE_integer("size", 64, "Image matrix size (pixels per side, >= 16).", **define)
    flags.DEFINE_integer("slices", 8, "Axial slices per subject (>= 1).", **define)
    flags.DEFINE_string("noise", "image", "Noise model: image, projection or none.", **define)
    flags.DEFINE_float("counts_per_slice", None, "Projection noise: prompts per slice.", **define)
    flags.DEFINE_float("noise_scale", None, "Image noise: scale s of the noise sigma.", **define)
    flags.DEFINE_bool("overwrite", False, "Replace the contents of a non-empty --out.", **define)
    flags.DEFINE_bool("progress", True, "Show a progress bar.", **define)
    flags.DEFINE_bool("preview", True, "Write a preview PNG per subject.", **define)
    flags.DEFINE_integer(
        "protocol_frames",
        None,
        "Keep only each scan's first N frames and no blood file: a short protocol as a clinic "
        "without arterial sampling has it (22: 0-35 min; the truth and its label map stay).",
        **define,
    )


def cohort_from_flags(f: flags.FlagValues):
    """(SimulationConfig, subjects, seed) from --config or from the cohort flags."""
    if not f.out:
        raise ValueError("--out must name a directory (e.g. --out data/sim).")
    if f.config is not None:
        given = [f"--{name}" for name in COHORT_FLAGS if f[name].present]
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be combined with --config (use --config.data.sim_*)."
            )
        return simulation_config(f.config)
    if f.subjects is None:
        raise ValueError("--subjects is required (e.g. --subjects 24).")
    for name, value, lowest in (("subjects", f.subjects, 1), ("slices", f.slices, 1)):
        if value < lowest:
            raise ValueError(f"--{name} must be >= {lowest}, got {value}.")
    if f.seed < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {f.seed}.")
    if f.size < 16:
        raise ValueError(f"--size must be >= 16 pixels, got {f.size}.")
    if f.noise not in ("image", "projection", "none"):
        raise ValueError(f"--noise must be image, projection or none, got {f.noise!r}.")
    settings = dict(counts_per_slice=f.counts_per_slice, noise_scale=f.noise_scale)
    return simulation_settings(f.size, f.slices, f.noise, **settings), f.subjects, f.seed


def main(f: flags.FlagValues) -> None:
    t0 = time.perf_counter()
    cfg, n_subjects, seed = cohort_from_flags(f)
    check_writable_dir(f.out, "--out directory")  # before any simulation
    if f.protocol_frames is not None and not 1 <= f.protocol_frames <= cfg.schedule.n_frames:
        raise ValueError(
            f"--protocol_frames must lie in [1, {cfg.schedule.n_frames}], got {f.protocol_frames}."
        )
    ids = simulate_cohort(f.out, n_subjects, seed, cfg, f.overwrite, f.progress, f.preview)
    if f.protocol_frames is not None:
        for sid in ids:
            cut_scan(pathlib.Path(f.out) / sid / "pet" / f"{sid}_pet.nii.gz", f.protocol_frames)
    print(
        f"{PROG}: wrote {len(ids)} subjects × {cfg.slices} slices of {cfg.size}×{cfg.size} "
        f"({cfg.noise} noise, seed {seed}) to {pathlib.Path(f.out).resolve()} in "
        f"{time.perf_counter() - t0:.1f} s."
    )


def cli(argv) -> int:
    """Runs the command for a full argv (argv[0] = program name); returns the exit status."""
    return cli_lib.run(PROG, USAGE, define_flags, main, argv, required=("out",))


if __name__ == "__main__":
    cli_lib.main_entry(cli)
