"""Kinetics and input of the simulated subjects (`kinetix.data.phantom`, steps 2 and 3).

Per-voxel 2TCM parameters (`draw_subject_kinetics`: per-tissue nominal values, per-subject and
within-organ variation, nodule draws) and the subject's Feng-type plasma input with its
whole-blood curve (`draw_input`, `BloodCurves`). Time in minutes, rates in 1/min, SUV.
"""

import dataclasses
import math

import numpy as np

import kinetix.kinetics as kk
from kinetix.data.phantom.anatomy import (
    FIELD_LOG_SD,
    LABELS,
    Anatomy,
    SmoothField,
    nodule_map,
    voxel_coords,
)
from kinetix.data.phantom.config import SimulationConfig

TISSUES = {
    # name: (fv, K1, k2, k3, k4). Source: the XCAT-based table of docs/conventions.md ("Simulator"),
    # with the changes noted; with the default input these give late (60 min) SUVs of about soft
    # 0.8, muscle 1.1, lung tissue 2.6 (voxel ≈ 0.6), liver 2.8, marrow 1.8, myocardium 4.
    "soft_tissue": (0.029, 0.047, 0.325, 0.015, 0.0),  # XCAT k3 0.084 gives SUV 2.4: too hot
    "muscle": (0.019, 0.035, 0.15, 0.015, 0.0),  # resting muscle; XCAT (Ki 0.083) gives SUV 19
    "lung": (0.151, 0.114, 0.291, 0.025, 0.0),  # tissue level (× fraction); XCAT k3 0.036
    "liver": (0.165, 1.256, 1.329, 0.008, 0.010),  # XCAT k3 0.020, k4 0 give SUV 5.3
    "myocardium": (0.25, 0.196, 1.022, 0.149, 0.0),  # XCAT vB 0.545 includes spill-over
    "blood_pool": (1.0, 0.047, 0.325, 0.015, 0.0),  # fv = 1: rates are irrelevant
    "aorta": (1.0, 0.047, 0.325, 0.015, 0.0),
    "bone": (0.02, 0.02, 0.2, 0.01, 0.0),  # cortical bone
    "marrow": (0.05, 0.10, 0.25, 0.012, 0.005),  # XCAT bone/marrow (Ki 0.037) gives SUV 9
}
"""Nominal per-tissue 2TCM parameters (fv, K1 mL/min/mL, k2, k3, k4 1/min)."""

SUBJECT_LOG_SD = np.array([0.2, 0.2, 0.15, 0.25, 0.3])
"""Per-subject lognormal spread of (fv, K1, k2, k3, k4) around the nominal values."""

MYOCARDIUM_K3_LOG_SD = 0.6
"""Myocardial glucose use varies a lot between (fasting) patients."""

PARAM_BOUNDS = np.array([1.0, 2.0, 3.0, 1.0, 0.2])
"""Upper bounds of (fv, K1, k2, k3, k4); lower bounds are 0 (fv, k4) and 1e-4 (rates)."""

FENG_SUV_SCALE = 2.0 / 11.2344
"""SUV per FENG_FDG unit: scales Feng's tail (A2, A3) so that nominal plasma at 60 min is 2.0 SUV
(whole blood ≈ 1.7 SUV, typical of the mediastinal blood pool at 1 h)."""

BOLUS_GAIN = 3.0
"""Extra factor on Feng's A1 (the bolus term): Feng's curve peaks at only ≈ 9× its 60-min value,
a modern bolus injection at 30–50×. With it the nominal peak is ≈ 45 SUV (≈ 30–80 drawn)."""


def kmap_plasma_to_blood_ratio(t):
    """Cp/C_WB = 0.386·e^{−0.191 t} + 1.165 (KMAP), t in min (any shape)."""
    return 0.386 * np.exp(-0.191 * np.asarray(t, np.float64)) + 1.165


# ------------------------------------------------------------------------------------------------
# Kinetics
# ------------------------------------------------------------------------------------------------
def _clip_params(p: np.ndarray) -> np.ndarray:
    lower = np.array([0.0, 1e-4, 1e-4, 1e-4, 0.0])
    return np.clip(p, lower, PARAM_BOUNDS)


def _draw_nodule_params(rng: np.random.Generator, malignant: bool) -> np.ndarray:
    if malignant:
        k1, k2 = rng.uniform(0.10, 0.30), rng.uniform(0.20, 0.60)
        ki = math.exp(rng.uniform(math.log(0.02), math.log(0.08)))
        fv, k4 = rng.uniform(0.05, 0.25), rng.choice([0.0, rng.uniform(0.0, 0.005)])
    else:
        k1, k2 = rng.uniform(0.08, 0.20), rng.uniform(0.30, 0.80)
        ki = math.exp(rng.uniform(math.log(0.003), math.log(0.012)))
        fv, k4 = rng.uniform(0.05, 0.20), rng.uniform(0.0, 0.01)
    ki = min(ki, 0.5 * k1)
    k3 = ki * k2 / (k1 - ki)  # so that K1·k3/(k2 + k3) = Ki
    return np.array([fv, k1, k2, k3, k4])


