"""Anatomy of the simulated thorax (`kinetix.data.phantom`, step 1): labels, tissue fractions.

Subject geometry (`draw_anatomy`: body, lungs, heart, aorta, spine, liver dome, lung nodules),
the label and tissue-fraction maps of an axial slice (`thorax_labels`, `nodule_map`) and the
smooth random fields that vary lung density and, in `kinetix.data.phantom.tissues`, the kinetic
parameters within organs. Lengths in mm; arrays `[X, Y(, S)]` in RAS voxel order.
"""

import dataclasses
import math

import numpy as np

from kinetix.data.phantom.config import SimulationConfig

LABELS = {
    "background": 0,
    "soft_tissue": 1,
    "muscle": 2,
    "lung": 3,
    "liver": 4,
    "myocardium": 5,
    "blood_pool": 6,
    "aorta": 7,
    "bone": 8,
    "marrow": 9,
    "nodule_benign": 10,
    "nodule_malignant": 11,
}
"""Label ids of the tissue map. `blood_pool` is the left-ventricle cavity."""

FIELD_LOG_SD = 0.1
"""Within-organ variation: parameters × exp(0.1·field), field a unit-variance smooth field."""


# ------------------------------------------------------------------------------------------------
# Smooth random fields
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SmoothField:
    """Unit-variance low-frequency 3-D random field f(r) = √(2/K)·Σ_k cos(ω_k·r + φ_k).

    Attributes:
      omega: [K, 3] wave vectors (rad/mm), wavelengths between 60 and 250 mm.
      phase: [K] phases (rad).
    """

    omega: np.ndarray
    phase: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n_modes: int = 16) -> "SmoothField":
        direction = rng.normal(size=(n_modes, 3))
        direction /= np.linalg.norm(direction, axis=1, keepdims=True)
        wavelength = rng.uniform(60.0, 250.0, size=(n_modes, 1))
        return cls(2.0 * np.pi * direction / wavelength, rng.uniform(0, 2 * np.pi, n_modes))

    def __call__(self, coords: np.ndarray) -> np.ndarray:
        """Field at coords [..., 3] (mm) -> [...], clipped to ±2.5."""
        arg = coords @ self.omega.T + self.phase
        value = math.sqrt(2.0 / self.phase.size) * np.sum(np.cos(arg), axis=-1)
        return np.clip(value, -2.5, 2.5)


# ------------------------------------------------------------------------------------------------
# Anatomy
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Nodule:
    """A spherical lung nodule: centre (x, y, z) in mm (RAS), radius in mm."""

    centre_mm: tuple[float, float, float]
    radius_mm: float
    malignant: bool


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """Subject-level geometry (mm; body-frame x to the patient's left, y anterior)."""

    a: float  # body lateral semi-axis
    b: float  # body antero-posterior semi-axis
    centre: tuple[float, float]
    rotation: float  # rad
    fat_mm: float
    muscle_mm: float
    lung_u: tuple[float, float]  # right, left lung centre |x| / a
    lung_v: float
    lung_axes: tuple[float, float]  # semi-axes / (a, b)
    dome: float  # slice position where the liver dome starts
    heart_centre: tuple[float, float]  # / (a, b)
    heart_axes: tuple[float, float]  # mm
    heart_angle: float
    heart_range: tuple[float, float]  # slice positions
    wall_mm: float
    aorta: tuple[float, float, float]  # x, y (mm, body frame), radius
    spine: tuple[float, float, float]  # x, y, radius
    lung_fraction: float
    lung_field: SmoothField
    nodules: tuple[Nodule, ...] = ()


def _pixel_grid(cfg: SimulationConfig) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(cfg.size) - (cfg.size - 1) / 2.0) * cfg.pixel_mm
    return np.meshgrid(c, c, indexing="ij")  # x along axis 0, y along axis 1


def voxel_coords(cfg: SimulationConfig) -> np.ndarray:
    """[X, Y, S, 3] voxel centres (mm, RAS) of a subject's slices."""
    x, y = _pixel_grid(cfg)
    z = cfg.z_mm(cfg.slice_positions)
    shape = (cfg.size, cfg.size, cfg.slices)
    return np.stack(
        [np.broadcast_to(x[..., None], shape), np.broadcast_to(y[..., None], shape),
         np.broadcast_to(z[None, None, :], shape)], axis=-1,
    )  # fmt: skip


def _ellipse(x, y, x0, y0, ra, rb, angle=0.0):
    if ra <= 0 or rb <= 0:
        return np.zeros(np.shape(x), bool)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (x - x0) * c + (y - y0) * s, -(x - x0) * s + (y - y0) * c
    return (u / ra) ** 2 + (v / rb) ** 2 <= 1.0


def _ramp(x, lo, width):
    return float(np.clip((x - lo) / width, 0.0, 1.0))


