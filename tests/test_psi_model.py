import dataclasses
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from smlm_tfdiff.diffusion.schedule import q_sample, to_diffusion_space
from smlm_tfdiff.models.psi import (NoiseLevelEmbedding, PsiConfig, build_psi,
                                    check_input_size, transfer_weights)

TINY = PsiConfig(base_channels=8, channel_multipliers=(1, 2), attention_resolutions=(10,),
                 image_size=20, dropout=0.0, groups=4, embedding_dim=16)


def _batch(b=4, size=20, seed=0):
    rng = np.random.default_rng(seed)
    return {"y_t": rng.standard_normal((b, size, size, 1)).astype(np.float32),
            "y_hat": rng.uniform(0, 1, (b, size, size, 1)).astype(np.float32),
            "noise_level": rng.uniform(0.2, 1.0, (b,)).astype(np.float32)}


def test_shapes_and_zero_output_at_init():
    psi = build_psi(TINY)
    for size, nl_shape in ((20, (3,)), (40, (3, 1))):
        batch = _batch(3, size)
        batch["noise_level"] = batch["noise_level"].reshape(nl_shape)
        for training in (False, True):
            out = np.asarray(psi(batch, training=training))
            assert out.shape == (3, size, size, 1) and out.dtype == np.float32
            np.testing.assert_array_equal(out, 0.0)  # Zero-initialised output conv.
    static = build_psi(TINY, image_size=20)
    assert tuple(static.get_layer("y_t").output.shape) == (None, 20, 20, 1)
    assert {i.name for i in psi.inputs} == {"y_t", "y_hat", "noise_level"}


def test_input_size_checks():
    assert check_input_size(80, 80)[-1] == (5, 5)
    assert check_input_size(80, 160, PsiConfig())[2] == (20, 40)
    with pytest.raises(ValueError, match="divisible by 16"):
        check_input_size(20, 20)
    with pytest.raises(ValueError, match="divisible by 2"):
        build_psi(TINY, image_size=21)
    with pytest.raises(ValueError, match="divisible by 16"):
        build_psi(PsiConfig(base_channels=8, groups=4), image_size=(80, 88))


def test_config_validation_and_json():
    with pytest.raises(ValueError, match="groups"):
        PsiConfig(base_channels=12, groups=8)
    with pytest.raises(ValueError, match="attention_resolutions"):
        PsiConfig(attention_resolutions=(16,))  # The seeds' 16x16 is not on 80/40/20/10/5.
    with pytest.raises(ValueError, match="image_size"):
        PsiConfig(image_size=72)
    with pytest.raises(ValueError, match="dropout"):
        PsiConfig(dropout=1.0)
    with pytest.raises(ValueError, match="num_heads"):
        PsiConfig(num_heads=3)
    with pytest.raises(ValueError, match="embedding_dim"):
        PsiConfig(embedding_dim=15)
    with pytest.raises(ValueError, match="prediction"):
        PsiConfig(prediction="x0")
    for config in (PsiConfig(), TINY, PsiConfig(prediction="v_residual")):
        assert PsiConfig.from_json(config.to_json()) == config
    # Configs written before the field existed read as eps-prediction models.
    old = {k: v for k, v in json.loads(TINY.to_json()).items() if k != "prediction"}
    assert PsiConfig.from_json(json.dumps(old)).prediction == "eps"
    assert PsiConfig().attention_levels == (2, 3)
    assert PsiConfig().resolutions == (80, 40, 20, 10, 5)


@pytest.mark.parametrize("prediction", ["v", "v_residual"])
def test_v_prediction_returns_eps_from_the_networks_v(prediction):
    """prediction "v": eps = sqrt(g) v + sqrt(1 - g) u with v the same network's output and u =
    y_t, or u = y_t - sqrt(g) mu for "v_residual" (mu = 2 y_hat - 1). So a v-model with an
    eps-model's weights returns that combination of the eps-model's output; at init (v = 0) it
    predicts z_0 = sqrt(g) y_t, or z_0 = mu + sqrt(g) u (phi's estimate at noise)."""
    keras.utils.set_random_seed(3)
    eps_model = build_psi(TINY)
    rng = np.random.default_rng(4)
    eps_model.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype)
                           for w in eps_model.get_weights()])
    v_model = build_psi(dataclasses.replace(TINY, prediction=prediction))
    batch = _batch(3, 20)
    g = batch["noise_level"].reshape(-1, 1, 1, 1) ** 2
    mu = 2 * batch["y_hat"] - 1 if prediction == "v_residual" else 0 * batch["y_hat"]
    u = batch["y_t"] - np.sqrt(g) * mu
    np.testing.assert_allclose(np.asarray(v_model(batch)), np.sqrt(1 - g) * u, atol=1e-6)
    v_model.set_weights(eps_model.get_weights())
    v = np.asarray(eps_model(batch))
    np.testing.assert_allclose(np.asarray(v_model(batch)), np.sqrt(g) * v + np.sqrt(1 - g) * u,
                               atol=1e-5)
    # What the sampler reads off it: z_0 = (y_t - sqrt(1 - g) eps) / sqrt(g) = mu + sqrt(g) u -
    # sqrt(1 - g) v, with no 1 / sqrt(g) on the network's output.
    z0 = (batch["y_t"] - np.sqrt(1 - g) * np.asarray(v_model(batch))) / np.sqrt(g)
    np.testing.assert_allclose(z0, mu + np.sqrt(g) * u - np.sqrt(1 - g) * v, atol=1e-4)


