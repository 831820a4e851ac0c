"""Detection and sub-pixel refinement on KDEs, one-to-one matching, SMLM metrics, the oracle."""

import dataclasses
import json
import math
import pathlib

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

import smlm_tfdiff as st
from smlm_tfdiff.localization import detection
from smlm_tfdiff.localization.config import DetectionConfig
from smlm_tfdiff.localization.batched import detect_batch

NM = 108.3  # LR pixel size of the paper preset.


def _isolated_kdes(config, num, seed, low=3.0, high=17.0):
    """num KDEs of one emitter each at uniform random positions: (kde, positions [num, 2])."""
    pos = np.random.default_rng(seed).uniform(low, high, size=(num, 1, 2))
    return st.true_kde(pos, None, config), pos[:, 0]


# ----------------------------------------------------------------------- sub-pixel accuracy
@pytest.mark.parametrize("refine, tol", [("gaussian", 1e-6), ("centroid", 2e-3), ("none", 0.125)])
def test_isolated_emitter_subpixel_accuracy(paper, refine, tol):
    kde, truth = _isolated_kdes(paper, 40, seed=0)
    pred = st.detect(kde, paper, refine=refine)
    assert isinstance(pred, list) and len(pred) == 40
    assert all(p.shape == (1, 2) and p.dtype == np.float64 for p in pred)
    err = np.concatenate(pred) - truth
    assert np.abs(err).max() < tol  # LR pixels, per axis.
    if refine == "none":  # The centre of the HR pixel holding the emitter, exactly.
        np.testing.assert_allclose(np.concatenate(pred), (np.floor(truth * 4) + 0.5) / 4)
    else:  # Sub-pixel: far better than the integer HR grid.
        assert np.sqrt(np.mean(err ** 2)) < tol / 5 + 1e-9


def test_gaussian_fit_is_unbiased_at_the_border(paper):
    truth = np.array([[0.15, 10.3], [19.8, 0.4], [9.37, 19.9]])
    kde = st.true_kde(truth[:, None], None, paper)  # One emitter per frame.
    pred = st.detect(kde, paper)
    np.testing.assert_allclose(np.concatenate(pred), truth, atol=1e-6)


def test_coordinates_are_x_y_in_lr_pixels_not_transposed(paper):
    kde = st.render_kde([[10.55, 3.55]], paper)  # HR (42.2, 14.2): row 14, column 42.
    assert np.unravel_index(np.argmax(kde), kde.shape) == (14, 42)
    for refine in detection.REFINE_MODES:
        pred = st.detect(kde, paper, refine=refine)
        assert pred.shape == (1, 2)
        np.testing.assert_allclose(pred[0], [10.55, 3.55], atol=0.125)
    np.testing.assert_allclose(st.detect(kde, paper, refine="none")[0], [42.5 / 4, 14.5 / 4])
    np.testing.assert_allclose(st.detect(kde, paper)[0], [10.55, 3.55], atol=1e-8)


def test_accepted_input_forms_and_amplitudes(paper):
    kde = st.render_kde([[5.3, 6.1], [14.2, 12.7]], paper)
    ref, amp = st.detect(kde, paper, return_amplitude=True)
    np.testing.assert_allclose(ref, [[5.3, 6.1], [14.2, 12.7]], atol=1e-7)  # Sorted by y.
    np.testing.assert_allclose(amp, 1.0, atol=1e-6)  # Amplitude counts emitters.
    np.testing.assert_allclose(st.detect(kde[..., None], paper), ref)
    np.testing.assert_allclose(st.detect(tf.constant(kde, tf.float32), paper), ref, atol=1e-4)
    batch = st.detect(np.stack([kde, np.zeros_like(kde)])[..., None], paper)
    assert isinstance(batch, list) and len(batch) == 2
    np.testing.assert_allclose(batch[0], ref)
    assert batch[1].shape == (0, 2)  # Nothing to detect.
    pos, amps = st.detect(tf.constant(kde[None]), paper, return_amplitude=True)
    assert len(pos) == len(amps) == 1 and amps[0].shape == (2,)
    # The "none" / "centroid" amplitude is the KDE value at the peak pixel (~1 per emitter).
    _, peak = st.detect(kde, paper, refine="none", return_amplitude=True)
    assert np.all((peak > 0.95) & (peak <= 1.0))


def test_resolved_neighbours_are_fitted_jointly(paper):
    truth = np.array([[8.0, 10.0], [10.6, 10.3]])  # 2.6 LR px = 10.4 HR px apart: tails overlap.
    pred = st.detect(st.render_kde(truth, paper), paper)
    np.testing.assert_allclose(pred, truth, atol=1e-6)