def draw_anatomy(rng: np.random.Generator, cfg: SimulationConfig, weight_kg: float) -> Anatomy:
    """Draw one subject's thorax geometry (body size scales with √(weight/70 kg)).

    Nodules are placed inside the lungs of a randomly chosen slice (their sphere fully inside
    the lung there) without overlapping each other; they show on every slice that cuts them.
    """
    size_scale = math.sqrt(weight_kg / 70.0)
    a = rng.uniform(150.0, 175.0) * size_scale
    b = a * rng.uniform(0.62, 0.74)
    dome = rng.uniform(0.62, 0.75)
    spine_r = rng.uniform(17.0, 21.0)
    anat = Anatomy(
        a=a,
        b=b,
        centre=(rng.uniform(-10, 10), rng.uniform(-10, 10)),
        rotation=rng.uniform(-0.06, 0.06),
        fat_mm=rng.uniform(6.0, 14.0) * size_scale**2,
        muscle_mm=rng.uniform(10.0, 18.0),
        lung_u=(rng.uniform(0.40, 0.46), rng.uniform(0.40, 0.46)),
        lung_v=rng.uniform(-0.05, 0.08),
        lung_axes=(rng.uniform(0.28, 0.33), rng.uniform(0.58, 0.66)),
        dome=dome,
        heart_centre=(rng.uniform(0.08, 0.16), rng.uniform(0.15, 0.28)),
        heart_axes=(rng.uniform(50.0, 62.0), rng.uniform(40.0, 50.0)),
        heart_angle=rng.uniform(0.35, 0.7),
        heart_range=(dome - rng.uniform(0.33, 0.42), dome + rng.uniform(0.06, 0.12)),
        wall_mm=rng.uniform(10.0, 13.0),
        aorta=(0.17 * a, -0.40 * b, rng.uniform(11.0, 14.0)),
        spine=(0.0, -0.58 * b, spine_r),
        lung_fraction=rng.uniform(0.2, 0.3),
        lung_field=SmoothField.draw(rng),
    )
    return dataclasses.replace(anat, nodules=_place_nodules(rng, cfg, anat))


def _place_nodules(rng, cfg, anat) -> tuple[Nodule, ...]:
    n = int(rng.integers(cfg.nodules_range[0], cfg.nodules_range[1] + 1))
    x, y = _pixel_grid(cfg)
    positions = cfg.slice_positions
    lungs = [thorax_labels(anat, cfg, p)[0] == LABELS["lung"] for p in positions]
    nodules = []
    for _ in range(n):
        radius = max(rng.uniform(6.0, 22.0), cfg.pixel_mm)
        malignant = bool(rng.random() < cfg.malignant_probability)
        order = rng.permutation(len(positions))
        for r in (radius, cfg.pixel_mm):
            placed = None
            for k in order:
                ok = lungs[k].copy()
                for nod in nodules:  # keep a gap of one pixel to earlier nodules
                    gap = nod.radius_mm + r + cfg.pixel_mm
                    ok &= (x - nod.centre_mm[0]) ** 2 + (y - nod.centre_mm[1]) ** 2 > gap**2
                # the disc of radius r around a candidate centre must be all lung
                rp = int(math.ceil(r / cfg.pixel_mm))
                pad = np.pad(lungs[k], rp)
                for di in range(-rp, rp + 1):
                    for dj in range(-rp, rp + 1):
                        if (di * di + dj * dj) * cfg.pixel_mm**2 <= r * r:
                            ok &= pad[rp + di : rp + di + cfg.size, rp + dj : rp + dj + cfg.size]
                cand = np.argwhere(ok)
                if len(cand):
                    i, j = cand[rng.integers(len(cand))]
                    jitter = rng.uniform(-0.25, 0.25, 2) * cfg.pixel_mm
                    z = float(cfg.z_mm(positions[k])) + rng.uniform(-0.3, 0.3) * r
                    placed = Nodule((x[i, j] + jitter[0], y[i, j] + jitter[1], z), r, malignant)
                    break
            if placed is not None:
                nodules.append(placed)
                break
    return tuple(nodules)


def _nodule_index(anat: Anatomy, cfg: SimulationConfig, slice_position: float) -> np.ndarray:
    """[X, Y] int: 1 + index of the nodule whose sphere covers the pixel, else 0."""
    x, y = _pixel_grid(cfg)
    z = float(cfg.z_mm(slice_position))
    out = np.zeros(x.shape, np.int32)
    for n, nod in enumerate(anat.nodules):
        r2 = nod.radius_mm**2 - (z - nod.centre_mm[2]) ** 2
        if r2 > 0:
            inside = (x - nod.centre_mm[0]) ** 2 + (y - nod.centre_mm[1]) ** 2 <= r2
            out[inside] = n + 1
    return out


