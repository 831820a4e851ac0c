import numpy as np
import pytest
import tensorflow as tf

from smlm_tfdiff.diffusion.schedule import (T_MIN, NoiseSchedule, diffusion_loss_weights,
                                   from_diffusion_space, loss_weight_table, per_example_loss,
                                   q_sample, sample_training_noise_level, to_diffusion_space)

NAMES = ("paper", "paper_extended", "linear", "cosine")


def test_paper_schedule_is_not_pure_noise():
    s = NoiseSchedule.named("paper")
    assert s.T == 100
    assert s.beta[0] == 0 and s.gamma[0] == 1 and np.isinf(s.snr(0))
    np.testing.assert_allclose(s.beta[[1, 100]], [1e-4, 1e-2])
    np.testing.assert_allclose(s.gamma, np.cumprod(1 - s.beta))
    assert 0.55 < s.gamma_T < 0.65  # The seeds' trap: y_T keeps ~sqrt(0.6) of the signal.
    assert 1.2 < s.snr(s.T) < 1.8


def test_noise_reaching_schedules():
    assert NoiseSchedule.cosine(100).gamma_T < 1e-3
    assert NoiseSchedule.named("cosine", 50).gamma_T < 1e-3
    assert NoiseSchedule.named("linear").gamma_T < 1e-3
    assert np.all(NoiseSchedule.cosine(100).beta <= 0.999)


def test_paper_extended_keeps_the_seeds_levels_and_reaches_noise():
    """Steps 1..100 are the seeds' (a psi trained on them keeps its meaning of every level), the
    40 steps after them continue the betas' rise and end in noise."""
    paper, ext = NoiseSchedule.named("paper"), NoiseSchedule.named("paper_extended")
    assert ext.T == 140 and ext.params == {"paper_T": 100, "extra_steps": 40, "beta_end": 0.3}
    np.testing.assert_array_equal(ext.gamma[:101], paper.gamma)
    step = paper.beta[2] - paper.beta[1]
    np.testing.assert_allclose(np.diff(ext.beta[101:]), (0.3 - 1e-2 - step) / 39 * np.ones(39),
                               rtol=1e-9)
    np.testing.assert_allclose(ext.beta[101], 1e-2 + step)
    assert ext.beta[140] == pytest.approx(0.3)
    assert 5e-4 < ext.gamma_T < 7e-4  # sqrt(gamma_T) = 0.024: y_T is noise.
    assert NoiseSchedule.named("paper_extended", 50).T == 70
    with pytest.raises(ValueError, match="beta_end"):
        NoiseSchedule.from_config({"name": "paper_extended", "beta_end": 0.005})
    with pytest.raises(ValueError, match="extra_steps"):
        NoiseSchedule.from_config({"name": "paper_extended", "extra_steps": 0})


@pytest.mark.parametrize("name", NAMES)
def test_snr_decreasing_and_config_round_trip(name):
    s = NoiseSchedule.named(name)
    snr = s.snr(np.arange(s.T + 1))
    assert np.all(np.diff(snr) < 0) and np.all(snr[1:] > 0)
    assert np.all(np.diff(s.gamma) < 0)
    s2 = NoiseSchedule.from_config(s.get_config())
    np.testing.assert_array_equal(s2.gamma, s.gamma)
    with pytest.raises(ValueError):
        s.gamma[3] = 0.5  # Arrays are read-only.


def test_bad_schedules():
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule([0.1, 1.0])
    with pytest.raises(ValueError, match="schedule name"):
        NoiseSchedule.named("quadratic")
    with pytest.raises(ValueError, match="t must lie"):
        NoiseSchedule.named("paper").snr(101)


def test_gamma_between():
    s = NoiseSchedule.named("paper")
    t = np.arange(1, s.T + 1)
    np.testing.assert_allclose(s.gamma_between(t, 0.0), s.gamma[1:], rtol=1e-12)
    np.testing.assert_allclose(s.gamma_between(t, 1.0), s.gamma[:-1], rtol=1e-12)
    mid = s.gamma_between(t, 0.5)
    np.testing.assert_allclose(np.sqrt(mid), 0.5 * (np.sqrt(s.gamma[1:]) + np.sqrt(s.gamma[:-1])))
    with pytest.raises(ValueError, match="t must lie"):
        s.gamma_between(0, 0.5)


def test_timesteps_for():
    s = NoiseSchedule.named("paper")
    np.testing.assert_array_equal(s.timesteps_for(s.T), np.arange(s.T, 0, -1))
    for num, start in ((1, None), (2, None), (10, None), (33, None), (99, None), (1, 60),
                       (7, 60), (60, 60)):
        steps = s.timesteps_for(num, start)
        assert len(steps) == num and steps.dtype == np.int64
        assert steps[0] == (start or s.T)
        assert np.all(np.diff(steps) < 0) and steps.min() >= 1
        if num > 1:
            assert steps[-1] == 1
            gaps = -np.diff(steps)
            assert gaps.max() - gaps.min() <= 1  # As even as integers allow.
    with pytest.raises(ValueError, match="num_steps"):
        s.timesteps_for(61, start=60)
    with pytest.raises(ValueError, match="num_steps"):
        s.timesteps_for(0)
    with pytest.raises(ValueError, match="start"):
        s.timesteps_for(5, start=101)


