import keras
import numpy as np
import pytest

import smlm_tfdiff as st
from smlm_tfdiff.models.phi import PhiConfig, build_phi, output_bound


def test_shapes_any_frame_size(paper):
    phi = build_phi(paper)
    for h, w in ((20, 20), (32, 48)):
        out = phi(np.full((2, h, w, 1), 100.0, np.float32), training=False)
        assert tuple(out.shape) == (2, 4 * h, 4 * w, 1)
        assert np.all(np.asarray(out) >= 0)


def test_normalisation_uses_camera_offset_and_gain(paper):
    phi = build_phi(paper.replace(offset=500.0, gain=4.0), PhiConfig(photon_scale=20.0))
    layer = phi.get_layer("photons")
    x = np.full((1, 4, 4, 1), 580.0, np.float32)
    np.testing.assert_allclose(np.asarray(layer(x)), (580 - 500) / (4 * 20), rtol=1e-6)
    with pytest.raises(ValueError, match="per-pixel camera maps"):
        build_phi(paper.replace(gain=np.ones((20, 20))))


def test_anscombe_input_stabilises_camera_noise(paper):
    """The anscombe input has unit noise (over photon_scale) at any brightness: Poisson photons
    through the seeds' camera (gain 2.5 ADU per photon, readout variance 5 ADU^2)."""
    config = paper.replace(offset=100.0, gain=2.5, readout_var=5.0)
    phi = build_phi(config, PhiConfig(input_transform="anscombe", photon_scale=4.0))
    layer = phi.get_layer("photons")
    rng = np.random.default_rng(0)
    n = 40_000
    for rate in (5.0, 50.0, 500.0, 5000.0):
        adu = (config.gain * rng.poisson(rate, n) + config.offset
               + rng.normal(0.0, np.sqrt(config.readout_var), n))
        value = np.asarray(layer(adu.astype(np.float32)[None, :, None, None]))
        expected = 2 * np.sqrt(np.maximum((adu - 100.0) / 2.5 + 3 / 8 + 5.0 / 2.5 ** 2, 0)) / 4
        np.testing.assert_allclose(value.ravel(), expected, rtol=1e-4, atol=1e-4)
        # Anscombe's approximation: std 1 up to O(1/rate) (4% at 5 photons); sampling: 0.4%.
        assert 4 * value.std() == pytest.approx(1.0, abs=0.05), rate
    with pytest.raises(ValueError, match="input_transform"):
        PhiConfig(input_transform="log")
    with pytest.raises(ValueError, match="readout_var"):
        build_phi(paper.replace(readout_var=np.ones((20, 20))),
                  PhiConfig(input_transform="anscombe"))
    # A config written before the option reads as the seeds' linear input.
    old = '{"context_filters": 32, "photon_scale": 20.0}'
    assert PhiConfig.from_json(old).input_transform == "linear"


def test_output_bound_never_clips_targets(paper_models):
    for name in ("paper", "dense", "isolated"):
        config = st.SimulationConfig.preset(name)
        bound = output_bound(config)
        # Worst case: all K emitters on one spot.
        k = config.padded_emitters
        kde = st.render_kde(np.full((k, 2), 10.125), config)
        assert kde.max() <= bound
        data = st.simulate(config, 200, seed=0)
        assert data["kde"].max() < bound
    # phi's inference output saturates there: a frame far brighter than any emitter gives the
    # bound exactly (an untrained phi as well as the bundled one), never more. Whether an
    # untrained phi's last layer points up or down at such a frame depends on its draw (3 of 80
    # draws give 0 everywhere): a fixed draw that points up.
    config = st.SimulationConfig.preset("paper")
    x = np.full((1, 20, 20, 1), 100.0, np.float32)
    x[0, 8:12, 8:12, 0] = 1e6
    keras.utils.set_random_seed(0)
    for phi in (build_phi(config), paper_models.phi):
        out = np.asarray(phi(x, training=False))
        assert out.min() >= 0.0 and out.max() == pytest.approx(output_bound(config))


def test_hardtanh_is_identity_when_training(paper):
    from smlm_tfdiff.models.phi import HardTanh
    layer = HardTanh(0.0, 2.0)
    x = np.array([-1.0, 0.5, 3.0], np.float32)
    np.testing.assert_allclose(np.asarray(layer(x, training=False)), [0.0, 0.5, 2.0])
    np.testing.assert_allclose(np.asarray(layer(x, training=True)), x)


def test_bad_phi_config(paper):
    with pytest.raises(ValueError, match="dilations"):
        PhiConfig(dilations=(0, 1))
    with pytest.raises(ValueError, match="upsampl"):
        build_phi(paper, PhiConfig(upsample_filters=(8,)))
    assert PhiConfig.from_json(PhiConfig().to_json()) == PhiConfig()


def test_resize_conv_is_upsampling_then_conv():
    import keras
    from smlm_tfdiff.models.phi import ResizeConv2D
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    fused = ResizeConv2D(4, use_bias=True, activation="relu")
    out = np.asarray(fused(x))
    assert out.shape == (2, 10, 14, 4)
    fused.bias.assign(rng.standard_normal(4).astype(np.float32))
    conv = keras.layers.Conv2D(4, 3, padding="same", activation="relu")
    up = keras.layers.UpSampling2D(2, interpolation="nearest")(x)
    conv.build(up.shape)
    conv.set_weights(fused.get_weights())
    np.testing.assert_allclose(np.asarray(fused(x)), np.asarray(conv(up)), atol=1e-5)
    with pytest.raises(ValueError, match="3x3"):
        ResizeConv2D(4, kernel_size=5)


def test_weights_of_the_unfused_layout_still_load(paper, tmp_path):
    from smlm_tfdiff.pretrained import load_phi
    legacy = build_phi(paper, fused_resize=False)
    rng = np.random.default_rng(1)
    legacy.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32)
                        for w in legacy.get_weights()])
    legacy.save_weights(str(tmp_path / "phi.weights.h5"))
    (tmp_path / "phi_config.json").write_text(PhiConfig().to_json())
    (tmp_path / "sim_config.json").write_text(paper.to_json())
    phi = load_phi(str(tmp_path)).phi
    assert not any(layer.name == "upsample0" for layer in phi.layers)
    x = st.simulate(paper, 4, seed=2)["frames"]
    np.testing.assert_allclose(np.asarray(phi(x, training=False)),
                               np.asarray(legacy(x, training=False)), rtol=1e-4, atol=1e-4)
