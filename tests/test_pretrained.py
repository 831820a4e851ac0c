"""The bundled paper-preset phi: loads out of the box and localizes held-out frames."""

import numpy as np
import pytest

import smlm_tfdiff as st


def test_bundled_phi_localizes_paper_frames():
    model = st.pretrained("paper")
    assert model.config == st.SimulationConfig.preset("paper")
    data = st.simulate(model.config, 100, seed=123_456)
    kde = np.asarray(model.phi(data["frames"], training=False))
    assert kde.shape == (100, 80, 80, 1)
    # The KDE scale: sum / (2 pi sigma^2) counts the emitters.
    count = kde.sum(axis=(1, 2, 3)) / model.config.kde_norm
    assert count.mean() == pytest.approx(10.0, rel=0.05)
    m = st.localization_metrics(st.detect(kde, model.config), data, model.config)
    assert m["precision"] > 0.97 and m["recall"] > 0.85
    assert m["rmse_lateral_nm"] < 60


def test_isolated_emitters_near_the_crlb():
    model = st.pretrained("paper")
    config = model.scene_config("isolated")
    assert config == st.SimulationConfig.preset("isolated")
    data = st.simulate(config, 200, seed=654_321)
    kde = np.asarray(model.phi(data["frames"], training=False))
    m = st.localization_metrics(st.detect(kde, config), data, config)
    assert m["precision"] >= 0.99 and m["recall"] >= 0.99
    bound = st.crlb(data["positions"][:, 0], config)
    crlb_nm = np.sqrt(np.mean(np.sum(bound ** 2, axis=1))) * config.pixel_size_nm
    # 200 localizations: the RMSE estimate has ~5% relative standard error.
    assert m["rmse_lateral_nm"] < 1.5 * crlb_nm


def test_unknown_model_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="no bundled model"):
        st.pretrained("nope")
    with pytest.raises(FileNotFoundError, match="train_phi.py"):
        st.load_phi(str(tmp_path))