@pytest.mark.parametrize("name", NAMES)
def test_snr_weights(name):
    s = NoiseSchedule.named(name)
    table = loss_weight_table(s, "snr")
    assert table[0] == 0 and table[1] == 0  # t = 1 (infinite weight) is excluded, never inf.
    w = table[2:]
    assert np.all(np.isfinite(w)) and np.all(w > 0)
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-12)
    # Proportional to the seeds' eq. 8 weight (T/2)(SNR_{t-1}/SNR_t - 1).
    raw = 0.5 * s.T * (s.snr(np.arange(1, s.T)) / s.snr(np.arange(2, s.T + 1)) - 1)
    np.testing.assert_allclose(w / raw, np.full_like(raw, w[0] / raw[0]), rtol=1e-9)
    t = np.array([2, 50, s.T])
    np.testing.assert_allclose(np.asarray(diffusion_loss_weights(s, t, "snr")), table[t],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="defined for t in 2"):
        diffusion_loss_weights(s, np.array([1, 5]), "snr")


def test_simple_weights_and_errors():
    s = NoiseSchedule.named("paper")
    t = tf.constant([1, 2, 100])
    np.testing.assert_array_equal(np.asarray(diffusion_loss_weights(s, t, "simple")), 1.0)
    with pytest.raises(ValueError, match="weighting"):
        diffusion_loss_weights(s, t, "vlb")
    assert T_MIN == {"snr": 2, "simple": 1}


def test_training_draw():
    s = NoiseSchedule.named("paper")
    t, gamma = sample_training_noise_level(s, 20000, seed=3)
    t, gamma = np.asarray(t), np.asarray(gamma)
    assert t.dtype == np.int32 and gamma.dtype == np.float32 and t.shape == gamma.shape == (20000,)
    assert t.min() == 2 and t.max() == s.T  # Default t_min = 2 (SNR weighting).
    assert len(np.unique(t)) == s.T - 1
    lo, hi = s.gamma[t], s.gamma[t - 1]
    assert np.all(gamma >= lo * (1 - 1e-6)) and np.all(gamma <= hi * (1 + 1e-6))
    # Uniform in sqrt(gamma) within the bin: mean fraction 1/2, std 1/sqrt(12).
    u = (np.sqrt(gamma.astype(np.float64)) - np.sqrt(lo)) / (np.sqrt(hi) - np.sqrt(lo))
    assert abs(u.mean() - 0.5) < 5 / np.sqrt(12 * u.size)
    t1, _ = sample_training_noise_level(s, 20000, seed=3, t_min=T_MIN["simple"])
    assert np.asarray(t1).min() == 1
    with pytest.raises(ValueError, match="t_min"):
        sample_training_noise_level(s, 4, seed=0, t_min=0)


def test_training_draw_is_seeded():
    s = NoiseSchedule.named("cosine")
    a = sample_training_noise_level(s, 64, seed=tf.constant([1, 2]))
    b = sample_training_noise_level(s, 64, seed=[1, 2])
    c = sample_training_noise_level(s, 64, seed=[1, 3])
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert not np.array_equal(np.asarray(a[1]), np.asarray(c[1]))
    graph = tf.function(lambda seed: sample_training_noise_level(s, 64, seed))
    np.testing.assert_array_equal(np.asarray(graph(tf.constant([1, 2]))[1]), np.asarray(a[1]))


def test_q_sample_moments():
    rng = np.random.default_rng(0)
    gamma = np.array([0.999, 0.9, 0.6, 0.05], np.float32)
    y0 = np.ones((4, 64, 64, 1), np.float32) * np.array([-1.0, 0.5, 1.0, 2.0],
                                                        np.float32)[:, None, None, None]
    eps = rng.standard_normal(y0.shape).astype(np.float32)
    yt = np.asarray(q_sample(y0, gamma, eps)).reshape(4, -1)
    np.testing.assert_allclose(yt, (np.sqrt(gamma)[:, None, None, None] * y0
                                    + np.sqrt(1 - gamma)[:, None, None, None] * eps).reshape(4, -1),
                               rtol=1e-5, atol=1e-6)
    n = yt.shape[1]
    var = 1 - gamma.astype(np.float64)
    mean_tol = 5 * np.sqrt(var / n)  # 5 standard errors of the mean.
    var_tol = 5 * var * np.sqrt(2 / (n - 1))  # 5 standard errors of the variance (Gaussian).
    assert np.all(np.abs(yt.mean(1) - np.sqrt(gamma) * y0[:, 0, 0, 0]) < mean_tol)
    assert np.all(np.abs(yt.var(1, ddof=1) - var) < var_tol)
    # gamma [B, 1] broadcasts the same way.
    np.testing.assert_array_equal(np.asarray(q_sample(y0, gamma[:, None], eps)),
                                  np.asarray(q_sample(y0, gamma, eps)))


def test_per_example_loss_and_data_space():
    rng = np.random.default_rng(1)
    eps = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
    pred = rng.standard_normal((3, 8, 8, 1)).astype(np.float32)
    w = np.array([1.0, 2.0, 0.5], np.float32)
    expected = w * ((eps - pred) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(per_example_loss(eps, pred, w)), expected, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(per_example_loss(eps, pred)), expected / w, rtol=1e-6)
    kde = np.array([0.0, 0.5, 1.0, 1.7], np.float32)
    np.testing.assert_allclose(to_diffusion_space(kde), [-1.0, 0.0, 1.0, 2.4], rtol=1e-6)
    np.testing.assert_allclose(from_diffusion_space(to_diffusion_space(kde)), kde, rtol=1e-6)
