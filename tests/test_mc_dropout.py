"""MC dropout baseline: a phi with dropout layers, kept on at inference, seeded."""

import os

import keras
import numpy as np
import pytest

import smlm_tfdiff as st
from smlm_tfdiff.uncertainty.mc_dropout import dropout_layers, mc_dropout_model, mc_dropout_posterior
from smlm_tfdiff.models.phi import PhiConfig, build_phi

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(context_filters=8, dilations=(1, 2), upsample_filters=(8, 4), prediction_filters=4)


@pytest.fixture(scope="module")
def small_phis():
    # Untrained phis: seeded, so that their initial weights (and whether the clipped output is
    # non-zero, which the spread test needs) do not depend on what ran or was imported before.
    keras.utils.set_random_seed(3)
    cfg = st.SimulationConfig.preset("paper")
    plain = build_phi(cfg, PhiConfig(**SMALL))
    drop = build_phi(cfg, PhiConfig(dropout=0.2, **SMALL))
    drop.set_weights(plain.get_weights())
    frames = st.simulate(cfg, 2, seed=2)["frames"]
    assert np.mean(plain(frames, training=False).numpy() > 0) > 0.1, "phi's output is clipped flat"
    return cfg, plain, drop


def test_dropout_config_is_validated_and_adds_no_weights(small_phis):
    cfg, plain, drop = small_phis
    with pytest.raises(ValueError, match="dropout"):
        PhiConfig(dropout=1.0)
    with pytest.raises(ValueError, match="dropout"):
        PhiConfig(dropout=-0.1)
    assert PhiConfig.from_json(PhiConfig(dropout=0.1).to_json()).dropout == 0.1
    assert PhiConfig.from_json('{"context_filters": 32}').dropout == 0.0
    assert dropout_layers(plain) == []
    assert len(dropout_layers(drop)) == 1 + 2 + 2  # context0, two dilations, two resize-convs.
    assert plain.count_params() == drop.count_params()
    # Inference without MC is the deterministic phi.
    frames = st.simulate(cfg, 2, seed=1)["frames"]
    np.testing.assert_allclose(drop(frames, training=False), plain(frames, training=False),
                               atol=1e-6)


def test_mc_dropout_posterior_is_seeded_and_spread(small_phis):
    cfg, plain, drop = small_phis
    frames = st.simulate(cfg, 3, seed=2)["frames"]
    a = mc_dropout_posterior(drop, frames, num_samples=8, seed=5, return_samples=True,
                             max_images=16)  # Two frames per call: the chunking is exercised.
    b = mc_dropout_posterior(drop, frames, num_samples=8, seed=5, return_samples=True,
                             max_images=16)
    c = mc_dropout_posterior(drop, frames, num_samples=8, seed=6)
    assert a["samples"].shape == (3, 8, 80, 80, 1)
    whole = mc_dropout_posterior(drop, frames, num_samples=8, seed=5)  # One call.
    assert whole["std"].shape == a["std"].shape
    np.testing.assert_allclose(whole["y_hat"], a["y_hat"], atol=1e-6)
    assert a["mean"].shape == a["std"].shape == a["y_hat"].shape == (3, 80, 80, 1)
    np.testing.assert_array_equal(a["samples"], b["samples"])  # Same seed, same samples.
    assert not np.allclose(a["std"], c["std"])
    np.testing.assert_allclose(a["y_hat"], plain(frames, training=False), atol=1e-6)
    np.testing.assert_allclose(a["std"], a["samples"].std(axis=1), rtol=1e-5, atol=1e-7)
    assert a["std"].max() > 0
    assert a["samples"].min() >= 0.0  # The output clip stays on.
    # The samples differ from each other: dropout is on in every pass.
    assert np.abs(a["samples"][:, 0] - a["samples"][:, 1]).max() > 0


def test_mc_dropout_refuses_a_phi_without_dropout(small_phis):
    cfg, plain, _ = small_phis
    frames = st.simulate(cfg, 1, seed=3)["frames"]
    with pytest.raises(ValueError, match="no dropout layers.*--dropout"):
        mc_dropout_posterior(plain, frames, num_samples=4)
    with pytest.raises(ValueError, match="no dropout layers"):
        mc_dropout_model(plain)
    _, _, drop = small_phis
    with pytest.raises(ValueError, match="num_samples"):
        mc_dropout_posterior(drop, frames, num_samples=1)


def test_train_phi_fine_tunes_with_dropout(tmp_path, cli):
    """--init_phi copies a trained phi's weights into a phi with dropout (and another input
    transform), which then trains."""
    base, tuned = str(tmp_path / "base"), str(tmp_path / "tuned")
    small = ["--context_filters=8", "--dilations=1,2", "--upsample_filters=8,4",
             "--prediction_filters=4"]
    common = ["--batch_size=8", "--log_every=2", "--eval_every=100", "--checkpoint_every=2",
              "--val_frames=4", "--warmup_steps=1", "--noprogress", *small]
    script = os.path.join(ROOT, "trainers", "train_phi.py")
    for args in ([f"--out_dir={base}", "--steps=2"],
                 [f"--out_dir={tuned}", "--steps=2", f"--init_phi={base}", "--dropout=0.1",
                  "--input_transform=anscombe"]):
        res = cli(script, *args, *common)
        assert res.returncode == 0, res.stderr[-3000:]
    models = st.load_phi(tuned)
    assert models.phi_config.dropout == 0.1 and dropout_layers(models.phi)
    assert (models.phi_config.input_transform, models.phi_config.photon_scale) == ("anscombe", 4.0)
    # Other dilation rates (as many): the same kernels, another receptive field.
    rates = str(tmp_path / "rates")
    res = cli(script, f"--out_dir={rates}", "--steps=1", f"--init_phi={base}", *common,
              "--dilations=2,1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert st.load_phi(rates).phi_config.dilations == (2, 1)
    # Mismatched widths, or another number of rates, are refused with the fix in the message.
    for wrong in (["--context_filters=16"], ["--dilations=1,2,4"]):
        res = cli(script, f"--out_dir={tmp_path / 'bad'}", "--steps=1", f"--init_phi={base}",
                  *common, *wrong)
        assert res.returncode != 0 and "set the phi flags to match it" in res.stderr


def test_bundled_mc_dropout_phi():
    """The bundled baseline: dropout 0.1, the paper camera, no psi (analyze refuses it)."""
    from smlm_tfdiff.analyze import load_backend
    from smlm_tfdiff.pretrained import available
    models = st.pretrained("paper_mcdropout")
    assert "paper_mcdropout" in available()
    assert models.psi is None and models.phi_config.dropout == 0.1
    assert models.config == st.pretrained("paper").config
    assert len(dropout_layers(models.phi)) == 9
    with pytest.raises(FileNotFoundError, match="paper_mcdropout holds phi but no trained psi"):
        load_backend("paper_mcdropout")