def test_merged_pair_is_deblended(paper):
    truth = np.array([[10.0, 10.0], [11.0, 10.3]])  # 4.2 HR px apart: one KDE maximum.
    kde = st.render_kde(truth, paper)
    single, amp = st.detect(kde, paper, deblend=False, return_amplitude=True)
    assert single.shape == (1, 2) and 1.5 < amp[0] < 2.0  # One peak holding ~2 emitters.
    pred, amp = st.detect(kde, paper, return_amplitude=True)
    np.testing.assert_allclose(pred, truth, atol=1e-4)
    np.testing.assert_allclose(amp, 1.0, atol=1e-3)


def test_a_crowded_field_linked_into_one_group_splits_every_merged_pair():
    """The split budget grows with the group: 48 merged pairs 4 LR px apart link into one group
    (the link is 4.75 LR px), which a fixed budget per group (32 tries) could not all split."""
    config = st.SimulationConfig.preset("paper", frame_height=28, frame_width=36, region="frame",
                                        margin=0.0)
    centres = np.stack(np.meshgrid(np.arange(4.0, 33.0, 4.0), np.arange(4.0, 25.0, 4.0)),
                       -1).reshape(-1, 2)
    truth = np.concatenate([centres - [0.5, 0.15], centres + [0.5, 0.15]])  # 4.2 HR px apart.
    kde = st.render_kde(truth, config)
    assert len(st.detect(kde, config, deblend=False)) == len(centres) == 48
    for pred in (st.detect(kde, config), detect_batch(kde[None], config)[0]):
        m = st.localization_metrics(pred, truth, config)
        assert (m["TP"], m["FP"], m["FN"]) == (96, 0, 0)

def test_emitter_without_its_own_log_maximum_is_found_in_the_residual(paper):
    # Three emitters in a row 2 LR px apart and one 2 px below the middle, smeared as phi smears
    # clusters: the fourth has no LoG maximum of its own, only a bump left after fitting the others.
    truth = np.array([[8.5, 10.0], [10.5, 10.0], [12.5, 10.0], [10.5, 12.0]])
    kde = ndimage.gaussian_filter(st.render_kde(truth, paper), 1.5)
    assert len(st.detect(kde, paper, deblend={"max_adds": 0})) == 3
    pred, amp = st.detect(kde, paper, return_amplitude=True)
    m = st.localization_metrics(pred, truth, paper)
    assert (m["TP"], m["FP"], m["FN"]) == (4, 0, 0)
    assert m["rmse_lateral_nm"] < 0.1 * NM and np.all(amp > 0.8)


def test_fits_below_half_an_emitter_are_dropped(paper):
    kde = st.render_kde(np.array([[10.3, 9.6]]), paper)
    for scale, kept in ((0.48, 0), (0.6, 1)):  # LoG responses ~0.21 and ~0.26, both > threshold.
        assert len(st.detect(scale * kde, paper)) == kept
        assert len(st.detect(scale * kde, paper, deblend={"keep_amplitude": 0.0})) == 1


def test_noise_does_not_split_isolated_emitters(paper):
    kde, truth = _isolated_kdes(paper, 30, seed=1)
    noise = ndimage.gaussian_filter(np.random.default_rng(2).normal(size=kde.shape), (0, 1.5, 1.5))
    noisy = kde + 0.03 * noise / noise.std()  # Correlated noise, 3% of the peak.
    pred = st.detect(noisy, paper)
    assert [len(p) for p in pred] == [1] * 30
    assert np.abs(np.concatenate(pred) - truth).max() < 0.1


# -------------------------------------------------------------------------------- matching
def test_match_is_one_to_one():
    pi, ti = st.match([[0.0, 0.0], [0.1, 0.0]], [[0.05, 0.0]], tolerance=1.0)
    assert len(pi) == len(ti) == 1 and ti[0] == 0 and pi[0] in (0, 1)


def test_match_beyond_tolerance_and_empty_inputs():
    pi, ti = st.match([[0.0, 0.0]], [[2.0, 0.0]], tolerance=1.0)
    assert pi.size == ti.size == 0 and pi.dtype == np.int64
    pi, ti = st.match([[0.0, 0.0]], [[0.5, 0.0]], tolerance=0.5)  # Inclusive.
    assert list(pi) == [0] and list(ti) == [0]
    for pred, truth in [([], [[1.0, 1.0]]), ([[1.0, 1.0]], np.zeros((0, 2))), ([], [])]:
        pi, ti = st.match(pred, truth, tolerance=1.0)
        assert pi.shape == ti.shape == (0,)