def _attention_levels(model):
    levels = {"down": set(), "up": set()}
    for layer in model.layers:
        if layer.name.endswith("_attn") and layer.name != "mid_attn":
            path = "down" if layer.name.startswith("down") else "up"
            levels[path].add((int(layer.name[len(path)]), layer.output.shape[1]))
    return levels


def test_attention_where_configured():
    narrow = dict(base_channels=8, groups=4)  # The default pyramid, cheap to build.
    model = build_psi(PsiConfig(**narrow), image_size=80)
    levels = _attention_levels(model)
    assert levels["down"] == levels["up"] == {(2, 20), (3, 10)}
    assert model.get_layer("mid_attn").output.shape[1] == 5
    # One attention block after each res block of an attention level (1 down + 2 up).
    names = [layer.name for layer in model.layers if layer.name.endswith("_attn")]
    assert len(names) == 2 * (1 + 2) + 1
    model = build_psi(PsiConfig(attention_resolutions=(40,), **narrow), image_size=80)
    assert _attention_levels(model)["down"] == {(1, 40)}
    model = build_psi(PsiConfig(attention_resolutions=(), **narrow))
    assert [layer.name for layer in model.layers if layer.name.endswith("_attn")] == ["mid_attn"]


def test_noise_level_embedding():
    layer = NoiseLevelEmbedding(16, 1000.0)
    nl = np.array([0.5, 0.6, 0.999, 1.0], np.float32)
    e = np.asarray(layer(nl))
    assert e.shape == (4, 16)
    np.testing.assert_allclose(e, np.asarray(layer(nl[:, None])))
    for i in range(3):
        assert np.abs(e[i] - e[i + 1]).max() > 1e-2  # Distinguishes close levels.
    np.testing.assert_allclose((e ** 2).reshape(4, 2, 8).sum(1), 1.0, rtol=1e-5)  # sin^2 + cos^2


def test_training_reduces_loss_and_uses_noise_level():
    keras.utils.set_random_seed(0)
    psi = build_psi(TINY, image_size=20)
    rng = np.random.default_rng(0)
    kde = np.zeros((4, 20, 20, 1), np.float32)
    kde[:, 8:12, 8:12] = 1.0
    gamma = np.array([0.9, 0.7, 0.5, 0.3], np.float32)
    eps = rng.standard_normal(kde.shape).astype(np.float32)
    y_t = q_sample(to_diffusion_space(kde), gamma, eps)
    inputs = {"y_t": y_t, "y_hat": tf.constant(kde), "noise_level": tf.constant(np.sqrt(gamma))}
    optimizer = keras.optimizers.Adam(2e-3)

    def step():  # Eager: tracing the gradient graph costs more than 8 tiny steps.
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(eps - psi(inputs, training=True)))
        grads = tape.gradient(loss, psi.trainable_variables)
        optimizer.apply_gradients(zip(grads, psi.trainable_variables))
        return loss

    losses = [float(step()) for _ in range(8)]
    assert losses[-1] < 0.9 * losses[0], losses
    other = dict(inputs, noise_level=tf.fill([4], 0.2))
    out_a = np.asarray(psi(inputs, training=False))
    out_b = np.asarray(psi(other, training=False))
    assert np.abs(out_a - out_b).max() > 1e-4