def thorax_labels(
    anatomy: Anatomy, cfg: SimulationConfig, slice_position: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tissue labels and tissue fractions of one axial slice.

    Args:
      anatomy: subject geometry from `draw_anatomy`.
      cfg: simulation config (matrix, pixel size).
      slice_position: 0 (lung apex) .. 1 (upper abdomen, below the liver dome).

    Returns:
      labels: [X, Y] int32 ids of `LABELS`.
      fraction: [X, Y] float32 tissue fraction: 1 in the body, ≈ 0.2–0.3 in lung parenchyma
        (smooth variation, denser posteriorly), 0 outside the body.
    """
    p = float(slice_position)
    an = anatomy
    x, y = _pixel_grid(cfg)
    x, y = x - an.centre[0], y - an.centre[1]
    c, s = math.cos(an.rotation), math.sin(an.rotation)
    xb, yb = x * c + y * s, -x * s + y * c  # body frame
    a = an.a * (1.0 + 0.04 * math.sin(math.pi * p))
    b = an.b * (1.0 + 0.04 * math.sin(math.pi * p))
    lab = np.zeros(x.shape, np.int32)
    lab[_ellipse(xb, yb, 0, 0, a, b)] = LABELS["soft_tissue"]
    body = lab > 0
    d_in = an.fat_mm
    d_out = an.fat_mm + an.muscle_mm
    outer = _ellipse(xb, yb, 0, 0, a - d_in, b - d_in)
    lab[outer & ~_ellipse(xb, yb, 0, 0, a - d_out, b - d_out)] = LABELS["muscle"]
    cavity = _ellipse(xb, yb, 0, 0, a - d_out - 5.0, b - d_out - 5.0)
    sx, sy, sr = an.spine
    for side in (-1, 1):  # paraspinal muscles
        lab[_ellipse(xb, yb, side * (sr + 20.0), sy - 8.0, 22.0, 18.0) & body] = LABELS["muscle"]

    apex = 0.45 + 0.55 * math.sqrt(_ramp(p, 0.0, 0.4))
    base = (1.0 - 0.8 * _ramp(p, an.dome, 0.25), 1.0 - 0.75 * _ramp(p, an.dome + 0.08, 0.25))
    lung = np.zeros(x.shape, bool)
    for side, u, sc in ((-1, an.lung_u[0], base[0]), (1, an.lung_u[1], base[1])):
        ra, rb = an.lung_axes[0] * a * apex * sc, an.lung_axes[1] * b * apex * sc
        lung |= _ellipse(xb, yb, side * u * a, an.lung_v * b, ra, rb)
    lab[lung & cavity] = LABELS["lung"]

    rho = math.sqrt(_ramp(p, an.dome, 0.22))
    liver = _ellipse(xb, yb, -0.28 * a, 0.0, 0.6 * a * rho, 0.8 * b * rho, 0.2)
    lab[liver & cavity] = LABELS["liver"]

    h0, h1 = an.heart_range
    if h0 < p < h1:
        prof = math.sqrt(max(0.0, 1.0 - ((p - 0.5 * (h0 + h1)) / (0.5 * (h1 - h0))) ** 2))
        hx, hy = an.heart_centre[0] * a, an.heart_centre[1] * b
        ra, rb = an.heart_axes[0] * prof, an.heart_axes[1] * prof
        lab[_ellipse(xb, yb, hx, hy, ra, rb, an.heart_angle) & cavity] = LABELS["myocardium"]
        w = an.wall_mm
        inner = _ellipse(xb, yb, hx + 4.0, hy - 2.0, ra - w, rb - w, an.heart_angle)
        lab[inner & cavity] = LABELS["blood_pool"]

    ax, ay, ar = an.aorta
    lab[_ellipse(xb, yb, ax, ay, ar, ar)] = LABELS["aorta"]
    lab[_ellipse(xb, yb, sx, sy, sr, sr) | _ellipse(xb, yb, sx, sy - sr - 12.0, 14.0, 12.0)] = (
        LABELS["bone"]
    )
    lab[_ellipse(xb, yb, sx, sy, sr - 5.0, sr - 5.0)] = LABELS["marrow"]
    lab[~body] = LABELS["background"]

    nod = _nodule_index(anatomy, cfg, p)
    for n, nodule in enumerate(anatomy.nodules):
        kind = "nodule_malignant" if nodule.malignant else "nodule_benign"
        lab[(nod == n + 1) & (lab == LABELS["lung"])] = LABELS[kind]

    frac = body.astype(np.float32)
    is_lung = lab == LABELS["lung"]
    if np.any(is_lung):
        z = float(cfg.z_mm(p))
        coords = np.stack([x + an.centre[0], y + an.centre[1], np.full(x.shape, z)], axis=-1)
        field = anatomy.lung_field(coords[is_lung])
        gravity = 1.0 - 0.15 * np.clip(yb[is_lung] / b, -1.0, 1.0)  # supine: posterior denser
        lf = an.lung_fraction * gravity * np.exp(FIELD_LOG_SD * field)
        frac[is_lung] = np.clip(lf, 0.1, 0.45)
    return lab, frac


def nodule_map(anatomy: Anatomy, cfg: SimulationConfig, labels: np.ndarray) -> np.ndarray:
    """[X, Y, S] int: 1 + nodule index on voxels labelled as a nodule, else 0."""
    idx = np.stack([_nodule_index(anatomy, cfg, p) for p in cfg.slice_positions], axis=-1)
    is_nod = (labels == LABELS["nodule_benign"]) | (labels == LABELS["nodule_malignant"])
    return np.where(is_nod, idx, 0).astype(np.int32)
