"""Voxelwise 2TCM maps of a BIDS-PET scan.

    python -m kinetix.fit --pet sub-01_pet.nii.gz [--blood B | --recording R] --out DIR \\
        [--window START,END] [--model 2tcm|2tcm_irreversible] [--fit_delay] \\
        [--weights duration|duration_decay|none] [--idif_mask M [--idif_label N]] \\
        [--overwrite] [--nocheck_plausibility]

Flags, then `kinetix.inference.fit_study` (see there for what is written).
"""

from absl import flags

import kinetix.kinetics as kk
from kinetix import cli as cli_lib
from kinetix import maps
from kinetix.inference import fit

PROG = "kinetix.fit"
USAGE = "--pet X_pet.nii.gz --out DIR [--window START,END] [--model M] [--fit_delay] [flags]"


def define_flags(fv: flags.FlagValues, argv=()) -> None:
    """The command's flags, on its own `FlagValues` (`argv`: the command line being parsed)."""
    flags.DEFINE_string(
        "pet", None, "Dynamic PET image *_pet.nii.gz (sidecar read).", flag_values=fv
    )
    flags.DEFINE_string(
        "blood", None, "Blood TSV (default: the one next to --pet).", flag_values=fv
    )
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_string(
        "window",
        None,
        "Fit only the frames inside START,END (minutes); default all.",
        flag_values=fv,
    )
    flags.DEFINE_enum("model", "2tcm", list(kk.FIT_MODELS), "Compartment model.", flag_values=fv)
    flags.DEFINE_bool("fit_delay", False, "Also fit an input delay (min).", flag_values=fv)
    flags.DEFINE_enum(
        "weights", maps.DEFAULT_WEIGHTS, list(kk.WEIGHT_KINDS), "Frame weights.", flag_values=fv
    )
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs.", flag_values=fv)
    flags.DEFINE_integer(
        "chunk_voxels",
        maps.DEFAULT_FIT_CHUNK,
        "Voxels per jitted fit.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "mask_rule", fit.DEFAULT_MASK_RULE, list(maps.MASK_RULES), "Body-mask rule.", flag_values=fv
    )
    flags.DEFINE_float(
        "mask_threshold", fit.DEFAULT_MASK_THRESHOLD, "Body-mask threshold.", flag_values=fv
    )
    cli_lib.define_plausibility_flag(fv)
    cli_lib.define_input_flags(fv, late=False)


def main(fv: flags.FlagValues) -> None:
    paths = fit.fit_study(
        fv.pet,
        fv.out,
        blood=fv.blood,
        recording=fv.recording,
        window=fv.window,
        model=fv.model,
        fit_delay=fv.fit_delay,
        weights=fv.weights,
        overwrite=fv.overwrite,
        chunk_voxels=fv.chunk_voxels,
        mask_rule=fv.mask_rule,
        mask_threshold=fv.mask_threshold,
        progress=True,
        check_plausibility=fv.check_plausibility,
        idif_mask=fv.idif_mask,
        idif_label=fv.idif_label,
    )
    print(f"Wrote {len(paths) - 1} maps (each with a JSON sidecar) and {paths['summary'].name}")


def cli(argv) -> int:
    """Runs the command for a full argv (argv[0] = program name); returns the exit status."""
    return cli_lib.run(PROG, USAGE, define_flags, main, argv, required=("pet", "out"))


if __name__ == "__main__":
    cli_lib.main_entry(cli)
