import numpy as np
import pytest

import smlm_tfdiff as st


def test_paper_preset_matches_design():
    c = st.SimulationConfig.preset("paper")
    assert (c.frame_height, c.frame_width) == (20, 20)
    assert c.psf_sigma == 0.92 and c.photons == 200.0 and c.photons_range is None
    assert c.offset == 100.0 and c.readout_var == 5.0 and c.gain == 1.0 and c.background == 0.0
    assert c.num_emitters == 10 and c.emitter_count == "fixed"
    assert c.region == "disc" and c.disc_radius == 7.0 and c.center == (10.0, 10.0)
    assert c.hr_shape == (80, 80) and c.kde_sigma == 3.0 and c.pixel_size_nm == 108.3
    assert c.kde_norm == pytest.approx(2 * np.pi * 9.0)


def test_presets_are_variations_of_paper():
    paper = st.SimulationConfig.preset("paper")
    assert st.SimulationConfig.preset("isolated") == paper.replace(num_emitters=1)
    assert st.SimulationConfig.preset("bright") == paper.replace(photons=1000.0)
    with pytest.raises(ValueError, match="unknown preset"):
        st.SimulationConfig.preset("nope")


@pytest.mark.parametrize("changes, field", [
    (dict(psf_sigma=-1.0), "psf_sigma"),
    (dict(kde_sigma=0.0), "kde_sigma"),
    (dict(disc_radius=11.0), "disc_radius"),
    (dict(disc_center=(3.0, 10.0)), "disc_radius"),
    (dict(photons=0.0), "photons"),
    (dict(photons_range=(0.0, 10.0)), "photons_range"),
    (dict(photons_range=(20.0, 10.0)), "photons_range"),
    (dict(gain=np.ones((10, 20))), "gain"),
    (dict(offset=np.ones((20, 21))), "offset"),
    (dict(readout_var=-1.0), "readout_var"),
    (dict(background=np.full((20, 20), np.nan)), "background"),
    (dict(gain=0.0), "gain"),
    (dict(emitter_count="many"), "emitter_count"),
    (dict(region="square"), "region"),
    (dict(region="frame", margin=10.0), "margin"),
    (dict(region="frame", margin=-4.0), "margin"),
    (dict(emitter_count="poisson", density_range=(0.0, 0.1)), "density_range"),
    (dict(density_range=(0.01, 0.1)), "density_range"),  # Needs Poisson counts.
    (dict(background_range=(-1.0, 5.0)), "background_range"),
    (dict(photons_range=(100.0, 500.0), photons_distribution="normal"), "photons_distribution"),
    (dict(max_emitters=5), "max_emitters"),
    (dict(upsample=0), "upsample"),
    (dict(frame_width=19.5), "frame_width"),
])
def test_bad_config_names_the_field(changes, field):
    with pytest.raises(ValueError, match=rf"SimulationConfig\.{field}"):
        st.SimulationConfig.preset("paper", **changes)


def test_json_round_trip_with_maps():
    rng = np.random.default_rng(0)
    c = st.SimulationConfig(gain=rng.uniform(1, 2, (20, 20)), readout_var=rng.uniform(1, 9, (20, 20)),
                            photons_range=(100.0, 500.0))
    back = st.SimulationConfig.from_json(c.to_json())
    assert back == c
    np.testing.assert_array_equal(back.gain, c.gain)
    assert back != c.replace(photons_range=(100.0, 501.0))


def test_poisson_padding():
    c = st.SimulationConfig.preset("dense")
    assert c.padded_emitters >= c.num_emitters + 6 * np.sqrt(c.num_emitters)
    assert c.replace(max_emitters=40).padded_emitters == 40


@pytest.mark.parametrize("entry, field", [
    ('"photons_range": 500', "photons_range"), ('"photons_range": [100, "a"]', "photons_range"),
    ('"disc_center": 3', "disc_center"), ('"photons": "200"', "photons"),
    ('"psf_sigma": null', "psf_sigma"), ('"gain": "high"', "gain"),
    ('"background": [[1, 2], "x"]', "background"), ('"region": 1', "region"),
    ('"max_emitters": 2.5', "max_emitters"), ('"upsample": true', "upsample"),
    ('"density_range": 0.1', "density_range"), ('"background_range": [1, null]', "background_range"),
])
def test_json_config_of_a_wrong_type_names_the_field(entry, field):
    with pytest.raises(ValueError, match=rf"SimulationConfig\.{field}: must be"):
        st.SimulationConfig.from_json("{" + entry + "}")
    assert st.SimulationConfig.from_json('{"photons_range": [100, 500], "photons": 300}')