def test_match_maximises_the_number_of_pairs_then_minimises_distance():
    truth = [[0.0, 0.0], [1.2, 0.0]]
    # Greedy nearest-first takes (p0, t0) at 0.5 and leaves p1 unmatched; the optimum has two pairs.
    pred = [[0.5, 0.0], [-0.6, 0.0]]
    pi, ti = st.match(pred, truth, tolerance=0.8)
    assert list(zip(pi, ti)) == [(1, 0), (0, 1)]
    # Among complete assignments the shorter total distance wins.
    pi, ti = st.match([[1.1, 0.0], [0.1, 0.0]], truth, tolerance=5.0)
    assert list(zip(pi, ti)) == [(1, 0), (0, 1)]


def test_match_rejects_bad_input():
    with pytest.raises(ValueError, match="tolerance"):
        st.match([[0.0, 0.0]], [[0.0, 0.0]], tolerance=-1.0)
    with pytest.raises(ValueError, match=r"pred must be \[M, 2\]"):
        st.match([[0.0, 0.0, 0.0]], [[0.0, 0.0]], tolerance=1.0)
    with pytest.raises(ValueError, match="NaN"):
        st.match([[np.nan, 0.0]], [[0.0, 0.0]], tolerance=1.0)


# --------------------------------------------------------------------------------- metrics
def _hand_built():
    truth = [np.array([[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]]), np.array([[3.0, 3.0]])]
    pred = [np.array([[1.1, 1.0], [5.1, 5.0], [15.0, 15.0]]), np.zeros((0, 2))]
    return pred, truth


def test_metrics_on_a_hand_built_case(paper):
    pred, truth = _hand_built()
    m = st.localization_metrics(pred, truth, paper)
    assert (m["TP"], m["FP"], m["FN"]) == (2, 1, 2)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(0.5)
    assert m["jaccard"] == pytest.approx(2 / 5) and m["f1"] == pytest.approx(4 / 7)
    # Both matches are off by dx = +0.1 LR px: the shift is all bias.
    assert m["rmse_lateral_nm"] == pytest.approx(0.1 * NM)
    assert m["rmse_x_nm"] == pytest.approx(0.1 * NM) and m["rmse_y_nm"] == pytest.approx(0.0)
    assert m["mean_shift_x_nm"] == pytest.approx(0.1 * NM) and m["mean_shift_y_nm"] == 0.0
    assert m["rmse_lateral_bias_corrected_nm"] == pytest.approx(0.0, abs=1e-9)
    assert m["efficiency_lateral"] == pytest.approx(100 - math.sqrt(60.0 ** 2 + (0.1 * NM) ** 2))
    np.testing.assert_allclose(m["errors"], [[0.1, 0.0], [0.1, 0.0]], atol=1e-12)
    np.testing.assert_array_equal(m["matches"], [[0, 0, 0], [0, 1, 1]])  # (frame, pred, truth).
    assert m["tolerance_nm"] == pytest.approx(1.25 * NM) and m["num_frames"] == 2
    # Scalars are plain Python numbers: JSON-ready once the arrays are left out.
    scalars = st.localization_metrics(pred, truth, paper, with_errors=False)
    assert set(m) - set(scalars) == {"errors", "matches"}
    assert all(type(v) in (int, float) for v in scalars.values())
    json.dumps(scalars)


def test_metrics_rmse_with_a_spread_and_a_shift(paper):
    truth = [np.array([[2.0, 2.0], [6.0, 6.0], [10.0, 10.0], [14.0, 14.0]])]
    d = np.array([[0.1, 0.0], [-0.1, 0.0], [0.0, 0.2], [0.0, -0.2]])
    m = st.localization_metrics([truth[0] + d + [0.05, -0.03]], truth, paper)
    assert m["TP"] == 4 and m["jaccard"] == 1.0
    assert m["mean_shift_x_nm"] == pytest.approx(0.05 * NM)
    assert m["mean_shift_y_nm"] == pytest.approx(-0.03 * NM)
    assert m["rmse_lateral_bias_corrected_nm"] == pytest.approx(math.sqrt(0.1 / 4) * NM)
    raw = math.sqrt(np.mean(((d + [0.05, -0.03]) ** 2).sum(1))) * NM
    assert m["rmse_lateral_nm"] == pytest.approx(raw)
    assert m["efficiency_lateral"] == pytest.approx(100 - raw)


