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


def test_output_bound_never_clips_targets():
    for name in ("paper", "dense", "isolated"):
        config = st.SimulationConfig.preset(name)
        bound = output_bound(config)
        # Worst case: all K emitters on one spot.
        k = config.padded_emitters
        kde = st.render_kde(np.full((k, 2), 10.125), config)
        assert kde.max() <= bound
        data = st.simulate(config, 200, seed=0)
        assert data["kde"].max() < bound
    phi = build_phi(st.SimulationConfig.preset("paper"))
    assert phi.get_layer("kde").high == output_bound(st.SimulationConfig.preset("paper"))


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
