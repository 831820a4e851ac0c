"""The forward model against closed forms and an independent NumPy/SciPy implementation."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import erf

import smlm_tfdiff as st
from smlm_tfdiff.simulation.physics import poisson_nll, sample_frames, frame_moments
from smlm_tfdiff.simulation.physics.psf import expected_counts_batch


def _de_np(coord, n, sigma):
    edges = np.arange(n + 1, dtype=np.float64)
    c = 0.5 * erf((edges - coord) / (np.sqrt(2) * sigma))
    return c[1:] - c[:-1]


def _omega_np(theta, config):
    """Independent expected counts (x, y, N0) -> [H, W] (+ background)."""
    x, y, n0 = theta
    dex = _de_np(x, config.frame_width, config.psf_sigma)
    dey = _de_np(y, config.frame_height, config.psf_sigma)
    return n0 * np.outer(dey, dex) + config.background


def test_psf_normalisation_and_total_photons(paper):
    omega = st.expected_counts([[10.0, 10.0]], [200.0], paper)
    # Fraction of a Gaussian of width 0.92 px beyond 10 px is ~1e-27: all photons land on the frame.
    assert omega.sum() == pytest.approx(200.0, rel=1e-9)
    np.testing.assert_allclose(omega, _omega_np((10.0, 10.0, 200.0), paper), rtol=1e-9, atol=1e-12)
    bg = paper.replace(background=3.0)
    assert st.expected_counts([[10.0, 10.0]], [200.0], bg).sum() == pytest.approx(200 + 3 * 400)
    assert st.expected_counts([[10.0, 10.0]], [200.0], bg, include_background=False).sum() == \
        pytest.approx(200.0)
    # Emitter at the frame edge: exactly half the light in x falls outside.
    edge = st.expected_counts([[0.0, 10.0]], [200.0], paper)
    assert edge.sum() == pytest.approx(100.0, rel=1e-9)


def test_coordinate_convention(paper):
    omega = st.expected_counts([[10.5, 3.5]], [200.0], paper)
    assert np.unravel_index(omega.argmax(), omega.shape) == (3, 10)
    # (10.5, 3.5) LR is (42, 14) HR: the corner of HR pixel [14, 42], tied with its 3 neighbours.
    kde = st.render_kde([[10.5, 3.5]], paper)
    assert kde[14, 42] == pytest.approx(kde.max(), rel=1e-12)
    assert kde[14, 42] == pytest.approx(kde[13, 41], rel=1e-12)
    kde = st.render_kde([[10.55, 3.55]], paper)  # Inside HR pixel [14, 42]: the unique maximum.
    assert np.unravel_index(kde.argmax(), kde.shape) == (14, 42)
    # Moving in x moves columns, not rows.
    kde2 = st.render_kde([[12.55, 3.55]], paper)
    assert np.unravel_index(kde2.argmax(), kde2.shape) == (14, 50)


def test_kde_scale(paper):
    s = paper.kde_sigma
    kde = st.render_kde([[10.125, 10.125]], paper)  # HR pixel centre (40.5, 40.5).
    peak = 2 * np.pi * s ** 2 * erf(0.5 / (np.sqrt(2) * s)) ** 2
    assert kde.max() == pytest.approx(peak, rel=1e-9)
    assert 0.98 < peak < 1.0  # "An isolated emitter peaks near 1".
    rng = np.random.default_rng(1)
    pos = rng.uniform(5, 15, size=(7, 2))
    kde = st.render_kde(pos, paper)
    assert kde.sum() / paper.kde_norm == pytest.approx(7.0, rel=1e-6)
    assert kde.shape == (80, 80)


def test_frame_moments_match_camera_model():
    """Per-pixel mean and variance of many frames of a fixed emitter, with sCMOS maps."""
    rng = np.random.default_rng(2)
    config = st.SimulationConfig(gain=rng.uniform(0.5, 2.0, (20, 20)),
                                 offset=rng.uniform(90, 110, (20, 20)),
                                 readout_var=rng.uniform(1.0, 10.0, (20, 20)),
                                 background=2.0, photons=500.0)
    n = 20000
    rate = st.expected_counts([[9.3, 10.7]], [500.0], config)
    frames = sample_frames(tf.constant(np.broadcast_to(rate, (n, 20, 20)), tf.float32), config,
                           tf.constant([3, 4])).numpy().astype(np.float64)
    mean_th, var_th = (m.numpy() for m in frame_moments(rate, config))
    g = config.gain
    # Cumulants of gain*Poisson(rate) + Normal: k4 = g^4 rate, Var(s^2) ~ (k4 + 2 var^2) / n.
    se_mean = np.sqrt(var_th / n)
    se_var = np.sqrt((g ** 4 * rate + 2 * var_th ** 2) / n)
    z_mean = (frames.mean(0) - mean_th) / se_mean
    z_var = (frames.var(0, ddof=1) - var_th) / se_var
    # 400 pixels each: |z| < 4.5 has a family-wise false-alarm rate below 0.3%.
    assert np.abs(z_mean).max() < 4.5
    assert np.abs(z_var).max() < 4.5
    # Mean total photons per frame after offset/gain correction.
    photons = ((frames - config.offset) / g).sum(axis=(1, 2))
    assert photons.mean() == pytest.approx(500 + 2 * 400, abs=5 * photons.std() / np.sqrt(n))


def test_poisson_nll_matches_eq10_and_peaks_at_truth(paper):
    rng = np.random.default_rng(3)
    truth = (9.7, 10.2)
    rate = st.expected_counts([truth], [2000.0], paper)
    frame = sample_frames(tf.constant(rate[None], tf.float32), paper, tf.constant([5, 6]))
    frame = frame.numpy()[0].astype(np.float64)
    nll = poisson_nll(frame, rate, paper, dtype=tf.float64).numpy()
    n = np.maximum(frame - 100.0 + 5.0, 0.0)
    w = rate + 5.0
    from scipy.special import gammaln
    assert nll == pytest.approx(np.sum(gammaln(n + 1) + w - n * np.log(w)), rel=1e-10)
    # The maximum-likelihood position on a fine grid lies within 4 CRLB of the truth.
    grid = np.linspace(-0.3, 0.3, 61)
    shifted = np.array([[[truth[0] + dx, truth[1] + dy]] for dy in grid for dx in grid])
    rates = expected_counts_batch(shifted, np.full((len(shifted), 1), 2000.0), paper,
                                  dtype=tf.float64).numpy()  # One frame per shifted position.
    values = poisson_nll(np.broadcast_to(frame, rates.shape), rates, paper, dtype=tf.float64)
    iy, ix = np.unravel_index(np.argmin(values.numpy()), (61, 61))
    bound = st.crlb(truth, paper, photons=2000.0)
    assert abs(grid[ix]) < 4 * bound[0] + 0.01 and abs(grid[iy]) < 4 * bound[1] + 0.01
    del rng


def _fisher_fd(theta, config, params, h=1e-5):
    """Finite-difference Fisher information, independent of the TF implementation."""
    theta = np.asarray(theta, np.float64)
    w = _omega_np(theta, config) + config.readout_var / config.gain ** 2
    grads = []
    for i in range(params):
        step = np.zeros(3)
        step[i] = h * max(1.0, abs(theta[i]))
        grads.append((_omega_np(theta + step, config) - _omega_np(theta - step, config))
                     / (2 * step[i]))
    grads = np.stack([g.ravel() for g in grads])
    return (grads / w.ravel()) @ grads.T


@pytest.mark.parametrize("theta", [(10.0, 10.0, 200.0), (6.3, 13.8, 500.0), (10.5, 3.5, 1000.0)])
def test_fisher_matches_finite_differences(paper, theta):
    config = paper.replace(background=1.5)
    for params, estimate in ((2, False), (3, True)):
        info = st.fisher_information(np.array([theta[:2]]), config, [theta[2]], estimate)[0].numpy()
        reference = _fisher_fd(theta, config, params)
        # Central differences carry ~1e-8 relative error of the largest entry.
        np.testing.assert_allclose(info, reference, rtol=1e-6, atol=1e-7 * np.abs(reference).max())
        bound = st.crlb(theta[:2], config, photons=theta[2], estimate_photons=estimate)
        np.testing.assert_allclose(
            bound, np.sqrt(np.diag(np.linalg.inv(_fisher_fd(theta, config, params)))), rtol=1e-6)


def test_crlb_paper_value_and_scaling(paper):
    bound = st.crlb([10.0, 10.0], paper)
    assert bound == pytest.approx([0.095, 0.095], abs=1e-3)
    assert bound[0] * paper.pixel_size_nm == pytest.approx(10.3, abs=0.1)
    # Symmetric in x and y; batched input gives the same numbers.
    batch = st.crlb([[10.0, 10.0], [9.4, 11.2]], paper)
    np.testing.assert_allclose(batch[0], bound, rtol=1e-12)
    # Estimating N0 too can only widen the x, y bound.
    assert np.all(st.crlb([9.4, 11.2], paper, estimate_photons=True)[:2] >= batch[1] - 1e-12)
    # Shot-noise limit: sqrt(CRLB) ~ 1 / sqrt(N0) once readout noise is negligible.
    hi = st.crlb([10.0, 10.0], paper, photons=1e5)
    hi4 = st.crlb([10.0, 10.0], paper, photons=4e5)
    assert hi[0] / hi4[0] == pytest.approx(2.0, rel=5e-3)
    with pytest.raises(ValueError, match="position"):
        st.crlb([10.0], paper)
    with pytest.raises(ValueError, match="photons"):
        st.crlb([10.0, 10.0], paper, photons=-1.0)


def test_crlb_per_emitter_background_equals_one_config_per_emitter(paper):
    """The batched CRLB (one background per emitter, as analyze's crlb_xy column uses it) against
    one call per emitter with that background in the config."""
    pos = np.array([[10.0, 10.0], [3.3, 15.2], [0.4, 19.7]])
    photons = np.array([200.0, 1500.0, 80.0])
    background = np.array([0.0, 12.5, 40.0])
    batch = st.crlb(pos, paper, photons=photons, estimate_photons=True, background=background)
    for k in range(len(pos)):
        one = st.crlb(pos[k], paper.replace(background=background[k]), photons=photons[k],
                      estimate_photons=True)
        np.testing.assert_allclose(batch[k], one, rtol=1e-12)
    # More background, wider bound.
    assert st.crlb(pos[0], paper, background=10.0)[0] > st.crlb(pos[0], paper)[0]
    with pytest.raises(ValueError, match="background"):
        st.crlb(pos, paper, background=[0.0, -1.0, 0.0])


def test_numpy_pixel_integrals_equal_the_tensorflow_ones():
    from smlm_tfdiff.simulation.physics.psf import pixel_integrals, pixel_integrals_numpy

    coord = np.array([-0.7, 0.0, 3.25, 9.999, 12.5])
    ref = pixel_integrals(coord, 12, 0.92, dtype=tf.float64).numpy()
    values, slope = pixel_integrals_numpy(coord, 12, 0.92, with_derivative=True)
    np.testing.assert_allclose(values, ref, rtol=0, atol=1e-15)
    # The derivative against central differences of the integrals themselves.
    h = 1e-6
    numeric = (pixel_integrals_numpy(coord + h, 12, 0.92) - pixel_integrals_numpy(coord - h, 12,
                                                                                  0.92)) / (2 * h)
    np.testing.assert_allclose(slope, numeric, atol=1e-8)
