"""Tests of kinetix.evaluation, kinetix.figures and kinetix.evaluate on a tiny cohort with truth.

Two 16×16×2 subjects with noise-free 2TCM frames (kk.pet_frames) and a truth directory written
with kinetix.data.bids.write_truth. References: an independent NumPy Patlak (np.polyfit per voxel
on a fine-grid input integral) scored with scikit-image, scipy.ndimage.label, hand-computed
Bland–Altman numbers.
"""

import json
import math
import pathlib
import re
import subprocess
import sys

import jax
import matplotlib.image as mpimg
import ml_collections
import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage
from skimage import metrics as skm

import kinetix.kinetics as kk
from kinetix import evaluation, figures, inference
from kinetix.data import bids, pipeline
from kinetix.evaluation import routes, tables

SCHED = kk.PAPER_SCHEDULE
SIZE, NZ = 16, 2
LABEL_NAMES = {
    0: "background",
    1: "soft_tissue",
    4: "liver",
    10: "nodule_benign",
    11: "nodule_malignant",
}
TISSUE = {  # fv, K1, k2, k3, k4
    1: (0.03, 0.05, 0.32, 0.015, 0.0),
    4: (0.15, 1.2, 1.3, 0.01, 0.01),
    10: (0.05, 0.15, 0.5, 0.05, 0.0),
    11: (0.05, 0.4, 0.6, 0.25, 0.0),
}
NODULES = {0: [(11, (4, 10)), (10, (11, 11))], 1: [(11, (4, 10))]}  # z -> (label, (row, col))


def _feng(scale):
    return kk.FengInput(np.asarray(kk.FENG_FDG, np.float64) * np.array([scale] * 3 + [1] * 4))


_pet_frames = jax.jit(lambda p, inp: kk.pet_frames(p, inp, SCHED))


def _subject(name, seed, root):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    body = (yy - 7.5) ** 2 + (xx - 7.5) ** 2 <= 7.2**2
    liver = (yy - 10) ** 2 + (xx - 4) ** 2 <= 2.5**2
    labels = np.zeros((SIZE, SIZE, NZ), np.int32)
    for z in range(NZ):
        lab = np.where(body, 1, 0)
        lab[liver & body] = 4
        for lid, (r, c) in NODULES[z]:
            lab[r, c] = lid
        labels[:, :, z] = lab
    params = np.zeros((SIZE, SIZE, NZ, 5))
    for lid, p in TISSUE.items():
        params[labels == lid] = p
    field = np.exp(0.15 * rng.standard_normal((SIZE, SIZE, NZ, 1)))
    params = params * np.where(labels[..., None] > 0, field, 0.0)
    params[..., 0] = np.clip(params[..., 0], 0, 1)
    scale = 0.02 * (1.0 + 0.2 * seed)
    frames = np.asarray(_pet_frames(params, _feng(scale)), np.float32)
    t = np.concatenate([np.linspace(0, 3, 61), np.linspace(3.5, 66, 126)])
    plasma = np.asarray(_feng(scale)(t), np.float64)
    study = bids.Study(
        frames=frames,
        schedule=SCHED,
        plasma_times=t,
        plasma=plasma,
        whole_blood=None,
        suv_factor=1.0,
        affine=np.eye(4),
        header=nib.Nifti1Header(),
        subject=name,
    )
    fv, k1, k2, k3 = (params[..., i] for i in range(4))
    ki = np.where(k2 + k3 > 0, (1 - fv) * k1 * k3 / np.where(k2 + k3 > 0, k2 + k3, 1), 0.0)
    names = ("fv", "K1", "k2", "k3", "k4")
    bids.write_truth(
        root,
        name,
        frames,
        {n: params[..., i] for i, n in enumerate(names)},
        ki,
        labels,
        np.eye(4),
        LABEL_NAMES,
    )
    return study


def _config(max_figures=2):
    return ml_collections.ConfigDict(
        {
            "name": "eval-test",
            "model": {"n_early": 22},
            "kinetics": {"t_star": 9.0},
            "eval": {"method": "ols", "baseline_t_end": 35.0, "max_figures": max_figures},
            "train": {"eval_batch_size": 3},  # 4 slices -> 2 batches, the second padded
            "data": {"input_points": 64, "mask_threshold": 0.05},
        }
    )