def test_save_and_load_weights(tmp_path):
    keras.utils.set_random_seed(1)
    psi = build_psi(TINY)
    rng = np.random.default_rng(2)
    psi.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype)
                     for w in psi.get_weights()])  # Non-zero output conv.
    batch = _batch(2, 20)
    out = np.asarray(psi(batch, training=False))
    assert np.abs(out).max() > 0
    path = tmp_path / "psi.weights.h5"
    psi.save_weights(path)
    clone = build_psi(PsiConfig.from_json(TINY.to_json()))
    assert not np.array_equal(np.asarray(clone(batch, training=False)), out)
    clone.load_weights(path)
    np.testing.assert_array_equal(np.asarray(clone(batch, training=False)), out)
    # The whole model (custom layers registered) also round-trips through .keras.
    psi.save(tmp_path / "psi.keras")
    loaded = keras.saving.load_model(tmp_path / "psi.keras")
    np.testing.assert_array_equal(np.asarray(loaded(batch, training=False)), out)


FRAMED = dataclasses.replace(TINY, frame_condition=True, frame_offset=100.0, frame_gain=2.0,
                             frame_readout_var=8.0, frame_upsample=4)


def test_frame_condition_is_unit_variance_signal_to_noise():
    """FrameCondition: 0 at zero photons; its noise has unit variance (x 0.1) at any brightness,
    for frames of the camera model (gain * Poisson + readout), each pixel repeated u x u."""
    from smlm_tfdiff.experimental.frame_condition import FrameCondition
    layer = FrameCondition(100.0, 2.0, 8.0, 4)
    rng = np.random.default_rng(0)
    n = 200_000
    # The transform's variance is 1 + O(1/photons) (approximate near zero photons, where the
    # readout dominates); its standard error over n draws is ~sqrt(2/n).
    for photons, bias in ((0.0, 0.2), (50.0, 0.03), (1000.0, 0.01)):
        counts = rng.poisson(photons + 0.0, n)
        adu = 2.0 * counts + 100.0 + np.sqrt(8.0) * rng.standard_normal(n)
        a = np.asarray(layer(adu.reshape(1, -1, 1, 1).astype(np.float32)))[0, ::4, 0, 0] / 0.1
        tol = bias + 5 * np.sqrt(2.0 / n)
        assert abs(a.var() - 1.0) < tol, (photons, a.var())
        if photons == 0.0:
            assert abs(a.mean()) < 0.3
        else:  # The mean grows as 2 sqrt(photons): the emitter's signal-to-noise ratio.
            # (minus the empty pixel's value; Jensen's bias is ~1 / (4 sqrt(photons))).
            want = 2 * np.sqrt(photons + 0.375 + 2.0) - 2 * np.sqrt(0.375 + 2.0)
            assert abs(a.mean() - want) < 0.05 + 1 / np.sqrt(photons)
    out = np.asarray(layer(np.arange(6, dtype=np.float32).reshape(1, 2, 3, 1) + 100.0))
    assert out.shape == (1, 8, 12, 1)
    np.testing.assert_array_equal(out[0, :4, :4, 0], out[0, 0, 0, 0])
    assert len(np.unique(out)) == 6


def test_frame_conditioned_psi_started_from_one_without_the_frame():
    """transfer_weights: the frame channel starts at zero, so the new psi computes exactly the
    old one's eps; once that channel has weight, the output depends on the frame."""
    from smlm_tfdiff.models.psi import transfer_weights
    base = build_psi(TINY)
    rng = np.random.default_rng(1)
    base.set_weights([w + 0.05 * rng.standard_normal(w.shape).astype(w.dtype)
                      for w in base.get_weights()])
    framed = build_psi(FRAMED)
    assert {i.name for i in framed.inputs} == {"y_t", "y_hat", "noise_level", "frame"}
    transfer_weights(base, framed)
    batch = _batch(3, 40)
    frames = {"frame": (100 + 2 * rng.poisson(30, (3, 10, 10, 1))).astype(np.float32)}
    want = np.asarray(base(batch, training=False))
    np.testing.assert_allclose(np.asarray(framed({**batch, **frames}, training=False)), want,
                               atol=1e-6)
    kernel, bias = framed.get_layer("conv_in").get_weights()
    kernel[:, :, 2, :] = 0.3
    framed.get_layer("conv_in").set_weights([kernel, bias])
    changed = np.asarray(framed({**batch, **frames}, training=False))
    assert np.abs(changed - want).max() > 1e-3
    assert FRAMED.same_network(TINY) and not FRAMED.same_network(
        dataclasses.replace(TINY, base_channels=16, groups=4))
    with pytest.raises(ValueError, match="conv_in|shape"):
        transfer_weights(build_psi(dataclasses.replace(TINY, base_channels=16)), framed)
    with pytest.raises(ValueError, match="divisible by 4"):
        check_input_size(22, 20, dataclasses.replace(FRAMED, channel_multipliers=(1,),
                                                     attention_resolutions=()))
    assert PsiConfig.from_json(FRAMED.to_json()) == FRAMED
    with pytest.raises(ValueError, match="frame_gain"):
        dataclasses.replace(FRAMED, frame_gain=0.0)