def draw_subject_kinetics(
    rng: np.random.Generator, anatomy: Anatomy, cfg: SimulationConfig, labels: np.ndarray
) -> tuple[np.ndarray, list[dict]]:
    """Per-voxel 2TCM parameters of one subject.

    Args:
      rng: NumPy generator.
      anatomy: subject geometry (for nodules).
      cfg: simulation config.
      labels: [X, Y, S] label map of the subject's slices.

    Returns:
      params: [X, Y, S, 5] float32 (fv, K1, k2, k3, k4), tissue-level (not × fraction); 0
        outside the body; within `PARAM_BOUNDS`.
      tumours: one dict per nodule: index (1-based), malignant, label, centre_mm, radius_mm,
        params (5 floats), ki (K1·k3/(k2+k3)), slices (indices where it shows), n_voxels.
    """
    params = np.zeros(labels.shape + (5,), np.float64)
    for name, nominal in TISSUES.items():
        sd = SUBJECT_LOG_SD.copy()
        if name == "myocardium":
            sd[3] = MYOCARDIUM_K3_LOG_SD
        theta = np.asarray(nominal) * np.exp(sd * rng.normal(size=5))
        if nominal[0] == 1.0:
            theta[0] = 1.0
        params[labels == LABELS[name]] = theta
    nod = nodule_map(anatomy, cfg, labels)
    tumours = []
    for n, nodule in enumerate(anatomy.nodules):
        theta = _draw_nodule_params(rng, nodule.malignant)
        mask = nod == n + 1
        params[mask] = theta
        tumours.append(
            dict(
                index=n + 1,
                malignant=nodule.malignant,
                label=LABELS["nodule_malignant" if nodule.malignant else "nodule_benign"],
                centre_mm=tuple(float(v) for v in nodule.centre_mm),
                radius_mm=float(nodule.radius_mm),
                params=tuple(float(v) for v in theta),
                ki=float(theta[1] * theta[3] / (theta[2] + theta[3])),
                slices=[int(k) for k in np.nonzero(mask.any(axis=(0, 1)))[0]],
                n_voxels=int(mask.sum()),
            )
        )
    coords = voxel_coords(cfg)
    blood = (labels == LABELS["blood_pool"]) | (labels == LABELS["aorta"])
    for i in range(5):
        mod = np.exp(FIELD_LOG_SD * SmoothField.draw(rng)(coords))
        params[..., i] *= np.where(blood, 1.0, mod)
    params = np.where((labels > 0)[..., None], _clip_params(params), 0.0)
    return params.astype(np.float32), tumours


# ------------------------------------------------------------------------------------------------
# Input function
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class BloodCurves:
    """A subject's input: Feng parameters and plasma / whole-blood samples (SUV, minutes).

    Attributes:
      feng: [7] (A1, A2, A3, λ1, λ2, λ3, τ) in SUV/min, SUV, SUV, 1/min ×3, min.
      times: [K] sample times (min), 0..input_end_min, dense around the bolus.
      plasma: [K] Cp (SUV) from the Feng formula.
      whole_blood: [K] C_WB = Cp / (0.386·e^{−0.191 t} + 1.165) (SUV).
    """

    feng: np.ndarray
    times: np.ndarray
    plasma: np.ndarray
    whole_blood: np.ndarray

    def plasma_input(self) -> kk.FengInput:
        return kk.FengInput(self.feng)

    def blood_input(self) -> kk.SampledInput:
        return kk.SampledInput(self.times, self.whole_blood)


def feng_curve(feng: np.ndarray, t) -> np.ndarray:
    """Feng model 2 in float64 NumPy (same formula and pairing as kk.FengInput)."""
    a1, a2, a3, l1, l2, l3, tau = (float(v) for v in feng)
    s = np.maximum(np.asarray(t, np.float64) - tau, 0.0)
    val = (a1 * s - a2 - a3) * np.exp(l1 * s) + a2 * np.exp(l2 * s) + a3 * np.exp(l3 * s)
    return np.where(s > 0, val, 0.0)


def draw_input(
    rng: np.random.Generator,
    cfg: SimulationConfig = SimulationConfig(),  # noqa: B008 (a frozen dataclass)
) -> BloodCurves:
    """Draw a subject's plasma input around `kk.FENG_FDG`, in SUV.

    Amplitudes × U(0.8, 1.2) (A1 also × BOLUS_GAIN), rates × U(0.85, 1.15), delay τ ~ U(0.3, 1.2)
    min, all × FENG_SUV_SCALE. Late (60 min) plasma ≈ 1.4–2.7 SUV, whole blood ≈ 1.2–2.3 SUV,
    peak ≈ 30–80 SUV.
    """
    base = np.asarray(kk.FENG_FDG, np.float64)
    amp = base[:3] * rng.uniform(0.8, 1.2, 3) * FENG_SUV_SCALE
    amp[0] *= BOLUS_GAIN
    rates = base[3:6] * rng.uniform(0.85, 1.15, 3)
    feng = np.concatenate([amp, rates, [rng.uniform(0.3, 1.2)]])
    tau = feng[6]
    times = np.concatenate(
        [[0.0, tau], tau + np.geomspace(0.01, cfg.input_end_min - tau, cfg.input_samples - 2)]
    )
    plasma = feng_curve(feng, times)
    return BloodCurves(feng, times, plasma, plasma / kmap_plasma_to_blood_ratio(times))