def oracle(batch):
    return {"frames": np.array(batch["frames"]), "params": None}


def _noisy(sd, seed=0):
    rng = np.random.default_rng(seed)

    def predict(batch):
        f = np.array(batch["frames"])
        return {"frames": f + sd * f.max() * rng.standard_normal(f.shape), "params": None}

    return predict


def direct_fn(batch):
    f = np.array(batch["frames"])
    return {"frames": f * np.float32(0.9), "params": None}


@pytest.fixture(scope="module")
def cohort_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bids")
    studies = [_subject("sub-01", 0, root), _subject("sub-02", 1, root)]
    return pipeline.Cohort.from_studies(studies), root


@pytest.fixture(scope="module")
def oracle_run(cohort_root, tmp_path_factory):
    cohort, root = cohort_root
    workdir = tmp_path_factory.mktemp("run")
    with open(workdir / "metrics.jsonl", "w") as f:
        for step in range(1, 11):
            rec = {"step": step * 10, "loss": 1.0 / step}
            if step % 5 == 0:
                rec["val_loss"] = 1.2 / step
            f.write(json.dumps(rec) + "\n")
    result = evaluation.evaluate_run(
        _config(),
        workdir,
        cohort,
        cohort.subjects,
        _with_truth_params(oracle, cohort, root),
        ablation_fn=direct_fn,
        truth_root=root,
    )
    return result, workdir


PARAM_FACTORS = (1.0, 1.1, 0.5, 2.0, 1.0)
"""The oracle's parameter maps: the true (fv, K1, k2, k3, k4) times these."""


def _with_truth_params(predict, cohort, root):
    """`predict` with parameter maps: the true ones of each batch slice × PARAM_FACTORS."""
    truth = {s: bids.read_truth(root, s)["params"] for s in cohort.subjects}

    def fn(batch):
        out = predict(batch)
        maps = np.zeros(np.shape(batch["frames"])[:3] + (5,), np.float32)
        ids = zip(batch["subject"], batch["slice"], batch["valid"], strict=True)
        for b, (i, z, v) in enumerate(ids):
            if v:
                t = truth[cohort.subjects[int(i)]]
                maps[b] = np.stack([t[n][:, :, int(z)] for n in kk.PARAM_NAMES], -1)
        return {**out, "params": maps * np.asarray(PARAM_FACTORS, np.float32)}

    return fn


def _methods(result, table):
    return result["metrics"]["tables"][table]["methods"]