def test_space_to_depth_runs_the_unet_on_a_coarser_grid(tmp_path):
    """space_to_depth f: the U-Net sees f x f blocks as channels (no information pooled away),
    eps comes back on the KDE grid; sizes must divide by f x 2^(levels - 1); the blocks are
    ordered as tf.nn.space_to_depth orders them; weights round-trip through .weights.h5."""
    from smlm_tfdiff.models.psi import DepthToSpace, SpaceToDepth

    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    np.testing.assert_array_equal(SpaceToDepth(4)(x), tf.nn.space_to_depth(x, 4))
    np.testing.assert_array_equal(DepthToSpace(4)(SpaceToDepth(4)(x)), x)
    coarse = dataclasses.replace(TINY, space_to_depth=4, attention_resolutions=(), image_size=40)
    assert coarse.downsample_factor == 8 and coarse.resolutions == (10, 5)
    assert check_input_size(24, 40, coarse) == [(6, 10), (3, 5)]
    with pytest.raises(ValueError, match="4x coarser grid needs height and width divisible by 8"):
        check_input_size(20, 20, coarse)
    with pytest.raises(ValueError, match="space_to_depth"):
        dataclasses.replace(TINY, space_to_depth=0)
    assert not coarse.same_network(TINY)
    psi = build_psi(coarse)
    out = np.asarray(psi(_batch(2, 24)))
    assert out.shape == (2, 24, 24, 1)
    np.testing.assert_array_equal(out, 0.0)
    # A trained output conv puts its f^2 channels back into the f x f blocks.
    keras.utils.set_random_seed(1)
    conv = psi.get_layer("eps")
    conv.set_weights([np.random.default_rng(1).normal(0, 0.1, w.shape).astype(np.float32)
                      for w in conv.get_weights()])
    out = np.asarray(psi(_batch(2, 24)))
    assert np.std(out) > 0 and np.all(np.isfinite(out))
    path = str(tmp_path / "psi.weights.h5")
    psi.save_weights(path)
    again = build_psi(coarse)
    again.load_weights(path)
    np.testing.assert_allclose(np.asarray(again(_batch(2, 24))), out, rtol=1e-5, atol=1e-6)
    assert PsiConfig.from_json(coarse.to_json()) == coarse


def test_output_head_starts_as_no_change_and_gets_gradients():
    """output_head c: a psi on a coarser grid gains a head on the KDE grid. Given the weights of
    the same psi without it (transfer_weights) it computes the same eps, and the loss reaches
    every layer of the head (its zero output conv first: the head can learn from there). Its
    effect on a trained psi is measured in weights/wholefield_fast/MODEL.md."""
    coarse = dataclasses.replace(TINY, space_to_depth=4, attention_resolutions=(), image_size=32)
    headed = dataclasses.replace(coarse, output_head=8)
    assert headed.same_network(coarse) and PsiConfig.from_json(headed.to_json()) == headed
    with pytest.raises(ValueError, match="output_head must be >= 0"):
        dataclasses.replace(coarse, output_head=-1)
    keras.utils.set_random_seed(2)
    source = build_psi(coarse)
    conv = source.get_layer("eps")
    conv.set_weights([np.random.default_rng(2).normal(0, 0.1, w.shape).astype(np.float32)
                      for w in conv.get_weights()])
    target = build_psi(headed)
    transfer_weights(source, target)
    batch = _batch(2, 24)
    np.testing.assert_array_equal(np.asarray(target(batch)), np.asarray(source(batch)))
    head = [w for w in target.trainable_weights if w.path.startswith("head_")]
    assert len(head) == 14 and target.count_params() == source.count_params() + sum(
        int(np.prod(w.shape)) for w in head)
    eps = np.random.default_rng(3).standard_normal((2, 24, 24, 1)).astype(np.float32)
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean((target(batch, training=True) - eps) ** 2)
    grads = tape.gradient(loss, head)
    out = [g for g, w in zip(grads, head) if w.path.startswith("head_out")]
    assert all(float(tf.reduce_max(tf.abs(g))) > 0 for g in out)