def test_metrics_tolerance_in_hr_pixels_or_nm(paper):
    truth = [np.array([[5.0, 5.0]])]
    assert st.localization_metrics([[[6.2, 5.0]]], truth, paper)["TP"] == 1  # 1.2 < 1.25 LR px.
    assert st.localization_metrics([[[6.3, 5.0]]], truth, paper)["TP"] == 0
    assert st.localization_metrics([[[6.3, 5.0]]], truth, paper, tolerance_hr=6.0)["TP"] == 1
    # 250 nm = 2.31 LR px (SMLM challenge).
    m = st.localization_metrics([[[7.3, 5.0]]], truth, paper, tolerance_nm=250.0)
    assert m["TP"] == 1 and m["tolerance_nm"] == pytest.approx(250.0)
    assert st.localization_metrics([[[7.4, 5.0]]], truth, paper, tolerance_nm=250.0)["TP"] == 0


def test_metrics_accept_padded_truth(paper):
    pred, truth = _hand_built()
    padded = np.zeros((2, 3, 2))
    padded[0] = truth[0]
    padded[1, 0] = truth[1][0]
    mask = np.array([[True, True, True], [True, False, False]])
    ref = st.localization_metrics(pred, truth, paper, with_errors=False)
    assert st.localization_metrics(pred, padded, paper, truth_mask=mask, with_errors=False) == ref
    assert st.localization_metrics(pred, (padded, mask), paper, with_errors=False) == ref
    data = {"positions": padded.astype(np.float32), "mask": mask}
    got = st.localization_metrics(pred, data, paper, with_errors=False)
    assert {k: got[k] for k in ("TP", "FP", "FN")} == {"TP": 2, "FP": 1, "FN": 2}


def test_metrics_without_matches_or_emitters(paper):
    one = st.localization_metrics([[1.0, 1.0], [5.0, 5.0]], np.array([[1.1, 1.0]]), paper)
    assert (one["num_frames"], one["TP"], one["FP"]) == (1, 1, 1)  # One frame, not two.
    m = st.localization_metrics([np.zeros((0, 2))], [np.array([[1.0, 1.0]])], paper)
    assert (m["TP"], m["FN"], m["recall"], m["jaccard"]) == (0, 1, 0.0, 0.0)
    assert math.isnan(m["rmse_lateral_nm"]) and math.isnan(m["efficiency_lateral"])
    assert m["errors"].shape == (0, 2) and m["matches"].shape == (0, 3)
    m = st.localization_metrics([np.zeros((0, 2))], [np.zeros((0, 2))], paper)
    assert (m["precision"], m["recall"], m["jaccard"]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="frames"):
        st.localization_metrics([np.zeros((0, 2))] * 2, [np.zeros((0, 2))], paper)


# ---------------------------------------------------------------------------------- oracle
def test_oracle_on_paper_frames(paper):
    data = st.simulate(paper, 200, seed=0)
    m = st.oracle_metrics(data["positions"], data["mask"], paper)
    assert m["TP"] + m["FN"] == 2000 and m["num_frames"] == 200
    assert m["precision"] >= 0.99
    # Merged emitters (closer than ~2 kde_sigma) are what recall loses; deblending recovers most.
    assert m["recall"] > 0.95
    assert m["rmse_lateral_nm"] < 10.0
    without = st.oracle_metrics(data["positions"], data["mask"], paper, deblend=False)
    assert without["precision"] >= 0.99 and without["recall"] > 0.75
    assert without["recall"] < m["recall"]
    print(f"\noracle paper 200 frames: precision {m['precision']:.4f} recall {m['recall']:.4f} "
          f"jaccard {m['jaccard']:.4f} rmse {m['rmse_lateral_nm']:.2f} nm; without deblending "
          f"recall {without['recall']:.4f}")


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("kde, message", [
    (np.zeros(80), "kde must be"),
    (np.zeros((2, 80, 80, 3)), "kde must be"),
    (np.zeros((1, 1, 80, 80, 1)), "kde must be"),
    (np.full((80, 80), np.nan), "NaN"),
    (np.zeros((2, 80)), "at least 3x3"),
    ("not a kde", "numeric"),
])
def test_detect_rejects_bad_kde(paper, kde, message):
    with pytest.raises(ValueError, match=message):
        st.detect(kde, paper)


def test_detect_rejects_bad_options(paper):
    kde = np.zeros((80, 80))
    with pytest.raises(ValueError, match="refine"):
        st.detect(kde, paper, refine="parabola")
    with pytest.raises(ValueError, match="threshold"):
        st.detect(kde, paper, threshold=0.0)
    with pytest.raises(ValueError, match="min_sigma"):
        st.detect(kde, paper, min_sigma=3.0, max_sigma=2.0)
    with pytest.raises(ValueError, match="deblend"):
        st.detect(kde, paper, deblend={"bogus": 1})
    with pytest.raises(TypeError, match="SimulationConfig"):
        st.detect(kde, {"upsample": 4})