def test_oracle_prediction_reproduces_reference(oracle_run):
    result, _ = oracle_run
    ki = _methods(result, "ki_vs_reference")
    prop = ki["proposed"]
    assert prop["ssim"]["n"] == 2 * NZ and prop["ssim"]["n_nan"] == 0
    np.testing.assert_allclose(prop["ssim"]["mean"], 1.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(prop["nrmse"]["mean"], 0.0, rtol=0, atol=0)
    assert prop["psnr"]["mean"] is None and prop["psnr"]["n_inf"] == 2 * NZ  # +inf -> null
    # The 30-min baseline differs from the 65-min reference on noise-free data.
    assert ki["baseline"]["nrmse"]["mean"] > 1e-3 and ki["baseline"]["ssim"]["mean"] < 1.0
    assert ki["proposed"]["relative_change_pct"]["nrmse"] == pytest.approx(-100.0, abs=1e-9)
    # The authors' predicted-only variant and the direct ablation are not the reference.
    assert ki["proposed_late"]["nrmse"]["mean"] > 1e-3
    assert ki["direct"]["nrmse"]["mean"] > 1e-3
    assert ki["direct_late"]["nrmse"]["mean"] > 1e-3
    suv = _methods(result, "suv_last_frame")
    np.testing.assert_allclose(suv["proposed"]["ssim"]["mean"], 1.0, rtol=0, atol=1e-7)
    np.testing.assert_allclose(suv["direct"]["nrmse"]["mean"], 0.1, rtol=1e-5)  # frames × 0.9


def test_noisy_prediction_is_worse(cohort_root, tmp_path):
    cohort, root = cohort_root
    res = {}
    for sd in (0.002, 0.02):
        res[sd] = evaluation.evaluate_run(
            _config(max_figures=0),
            tmp_path / str(sd),
            cohort,
            cohort.subjects,
            _noisy(sd),
            truth_root=root,
        )
    small, big = (_methods(res[sd], "ki_vs_reference")["proposed"] for sd in (0.002, 0.02))
    assert 0 < small["nrmse"]["mean"] < big["nrmse"]["mean"]
    assert 1 > small["ssim"]["mean"] > big["ssim"]["mean"]
    assert small["psnr"]["mean"] > big["psnr"]["mean"]
    # Noise in the late frames does not touch the baseline.
    b0, b1 = (_methods(res[sd], "ki_vs_reference")["baseline"] for sd in (0.002, 0.02))
    assert b0["ssim"]["mean"] == b1["ssim"]["mean"]


def _numpy_patlak_ki(frames, t, cp_samples, idx):
    """Independent Patlak: fine-grid integral of the piecewise-linear input, np.polyfit."""
    fine = np.linspace(0, SCHED.end[-1], 650_001)
    cp_fine = np.interp(fine, t, cp_samples, left=0.0, right=cp_samples[-1])
    cum = np.concatenate([[0], np.cumsum((cp_fine[1:] + cp_fine[:-1]) / 2 * np.diff(fine))])
    integral = np.interp(SCHED.mid, fine, cum)
    frame_cp = (np.interp(SCHED.end, fine, cum) - np.interp(SCHED.start, fine, cum)) / (
        SCHED.end - SCHED.start
    )
    x = integral[idx] / frame_cp[idx]
    y = frames[..., idx].reshape(-1, len(idx)).T / frame_cp[idx][:, None]
    slope = np.polyfit(x, y, 1)[0]
    return slope.reshape(frames.shape[:-1])


def test_metrics_match_independent_patlak_and_skimage(oracle_run, cohort_root):
    result, workdir = oracle_run
    cohort, _ = cohort_root
    rows = [line.split(",") for line in (workdir / "eval" / "per_slice.csv").read_text().split()]
    header, rows = rows[0], rows[1:]
    col = {k: i for i, k in enumerate(header)}
    for subject in cohort.subjects:
        t, cp, _ = cohort.curves(subject, 64)
        for z in range(NZ):
            ex = cohort.slice(subject, z, input_points=64, mask_threshold=0.05)
            f64 = ex["frames"].astype(np.float64)
            ref = _numpy_patlak_ki(f64, t, cp, np.arange(15, 28)) * ex["mask"]
            base = _numpy_patlak_ki(f64, t, cp, np.arange(15, 22)) * ex["mask"]
            dr = ref.max()
            r, b = np.clip(ref, 0, dr), np.clip(base, 0, dr)
            expected = {
                "ssim": skm.structural_similarity(r, b, data_range=dr),
                "psnr": skm.peak_signal_noise_ratio(r, b, data_range=dr),
                "nrmse": skm.normalized_root_mse(r, b),
                "nmi": skm.normalized_mutual_information(r, b, bins=100),
            }
            (row,) = [
                rw
                for rw in rows
                if rw[col["table"]] == "ki_vs_reference"
                and rw[col["method"]] == "baseline"
                and rw[col["subject"]] == subject
                and int(rw[col["slice"]]) == z
            ]
            # float32 Patlak on the float32 frames vs float64 NumPy: ~1e-4 relative on Ki.
            for k, tol in (("ssim", 2e-3), ("psnr", 0.05), ("nrmse", 5e-3), ("nmi", 1e-2)):
                np.testing.assert_allclose(
                    float(row[col[k]]), expected[k], rtol=0, atol=tol, err_msg=f"{subject} z{z} {k}"
                )


def test_files_and_report_sections(oracle_run):
    result, workdir = oracle_run
    out = workdir / "eval"
    m = json.loads((out / "metrics.json").read_text())
    assert m == result["metrics"]
    for key in ("run", "conventions", "labels", "tables", "per_subject", "bland_altman", "figures"):
        assert key in m
    assert set(m["tables"]) == {
        "ki_vs_reference",
        "ki_vs_truth",
        "suv_last_frame",
        "suv_last_frame_vs_truth",
    }
    assert m["run"]["frames"]["reference"] == list(range(16, 29))
    assert m["run"]["frames"]["baseline"] == list(range(16, 23))
    assert m["run"]["frames"]["proposed_predicted"] == list(range(23, 29))
    assert m["run"]["frames"]["proposed_late"] == list(range(23, 29))
    assert set(m["per_subject"]["ki_vs_reference"]) == {"sub-01", "sub-02"}
    assert m["per_subject"]["ki_vs_reference"]["sub-01"]["n_slices"] == NZ
    text = (out / "report.md").read_text()
    for section in (
        "## Ki against the 65-min Patlak reference",
        "## Ki against the true Ki",
        "## SUV of the last frame",
        "## Per subject",
        "## Tumour ROIs: Bland-Altman",
        "## Figures",
        "## Conventions",
    ):
        assert section in text
    for phrase in (
        "clipped to [0, max(reference slice)]",
        "data_range = max(reference slice)",
        "100 x 100-bin",
        "7x7 uniform window",
        "mid-time",
        "frames 16-28",
        "frames 16-22",
        "predicted frames 23-28",
    ):
        assert phrase in text, phrase
    names = {pathlib.Path(f["path"]).name for f in m["figures"]}
    assert {
        "tac_patlak.png",
        "bland_altman_vs_reference.png",
        "bland_altman_vs_truth.png",
        "per_subject_ki.png",
        "loss.png",
    } <= names
    assert sum(n.startswith("ki_maps_") for n in names) == 2  # max_figures = 2
    for f in m["figures"]:
        path = out / f["path"]
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = mpimg.imread(path)
        assert img.ndim == 3 and min(img.shape[:2]) > 200
        assert f["path"] in text
    lines = (out / "per_slice.csv").read_text().strip().split("\n")
    n_rows = sum(len(t["methods"]) for t in m["tables"].values()) * 2 * NZ
    assert len(lines) == 1 + n_rows


def test_rois_and_bland_altman_against_hand_computation(oracle_run):
    result, _ = oracle_run
    ba = result["metrics"]["bland_altman"]
    # One ROI per nodule and slice: 3 per subject; one-voxel nodules give 3×3 ROIs.
    assert ba["n_rois"] == 2 * sum(len(v) for v in NODULES.values())
    for r in ba["rois"]:
        assert r["n_voxels"] == 9 and r["n_tumour_voxels"] == 1
        assert tuple(r["centre"]) in [pos for v in NODULES.values() for _, pos in v]
    for ref in ("reference", "truth"):
        for method, st in ba[f"vs_{ref}"].items():
            a = np.array([r["ki"][method] for r in ba["rois"]])
            b = np.array([r["ki"][ref] for r in ba["rois"]])
            d = a - b
            bias, sd = d.mean(), np.sqrt(np.sum((d - d.mean()) ** 2) / (d.size - 1))
            got = st["roi_mean"]
            np.testing.assert_allclose(got["bias"], bias, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(got["sd"], sd, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(got["loa_high"], bias + 1.96 * sd, rtol=1e-12, atol=1e-15)
            assert got["n"] == d.size and st["voxel"]["n"] == 9 * d.size
    # The oracle reproduces the reference exactly, ROI by ROI.
    prop = ba["vs_reference"]["proposed"]["roi_mean"]
    assert prop["bias"] == 0.0 and prop["sd"] == 0.0


def test_per_tissue_table_of_the_oracle_run(oracle_run):
    """Oracle = measured = noise-free truth here: zero late-frame bias; direct = 0.9 × it."""
    result, workdir = oracle_run
    t = result["metrics"]["tissues"]
    assert set(t["late_frames"]) == {"soft_tissue", "liver", "nodule_benign", "nodule_malignant"}
    for name, e in t["late_frames"].items():
        assert e["n_voxels"] == t["ki"][name]["n_voxels"] > 0
        assert e["bias_pct"]["measured"] == pytest.approx(0.0, abs=1e-4), name
        assert e["bias_pct"]["proposed"] == pytest.approx(0.0, abs=1e-4), name
        assert e["bias_pct"]["direct"] == pytest.approx(-10.0, abs=1e-4), name
        ki = t["ki"][name]["mean"]
        assert ki["proposed"] == pytest.approx(ki["reference"], rel=1e-6), name
    # Two one-voxel nodules of each kind in the two subjects (NODULES), inside the mask.
    assert t["late_frames"]["nodule_malignant"]["n_voxels"] == 2 * 2
    assert t["late_frames"]["nodule_benign"]["n_voxels"] == 1 * 2
    text = (workdir / "eval" / "report.md").read_text()
    assert "## Per tissue (against the simulation's truth)" in text
    assert "(-10.0 %)" in text


def test_per_tissue_parameter_table_of_the_oracle_run(oracle_run):
    """The oracle's parameter maps are the truth × PARAM_FACTORS: each tissue's bias is the
    factor − 1 (none where the true mean is 0, e.g. k4 outside the liver); report table."""
    result, workdir = oracle_run
    params = result["metrics"]["tissues"]["params"]
    assert list(params) == list(kk.PARAM_NAMES)
    for name, factor in zip(kk.PARAM_NAMES, PARAM_FACTORS, strict=True):
        for tissue, e in params[name].items():
            n = result["metrics"]["tissues"]["ki"][tissue]["n_voxels"]
            assert e["n_voxels"] == n
            if e["mean"]["truth"] == 0:
                assert e["bias_pct"]["proposed"] is None, (name, tissue)  # NaN -> null
            else:
                want = 100 * (factor - 1)
                assert e["bias_pct"]["proposed"] == pytest.approx(want, abs=1e-3), (name, tissue)
    liver_k1 = params["K1"]["liver"]["mean"]
    assert liver_k1["truth"] == pytest.approx(TISSUE[4][1], rel=0.2)  # ±15 % voxel field
    text = (workdir / "eval" / "report.md").read_text()
    assert "2TCM parameters of the kinetic network" in text
    assert "K1: truth → kinetix" in text and "(+100 %)" in text and "(-50 %)" in text
    assert "figures/tissue_params.png" in text
    assert mpimg.imread(workdir / "eval" / "figures" / "tissue_params.png").shape[0] > 100
    zero = {"k4": {"liver": {"mean": {"truth": 0.0, "proposed": 0.01}}}}
    assert not figures.plot_tissue_params(workdir / "none.png", zero)  # nothing to draw
    assert not (workdir / "none.png").exists()


def test_tissue_param_panels_leave_out_the_background_and_list_zero_means():
    def e(truth, proposed):
        return {"mean": {"truth": truth, "proposed": proposed}}

    per_param = {
        "K1": {"background": e(0.0, 0.03), "liver": e(1.3, 0.4), "lung": e(0.02, 0.0)},
        "k4": {"background": e(0.0, 0.001), "liver": e(0.01, 0.02), "lung": e(0.0, 0.004)},
    }
    panels = figures.tissue_param_panels(per_param)
    assert panels["K1"] == ([("liver", 1.3, 0.4)], [("lung", 0.02, 0.0)])
    assert panels["k4"] == ([("liver", 0.01, 0.02)], [("lung", 0.0, 0.004)])


def test_parameter_maps_of_the_wrong_shape_are_a_clear_error(cohort_root, tmp_path):
    cohort, root = cohort_root

    def bad(batch):
        return {"frames": np.array(batch["frames"]), "params": np.zeros((1, 2, 3, 5))}

    with pytest.raises(ValueError, match="predict_fn returned params of shape .1, 2, 3, 5."):
        evaluation.evaluate_run(_config(), tmp_path, cohort, cohort.subjects, bad, truth_root=root)


def test_tissue_sums_and_bias_by_hand():
    labels = np.array([[0, 1, 1], [2, 2, 7]])
    mask = np.array([[1, 1, 0], [1, 1, 1]], np.float32)  # (0, 2) is outside
    truth = np.array([[5.0, 2.0, 100.0], [4.0, 6.0, 0.0]])
    pred = np.array([[1.0, 3.0, -100.0], [4.0, 4.0, 1.0]])
    sums: dict = {}
    tables.add_label_sums(sums, labels, mask, {"truth": truth, "pred": pred})
    tables.add_label_sums(
        sums, labels[:, :2], mask[:, :2], {"truth": truth[:, :2], "pred": pred[:, :2]}
    )
    assert sums == {
        0: {"n": 2, "truth": 10.0, "pred": 2.0},
        1: {"n": 2, "truth": 4.0, "pred": 6.0},
        2: {"n": 4, "truth": 20.0, "pred": 16.0},
        7: {"n": 1, "truth": 0.0, "pred": 1.0},
    }
    out = tables.tissue_bias(sums, {0: "air", 1: "a", 2: "b"})
    assert list(out) == ["air", "a", "b", "7"]
    assert out["a"]["mean"] == {"truth": 2.0, "pred": 3.0}
    assert out["a"]["bias_pct"]["pred"] == pytest.approx(50.0)
    assert out["b"]["bias_pct"]["pred"] == pytest.approx(-20.0)
    assert out["air"]["bias_pct"]["pred"] == pytest.approx(-80.0)
    assert math.isnan(out["7"]["bias_pct"]["pred"])  # reference mean 0
    with pytest.raises(ValueError, match="non-negative"):
        tables.add_label_sums({}, -labels, mask, {"truth": truth})


def test_bland_altman_hand_numbers():
    st = tables.bland_altman([1.0, 2.0, 3.0, 4.0], [1.5, 1.5, 3.5, 3.0])
    # d = [-0.5, 0.5, -0.5, 1.0]: bias 0.125, SD = sqrt(1.6875 / 3) = 0.75.
    assert st["n"] == 4
    np.testing.assert_allclose(st["bias"], 0.125, rtol=1e-15)
    np.testing.assert_allclose(st["sd"], 0.75, rtol=1e-15)
    np.testing.assert_allclose([st["loa_low"], st["loa_high"]], [-1.345, 1.595], rtol=1e-14)
    one = tables.bland_altman([2.0], [1.0])
    assert one["bias"] == 1.0 and math.isnan(one["sd"])
    with pytest.raises(ValueError, match="same length"):
        tables.bland_altman([1.0, 2.0], [1.0])


def test_tumour_rois_and_components():
    lab = np.zeros((8, 8), np.int32)
    lab[0, 0] = 11  # corner: the 3×3 square is cut to 2×2
    lab[4:6, 4:6] = 11  # 2×2 block: centroid (4.5, 4.5) rounds up to (5, 5)
    lab[2, 6] = 10
    lab[3, 7] = 10  # diagonal neighbour: one 8-connected region
    rois = tables.tumour_rois(lab, [10, 11])
    assert [(r["label"], r["n_tumour"], r["centre"]) for r in rois] == [
        (10, 2, (3, 7)),
        (11, 1, (0, 0)),
        (11, 4, (5, 5)),
    ]
    assert [int(r["roi"].sum()) for r in rois] == [6, 4, 9]
    expected = np.zeros((8, 8), bool)
    expected[4:7, 4:7] = True
    expected[4:6, 4:6] = True
    np.testing.assert_array_equal(rois[2]["roi"], expected)
    rng = np.random.default_rng(3)
    for _ in range(5):
        region = rng.random((12, 15)) < 0.35
        ours, n = tables.connected_components(region)
        ref, n_ref = scipy.ndimage.label(region, structure=np.ones((3, 3)))
        assert n == n_ref
        np.testing.assert_array_equal(ours, ref)


def test_summarize_skips_nan_and_keeps_inf():
    s = tables.summarize([1.0, np.nan, 3.0])
    assert (s["n"], s["n_nan"], s["n_inf"]) == (2, 1, 0)
    np.testing.assert_allclose([s["mean"], s["std"], s["median"]], [2.0, 1.0, 2.0], rtol=1e-15)
    s = tables.summarize([np.inf, 2.0])
    assert s["mean"] == math.inf and s["n_inf"] == 1 and s["std"] == 0.0
    s = tables.summarize([np.nan])
    assert s["n"] == 0 and math.isnan(s["mean"])


def test_table_lists_all_methods_in_fixed_width(oracle_run):
    result, _ = oracle_run
    table = result["table"]
    labels = routes.method_labels()
    keys = ("baseline", "proposed", "proposed_late", "direct", "direct_late", "truth", "reference")
    for key in keys:
        assert labels[key] in table
    blocks = table.split("\n\n")
    assert len(blocks) == 2  # against the reference and against the truth
    for block in blocks:
        lines = block.split("\n")
        head, sep, rows = lines[2], lines[3], lines[4:]
        assert set(sep) == {"-"}
        starts = [head.index(h) for h in ("SSIM", "PSNR (dB)", "NRMSE", "NMI")]
        for row in rows:
            for s in starts:  # every cell starts under its header
                assert row[s - 1] == " " and row[s] != " ", (row, s)
    prop_row = next(r for r in blocks[0].split("\n") if r.startswith(labels["proposed"]))
    assert "1.0000 (+" in prop_row and "0.0000 (-100.00%)" in prop_row
    assert re.search(r"^30-min Patlak \(baseline\) \*", blocks[0], re.M)


def test_prediction_shape_is_checked(cohort_root, tmp_path):
    cohort, root = cohort_root

    def short(batch):
        return {"frames": np.array(batch["frames"])[..., :22]}

    with pytest.raises(ValueError, match=r"predict_fn returned frames of shape"):
        evaluation.evaluate_run(_config(0), tmp_path, cohort, cohort.subjects, short)


def test_cli_missing_workdir_is_one_sentence(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "kinetix.evaluate", f"--workdir={tmp_path / 'nope'}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=pathlib.Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"kinetix.evaluate: error: --workdir {tmp_path / 'nope'} does not exist."
    )


def test_cli_in_process_reports_errors_as_one_sentence(tmp_path, capsys):
    from kinetix import evaluate

    assert evaluate.cli(["kinetix.evaluate"]) == 2
    assert capsys.readouterr().err == "kinetix.evaluate: error: --workdir is required.\n"
    assert evaluate.cli(["kinetix.evaluate", f"--workdir={tmp_path}", "--step=0"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"kinetix.evaluate: error: --workdir {tmp_path} has no config.json: it is not a "
        "kinetix training workdir.\n"
    )


def test_evaluate_workdir_without_truth(cohort_root, tmp_path, monkeypatch):
    cohort, _ = cohort_root
    workdir = tmp_path / "w"
    workdir.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        evaluation.evaluate_workdir(workdir)
    (workdir / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="has no checkpoints"):
        evaluation.evaluate_workdir(workdir)
    (workdir / "checkpoints").mkdir()
    monkeypatch.setattr(
        inference,
        "load_for_inference",
        lambda w, d=None, step=None: (_config(1), oracle, cohort, {"test": ["sub-02"]}),
    )
    res = evaluation.evaluate_workdir(workdir)
    m = res["metrics"]
    assert m["run"]["subjects"] == ["sub-02"] and m["run"]["n_slices"] == NZ
    assert "ki_vs_truth" not in m["tables"] and m["bland_altman"]["n_rois"] == 0
    assert "no true Ki" in m["run"]["truth"]
    assert m["run"]["checkpoint_step"] is None  # an empty checkpoints/ (load_for_inference faked)
    assert (workdir / "eval" / "figures" / "tac_patlak.png").is_file()
    assert "truth" not in res["table"].lower()
    with pytest.raises(ValueError, match="pass --overwrite"):
        evaluation.evaluate_workdir(workdir)
    evaluation.evaluate_workdir(workdir, overwrite=True)
    with pytest.raises(ValueError, match="--step must be a positive integer, got 0"):
        evaluation.evaluate_workdir(workdir, step=0)


def test_loss_curve_needs_positive_losses(tmp_path):
    assert not figures.plot_loss_curve(tmp_path / "a.png", tmp_path / "missing.jsonl")
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.0}\nnot json\n{"step": 2, "loss": -1}\n')
    assert not figures.plot_loss_curve(tmp_path / "a.png", path)
    assert not (tmp_path / "a.png").exists()
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0, "val_loss": 1.5}\n')
    assert figures.plot_loss_curve(tmp_path / "a.png", path)
    assert (tmp_path / "a.png").read_bytes()[:4] == b"\x89PNG"


def test_a_registered_route_is_evaluated_with_no_other_edit(cohort_root, tmp_path):
    """Adding a Ki route is one registry entry: a copy of the baseline (measured frames, the
    baseline window) appears in both Ki tables, the per-slice CSV, the labels, the conventions,
    the ROI statistics and the report, with the baseline's numbers."""
    cohort, root = cohort_root
    route = routes.Route("baseline_copy", "copy of the baseline", routes.MEASURED, "baseline")
    routes.register(route)
    try:
        with pytest.raises(ValueError, match="already registered"):
            routes.register(route)
        res = evaluation.evaluate_run(
            _config(max_figures=0), tmp_path, cohort, cohort.subjects, oracle, truth_root=root
        )
    finally:
        routes.unregister("baseline_copy")
    assert "baseline_copy" not in routes.ROUTES
    m = res["metrics"]
    rows = ["reference", "baseline", "proposed", "proposed_late", "truth", "baseline_copy"]
    for table, ref in (("ki_vs_reference", "reference"), ("ki_vs_truth", "truth")):
        methods = _methods(res, table)
        assert list(methods) == [r for r in rows if r != ref]  # registry order (appended)
        assert methods["baseline_copy"] == methods["baseline"]
    assert "baseline_copy" not in _methods(res, "suv_last_frame")  # a route, not a prediction
    assert m["labels"]["baseline_copy"] == "copy of the baseline"
    assert m["conventions"]["baseline_copy"] == (
        "copy of the baseline: Patlak on the measured frames (frames 16-22, baseline window)."
    )
    rois = m["bland_altman"]["rois"]
    assert rois and all(r["ki"]["baseline_copy"] == r["ki"]["baseline"] for r in rois)
    assert m["tissues"]["ki"]["liver"]["mean"]["baseline_copy"] == pytest.approx(
        m["tissues"]["ki"]["liver"]["mean"]["baseline"], rel=0, abs=0
    )
    assert "copy of the baseline" in res["table"]
    assert "copy of the baseline" in (tmp_path / "eval" / "report.md").read_text()
    csv_text = (tmp_path / "eval" / "per_slice.csv").read_text()
    assert csv_text.count("ki_vs_reference,baseline_copy,") == 2 * NZ


def test_routes_are_checked_and_their_availability_follows_the_inputs():
    with pytest.raises(ValueError, match="needs a prediction"):
        routes.Route("x", "x", routes.SPLICED, "proposed")
    with pytest.raises(ValueError, match="needs no prediction"):
        routes.Route("x", "x", routes.MEASURED, "baseline", prediction="proposed")
    with pytest.raises(ValueError, match="frames must be one of"):
        routes.Route("x", "x", "both", "baseline")
    with pytest.raises(ValueError, match="Patlak routes need a window"):
        routes.Route("x", "x", routes.MEASURED)
    with pytest.raises(ValueError, match="truth and rates routes none"):
        routes.Route("x", "x", routes.RATES, "baseline", prediction="fit35")
    names = [r.name for r in routes.available_routes(["proposed"], has_truth=False)]
    assert names == ["reference", "baseline", "proposed", "proposed_late"]
    every = ["proposed", "direct", "fit35", "fit65"]
    names = [r.name for r in routes.available_routes(every, has_truth=True)]
    assert names == [*routes.ROUTES]
    names = [r.name for r in routes.available_routes(["proposed", "fit35"], has_truth=False)]
    assert names == ["reference", "baseline", "proposed", "proposed_late", "fit35_rates", "fit35"]
    assert [routes.ROUTES[n].needs for n in ("reference", "direct_late", "truth")] == [
        None,
        "ablation",
        "truth",
    ]


def test_fit_routes_join_every_table_and_the_report(cohort_root, tmp_path):
    """The voxelwise 2TCM baselines (config.eval.fit_2tcm): on noise-free frames the whole-scan
    fit reproduces the true Ki closely, and every fit route is a row of the Ki tables."""
    cohort, root = cohort_root
    config = _config(1)
    config.eval.update(
        fit_2tcm=True, fit_weights="duration", fit_starts=2, fit_max_steps=100, fit_chunk_voxels=128
    )
    config.kinetics.update(decay_constant=kk.F18_DECAY_CONSTANT, use_whole_blood=False)
    res = evaluation.evaluate_run(
        config, tmp_path, cohort, cohort.subjects, oracle, truth_root=root
    )
    assert "ki_vs_fit65" in res["metrics"]["tables"]
    for table in ("ki_vs_reference", "ki_vs_truth"):
        assert {"fit35_rates", "fit35", "fit65_rates"} <= set(_methods(res, table))
    # Noise-free 2TCM frames: the fits' Ki from the rates is near exact (the batch's input is
    # the 64-knot compressed plasma curve, hence not exact: NRMSE ~1e-3), while every Patlak
    # route carries Patlak's own bias against the true Ki (NRMSE ~0.1).
    vs_truth = _methods(res, "ki_vs_truth")
    for route in ("fit35_rates", "fit65_rates"):
        assert vs_truth[route]["nrmse"]["mean"] < 0.01, route
        assert vs_truth[route]["nrmse"]["mean"] < 0.2 * vs_truth["reference"]["nrmse"]["mean"]
    text = (tmp_path / "eval" / "report.md").read_text()
    assert "## Ki against the 2TCM fit of the whole scan" in text
    assert "2TCM fit 0-35, Ki from rates" in res["table"]
