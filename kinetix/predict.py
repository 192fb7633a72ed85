"""Predict the late frames, Ki and 2TCM parameter maps of one subject from its first 35 minutes.

    python -m kinetix.predict --workdir W --pet sub-01_pet.nii.gz [--blood B] --out DIR \\
        [--recording R] [--idif_mask M [--idif_label N]] [--late_input measured|fit|population] \\
        [--late_sample 60min,5.2kBq/mL] [--nocheck_plausibility]

Flags, then `kinetix.inference.predict_to_dir` (see there for what is written). A 22-frame file
is enough; of a 28-frame file only the first 22 frames are used.
"""

from absl import flags

from kinetix import cli as cli_lib
from kinetix import inference

PROG = "kinetix.predict"
USAGE = "--workdir W --pet X_pet.nii.gz [--blood B] --out DIR [flags]"


def define_flags(fv: flags.FlagValues, argv=()) -> None:
    """The command's flags, on its own `FlagValues` (`argv`: the command line being parsed)."""
    flags.DEFINE_string(
        "workdir", None, "Trained run directory (config.json + checkpoints).", flag_values=fv
    )
    flags.DEFINE_string(
        "pet", None, "The subject's *_pet.nii.gz (sidecar JSON read automatically).", flag_values=fv
    )
    flags.DEFINE_string(
        "blood", None, "Blood TSV (default: the *_blood.tsv next to the PET file).", flag_values=fv
    )
    flags.DEFINE_string("out", None, "Output directory.", flag_values=fv)
    flags.DEFINE_integer("batch_slices", 8, "Slices per forward pass (>= 1).", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Replace existing outputs.", flag_values=fv)
    flags.DEFINE_integer(
        "step", None, "Use the checkpoint of this training step (default: latest).", flag_values=fv
    )
    cli_lib.define_plausibility_flag(fv)
    cli_lib.define_input_flags(fv)


def main(fv: flags.FlagValues) -> None:
    paths = inference.predict_to_dir(
        fv.workdir,
        fv.pet,
        fv.out,
        fv.blood,
        step=fv.step,
        batch_slices=fv.batch_slices,
        overwrite=fv.overwrite,
        check_plausibility=fv.check_plausibility,
        idif_mask=fv.idif_mask,
        idif_label=fv.idif_label,
        late_input=fv.late_input,
        late_sample=fv.late_sample,
        population=fv.population,
        recording=fv.recording,
    )
    print(f"Wrote {len(paths)} files (maps and their JSON sidecars) to {fv.out}")


def cli(argv) -> int:
    """Runs the command for a full argv (argv[0] = program name); returns the exit status."""
    return cli_lib.run(PROG, USAGE, define_flags, main, argv, required=("workdir", "pet", "out"))


if __name__ == "__main__":
    cli_lib.main_entry(cli)