@pytest.mark.parametrize("changes, field", [
    (dict(threshold=0.0), "threshold"),
    (dict(threshold=float("nan")), "threshold"),
    (dict(min_sigma=-1.0), "min_sigma"),
    (dict(max_sigma=1.0), "max_sigma"),  # Below min_sigma.
    (dict(num_sigma=0), "num_sigma"),
    (dict(num_sigma=2.5), "num_sigma"),
    (dict(refine_radius=0), "refine_radius"),
    (dict(threshold="0.2"), "threshold"),
])
def test_bad_detection_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"DetectionConfig\.{field}"):
        DetectionConfig(**changes)


def test_detection_config_round_trips_and_drives_detect(paper):
    c = DetectionConfig(threshold=0.3, min_sigma=1.5, max_sigma=3.0, num_sigma=2, refine_radius=4)
    assert DetectionConfig.from_json(c.to_json()) == c
    with pytest.raises(ValueError, match="unknown DetectionConfig fields"):
        DetectionConfig.from_dict({"threshold": 0.3, "thresold": 0.2})
    # A threshold above the response of one emitter (~0.43) finds nothing.
    kde = st.render_kde([[10.2, 9.7]], paper)
    assert st.detect(kde, paper, detection=DetectionConfig(threshold=0.5)).shape == (0, 2)
    assert st.detect(kde, paper, threshold=0.5).shape == (0, 2)
    np.testing.assert_allclose(st.detect(kde, paper, detection=c), [[10.2, 9.7]], atol=1e-6)
    with pytest.raises(TypeError, match="DetectionConfig"):
        st.detect(kde, paper, detection={"threshold": 0.5})


def test_pre_split_sim_config_files_still_load_with_their_detection_settings(tmp_path):
    """sim_config.json files written before DetectionConfig held detect_* and refine_radius."""
    old = {**st.SimulationConfig.preset("paper").to_dict(), "detect_threshold": 0.35,
           "detect_min_sigma": 2.0, "detect_max_sigma": 2.0, "detect_num_sigma": 1,
           "refine_radius": 4}
    assert st.SimulationConfig.from_dict(old) == st.SimulationConfig.preset("paper")
    det = DetectionConfig.from_legacy(old)
    assert det == DetectionConfig(threshold=0.35, refine_radius=4)
    assert DetectionConfig.from_legacy(det.to_legacy()) == det
    # An export's sim_config.json names in_samples only where it is not the default "detect",
    # so that exports of the other models stay readable by versions without it.
    assert "detect_in_samples" not in det.to_legacy()
    refit = dataclasses.replace(det, in_samples="refit")
    exported = {**st.SimulationConfig.preset("paper").to_dict(), **refit.to_legacy()}
    assert exported["detect_in_samples"] == "refit"
    assert DetectionConfig.from_legacy(exported) == refit
    assert st.SimulationConfig.from_dict(exported) == st.SimulationConfig.preset("paper")
    # A model folder: detection.json wins over the legacy keys; without it the legacy keys count.
    from smlm_tfdiff.pretrained import WEIGHTS_DIR, load_phi
    for name in ("phi.weights.h5", "phi_config.json"):
        (tmp_path / name).write_bytes((pathlib.Path(WEIGHTS_DIR) / "paper" / name).read_bytes())
    (tmp_path / "sim_config.json").write_text(json.dumps(old))
    assert load_phi(str(tmp_path)).detection == det
    (tmp_path / "detection.json").write_text(DetectionConfig(threshold=0.25).to_json())
    assert load_phi(str(tmp_path)).detection == DetectionConfig(threshold=0.25)


def test_true_kde_matches_render_kde_and_checks_input(paper):
    pos = np.array([[[3.2, 4.1], [12.0, 15.5], [0.0, 0.0]]])
    kde = st.true_kde(pos, [[True, True, False]], paper)
    np.testing.assert_allclose(kde[0], st.render_kde(pos[0, :2], paper), atol=1e-12)
    m = st.oracle_metrics(pos[0, :2], None, paper)  # One frame [K, 2].
    assert (m["TP"], m["FP"], m["FN"]) == (2, 0, 0) and m["rmse_lateral_nm"] < 1e-6
    with pytest.raises(ValueError, match="mask shape"):
        st.true_kde(pos, [True, False], paper)
    with pytest.raises(ValueError, match="NaN"):
        st.true_kde(np.full((1, 1, 2), np.nan), None, paper)
