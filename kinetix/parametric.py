"""Voxelwise Patlak Ki and V0 maps of a BIDS-PET scan.

    python -m kinetix.parametric --pet sub-01_pet.nii.gz [--blood B | --recording R] \\
        --tstar 9 [--tend 35] [--method ols|perpendicular] --out DIR [--overwrite] \\
        [--chunk_voxels 65536] [--mask_rule filled|threshold] [--mask_threshold 0.02] \\
        [--idif_mask M [--idif_label N]] [--late_input measured|fit|population] \\
        [--late_sample 60min,5.2kBq/mL] [--population FILE] [--nocheck_plausibility]

Flags, then `kinetix.inference.patlak_study` (see there for what is written).
"""

from absl import flags

import kinetix.kinetics as kk
from kinetix import cli as cli_lib
from kinetix import maps
from kinetix.inference import patlak

PROG = "kinetix.parametric"
USAGE = "--pet X_pet.nii.gz --tstar MIN --out DIR [flags]"


def define_flags(fv: flags.FlagValues, argv=()) -> None:
    """The command's flags, on its own `FlagValues` (`argv`: the command line being parsed)."""
    flags.DEFINE_string(
        "pet", None, "Dynamic PET image *_pet.nii.gz (sidecar read).", flag_values=fv
    )
    flags.DEFINE_string(
        "blood", None, "Blood TSV (default: the one next to --pet).", flag_values=fv
    )
    flags.DEFINE_float(
        "tstar", None, "Start of the Patlak fit (min, frame mid-times).", flag_values=fv
    )
    flags.DEFINE_float(
        "tend", None, "End of the Patlak fit (min); default scan end.", flag_values=fv
    )
    flags.DEFINE_enum("method", "ols", list(kk.METHODS), "Line fit.", flag_values=fv)
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs.", flag_values=fv)
    flags.DEFINE_integer(
        "chunk_voxels",
        maps.DEFAULT_CHUNK_VOXELS,
        "Voxels per jitted fit.",
        lower_bound=1,
        flag_values=fv,
    )
    flags.DEFINE_enum(
        "mask_rule",
        patlak.DEFAULT_MASK_RULE,
        list(maps.MASK_RULES),
        "Body-mask rule (kinetix.maps.mask).",
        flag_values=fv,
    )
    flags.DEFINE_float(
        "mask_threshold",
        patlak.DEFAULT_MASK_THRESHOLD,
        "Body mask: fraction of the rule's reference level (0: all voxels).",
        flag_values=fv,
    )
    cli_lib.define_plausibility_flag(fv)
    cli_lib.define_input_flags(fv)


def main(fv: flags.FlagValues) -> None:
    patlak.patlak_study(
        fv.pet,
        fv.out,
        fv.tstar,
        fv.tend,
        fv.method,
        blood=fv.blood,
        overwrite=fv.overwrite,
        chunk_voxels=fv.chunk_voxels,
        mask_threshold=fv.mask_threshold,
        mask_rule=fv.mask_rule,
        progress=True,
        check_plausibility=fv.check_plausibility,
        idif_mask=fv.idif_mask,
        idif_label=fv.idif_label,
        late_input=fv.late_input,
        late_sample=fv.late_sample,
        population=fv.population,
        recording=fv.recording,
    )


def cli(argv) -> int:
    """Runs the command for a full argv (argv[0] = program name); returns the exit status."""
    return cli_lib.run(PROG, USAGE, define_flags, main, argv, required=("pet", "tstar", "out"))


if __name__ == "__main__":
    cli_lib.main_entry(cli)
