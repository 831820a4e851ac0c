"""The SavedModel of the phi -> psi sampler for TF Serving (smlm_tfdiff.serving and
export/export_savedmodel.py): same numbers as the in-package sampler, the serving contract
(signatures, request protos, REST body) and clear errors for bad requests.

One export per module, written by the script itself; 2 paper frames, 4 samples, 3 steps.
"""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

import smlm_tfdiff as st
from smlm_tfdiff.diffusion.sampler import PosteriorSampler, noise_levels
from smlm_tfdiff.serving import (POSTERIOR_INPUTS, SamplerModule, check_export_dir,
                                 describe_signatures, load_savedmodel, noise_levels_graph)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "export", "export_savedmodel.py")
NUM_SAMPLES, NUM_STEPS, SEED = 4, 3, (7, 11)
POSTERIOR_OUTPUTS = ("kde_estimate", "posterior_mean", "posterior_std")


def _run(args, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=300, **kwargs)


def _request(frames, num_samples=NUM_SAMPLES, num_steps=NUM_STEPS, seed=SEED):
    return {"frames": tf.constant(frames, tf.float32),
            "num_samples": tf.constant(num_samples, tf.int32),
            "num_steps": tf.constant(num_steps, tf.int32),
            "seed": tf.constant(seed, tf.int32)}


def _numpy(outputs):
    return {k: v.numpy() for k, v in outputs.items()}


@pytest.fixture(scope="module")
def models(paper_models):
    return paper_models


@pytest.fixture(scope="module")
def frames():
    return st.simulate(st.SimulationConfig.preset("paper"), 2, seed=3)["frames"].astype(np.float32)


@pytest.fixture(scope="module")
def export(tmp_path_factory, cli):
    """The script's export of the bundled paper model (run in this process): (base dir, version
    dir, script stderr)."""
    base = str(tmp_path_factory.mktemp("serving") / "smlm")
    result = cli(SCRIPT, "--export_dir", base)
    assert result.returncode == 0, result.stderr[-3000:]
    return base, os.path.join(base, "1"), result.stderr


@pytest.fixture(scope="module")
def served(export):
    return load_savedmodel(export[1])


@pytest.fixture(scope="module")
def sampled(served, frames):
    """The sample signature's outputs for (frames, NUM_SAMPLES, NUM_STEPS, SEED), NumPy."""
    return _numpy(served.loaded.signatures["sample"](**_request(frames)))


@pytest.fixture(scope="module")
def reference(models, frames):
    sampler = PosteriorSampler(models, jit_compile=False)
    return sampler(frames, NUM_SAMPLES, NUM_STEPS, seed=list(SEED), method="ddpm",
                   t_start=models.t_start, return_samples=True)


def test_noise_levels_graph_equal_numpy(models):
    schedule = models.schedule
    gamma = tf.constant(schedule.gamma, tf.float64)
    for t_start in (models.t_start, schedule.T):
        for num_steps in range(1, t_start + 1):
            gammas, steps = noise_levels_graph(gamma, num_steps, t_start)
            want_gammas, want_steps = noise_levels(schedule, num_steps, t_start)
            np.testing.assert_array_equal(steps.numpy(), want_steps, err_msg=f"{num_steps}")
            np.testing.assert_array_equal(gammas.numpy(), want_gammas, err_msg=f"{num_steps}")


def test_script_writes_version_folder_and_logs_signatures(export):
    base, version_dir, log = export
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert os.listdir(base) == ["1"]  # No temporary folder left behind.
    assert sorted(os.listdir(os.path.join(version_dir, "assets"))) == [
        "diffusion.json", "psi_config.json", "sim_config.json"]
    for name in ("serving_default", "sample", "estimate", "config"):
        assert f"signature '{name}'" in log


def test_script_refuses_to_overwrite(export, cli):
    base, version_dir, _ = export

    def snapshot():
        with open(os.path.join(version_dir, "saved_model.pb"), "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        return digest, sorted(os.listdir(version_dir)), sorted(os.listdir(base))

    before = snapshot()
    result = cli(SCRIPT, "--export_dir", base)
    assert result.returncode != 0
    assert "exists and is not empty" in result.stderr and "--overwrite" in result.stderr
    assert snapshot() == before


def test_check_export_dir(tmp_path):
    check_export_dir(str(tmp_path / "new"))
    check_export_dir(str(tmp_path))  # Empty: fine.
    (tmp_path / "saved_model.pb").write_bytes(b"")
    with pytest.raises(FileExistsError, match="not empty"):
        check_export_dir(str(tmp_path))
    check_export_dir(str(tmp_path), overwrite=True)
    with pytest.raises(FileExistsError, match="not a folder"):
        check_export_dir(str(tmp_path / "saved_model.pb"), overwrite=True)


def test_sample_equals_in_package_sampler(sampled, reference):
    pairs = {"kde_estimate": "y_hat", "posterior_mean": "mean", "posterior_std": "std",
             "samples": "samples"}
    for name, key in pairs.items():
        assert sampled[name].shape == reference[key].shape, name
        np.testing.assert_allclose(sampled[name], reference[key], atol=1e-5, rtol=0, err_msg=name)
    assert sampled["samples"].shape == (2, NUM_SAMPLES, 80, 80, 1)


def test_serving_default_equals_sample(served, frames, sampled):
    out = _numpy(served.loaded.signatures["serving_default"](**_request(frames)))
    assert sorted(out) == sorted(POSTERIOR_OUTPUTS)
    for name in POSTERIOR_OUTPUTS:
        np.testing.assert_array_equal(out[name], sampled[name], err_msg=name)
    np.testing.assert_allclose(out["posterior_std"], sampled["samples"].std(axis=1), atol=1e-6)


def test_estimate_equals_phi(served, models, frames):
    out = served.loaded.signatures["estimate"](frames=tf.constant(frames))
    np.testing.assert_allclose(out["kde_estimate"].numpy(),
                               models.phi(frames, training=False).numpy(), atol=1e-6, rtol=0)


def test_seed_determines_samples(served, frames, sampled):
    sample = served.loaded.signatures["sample"]
    again = _numpy(sample(**_request(frames)))
    for name in sampled:
        np.testing.assert_array_equal(again[name], sampled[name], err_msg=name)
    other = _numpy(sample(**_request(frames, seed=(7, 12))))
    assert np.abs(other["samples"] - sampled["samples"]).max() > 1e-3
    np.testing.assert_array_equal(other["kde_estimate"], sampled["kde_estimate"])


def test_load_savedmodel_interchangeable_with_sampler(served, models, frames, reference):
    assert served.sim_config == models.config
    assert served.psi_config_json == models.psi_config.to_json()
    assert (served.method, served.t_start) == ("ddpm", models.t_start)
    out = served.posterior(frames, NUM_SAMPLES, NUM_STEPS, seed=list(SEED), return_samples=True)
    assert sorted(out) == sorted(reference)
    for key in ("y_hat", "mean", "std", "samples"):
        np.testing.assert_allclose(out[key], reference[key], atol=1e-5, rtol=0, err_msg=key)
    np.testing.assert_array_equal(out["steps"], reference["steps"])
    assert out["nfe_per_frame"] == reference["nfe_per_frame"]
    np.testing.assert_allclose(served.estimate(frames[:, :, :, 0]), reference["y_hat"], atol=1e-6)


def test_load_savedmodel_missing(export, tmp_path):
    with pytest.raises(FileNotFoundError, match="no saved_model.pb"):
        load_savedmodel(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="holds the versions"):
        load_savedmodel(export[0])


def test_config_round_trips(served, models):
    loaded = served.loaded
    config = {k: v.numpy().decode() for k, v in loaded.signatures["config"]().items()}
    assert sorted(config) == ["diffusion_json", "psi_config_json", "sim_config_json"]
    with open(loaded.sim_config_asset.asset_path.numpy().decode()) as f:
        asset_text = f.read()
    texts = (config["sim_config_json"], loaded.sim_config_json.numpy().decode(), asset_text)
    for text in texts:
        assert st.SimulationConfig.from_json(text) == models.config
    assert config["psi_config_json"] == models.psi_config.to_json()
    diffusion = json.loads(config["diffusion_json"])
    assert diffusion["schedule"] == models.schedule.get_config()
    assert (diffusion["t_start"], diffusion["method"]) == (models.t_start, "ddpm")
    assert diffusion["num_steps"] == models.num_steps == served.num_steps == 10
    assert int(loaded.t_start.numpy()) == models.t_start


BAD_REQUESTS = {  # case -> what the error message must say.
    "rank3": "rank 4",
    "odd_height": "multiples of 2.*got 19x20.*pad or crop",
    "nan": "frames contain NaN or Inf",
    "no_samples": "num_samples must be >= 1",
    "no_steps": r"num_steps must lie in 1\.\.t_start = 1\.\.100 \(got 0\)",
    "too_many_steps": r"num_steps must lie in 1\.\.t_start = 1\.\.100 \(got 101\)",
    "too_many_images": r"2 frames x 1000000 samples = 2000000 images of psi, above the limit of "
                       r"this export, 2048 per request.*--max_images",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_raises_invalid_argument(served, frames, case):
    request = _request(frames)
    if case == "rank3":
        request["frames"] = tf.constant(frames[0])
    elif case == "odd_height":
        request["frames"] = tf.constant(frames[:, :19])
    elif case == "nan":
        bad = frames.copy()
        bad[1, 4, 5, 0] = np.nan
        request["frames"] = tf.constant(bad)
    elif case == "no_samples":
        request["num_samples"] = tf.constant(0)
    elif case == "too_many_images":  # Refused before any work (no out-of-memory).
        request["num_samples"] = tf.constant(1_000_000)
    elif case == "no_steps":
        request["num_steps"] = tf.constant(0)
    else:
        request["num_steps"] = tf.constant(101)
    with pytest.raises(tf.errors.InvalidArgumentError, match=BAD_REQUESTS[case]):
        served.loaded.signatures["serving_default"](**request)


def test_estimate_rejects_nan(served, frames):
    bad = frames.copy()
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="frames contain NaN or Inf"):
        served.loaded.signatures["estimate"](frames=tf.constant(bad))


def test_fresh_process_loads_and_calls_every_signature(export, models, frames, sampled, tmp_path):
    """Only TensorFlow in the child: the SavedModel does not need smlm_tfdiff to run."""
    np.save(tmp_path / "frames.npy", frames)
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import tensorflow as tf
        assert "smlm_tfdiff" not in sys.modules
        loaded = tf.saved_model.load({export[1]!r})
        frames = tf.constant(np.load({str(tmp_path / "frames.npy")!r}))
        request = dict(frames=frames, num_samples=tf.constant({NUM_SAMPLES}),
                       num_steps=tf.constant({NUM_STEPS}), seed=tf.constant({list(SEED)}))
        arrays = {{}}
        for name in ("serving_default", "sample"):
            for key, value in loaded.signatures[name](**request).items():
                arrays[name + "/" + key] = value.numpy()
        arrays["estimate/kde_estimate"] = loaded.signatures["estimate"](
            frames=frames)["kde_estimate"].numpy()
        np.savez({str(tmp_path / "out.npz")!r}, **arrays)
        config = loaded.signatures["config"]()
        print(json.dumps({{k: v.numpy().decode() for k, v in config.items()}}))
    """)
    result = _run([sys.executable, "-c", code], cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads(result.stdout.strip().splitlines()[-1])
    assert st.SimulationConfig.from_json(config["sim_config_json"]) == models.config
    out = dict(np.load(tmp_path / "out.npz"))
    assert sorted(out) == sorted([f"serving_default/{k}" for k in POSTERIOR_OUTPUTS]
                                 + [f"sample/{k}" for k in sampled]
                                 + ["estimate/kde_estimate"])
    for key, value in out.items():
        name = key.split("/")[1]
        np.testing.assert_allclose(value, sampled[name], atol=1e-6, rtol=0, err_msg=key)


def test_saved_model_cli_lists_signatures(export):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed next to this python")
    result = _run([cli, "show", "--all", "--dir", export[1]])
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    blocks = {}
    for block in text.split("signature_def['")[1:]:
        name, body = block.split("']", 1)
        blocks[name] = body
    assert {"serving_default", "sample", "estimate", "config"} <= set(blocks)
    inputs_of = {
        "serving_default": POSTERIOR_INPUTS, "sample": POSTERIOR_INPUTS, "estimate": ("frames",)}
    outputs_of = {"serving_default": POSTERIOR_OUTPUTS,
                  "sample": POSTERIOR_OUTPUTS + ("samples",), "estimate": ("kde_estimate",),
                  "config": ("sim_config_json", "psi_config_json", "diffusion_json")}
    for name, outputs in outputs_of.items():
        for key in inputs_of.get(name, ()):
            assert f"inputs['{key}']" in blocks[name], (name, key)
        for key in outputs:
            assert f"outputs['{key}']" in blocks[name], (name, key)
        assert "tensorflow/serving/predict" in blocks[name]
    # The same contract as read from the proto by the library.
    described = describe_signatures(export[1])
    assert described["serving_default"]["inputs"]["seed"] == ("int32", [2])
    assert described["sample"]["outputs"]["samples"] == ("float32", [-1, -1, -1, -1, 1])


def test_serving_api_request_round_trip(served, frames, sampled):
    pytest.importorskip("tensorflow_serving")
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    assert hasattr(prediction_service_pb2_grpc, "PredictionServiceStub")
    signature = served.loaded.signatures["serving_default"]
    arrays = {"frames": frames, "num_samples": np.int32(NUM_SAMPLES),
              "num_steps": np.int32(NUM_STEPS), "seed": np.array(SEED, np.int32)}

    # gRPC: PredictRequest proto, serialised and parsed as the server would.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "smlm"
    request.model_spec.signature_name = "serving_default"
    for key, value in arrays.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    parsed = predict_pb2.PredictRequest.FromString(request.SerializeToString())
    assert parsed.model_spec.signature_name == "serving_default"
    assert sorted(parsed.inputs) == sorted(POSTERIOR_INPUTS)
    received = {k: tf.make_ndarray(v) for k, v in parsed.inputs.items()}
    for key, value in arrays.items():
        assert received[key].dtype == np.asarray(value).dtype, key
        np.testing.assert_array_equal(received[key], value)
    out = signature(**{k: tf.constant(v) for k, v in received.items()})
    for name in POSTERIOR_OUTPUTS:
        np.testing.assert_array_equal(out[name].numpy(), sampled[name], err_msg=name)

    # REST: the columnar "inputs" body of POST /v1/models/smlm:predict.
    body = json.dumps({"signature_name": "serving_default",
                       "inputs": {"frames": frames.tolist(), "num_samples": NUM_SAMPLES,
                                  "num_steps": NUM_STEPS, "seed": list(SEED)}})
    decoded = json.loads(body)
    assert decoded["signature_name"] == "serving_default"
    inputs = decoded["inputs"]
    rest_frames = np.asarray(inputs["frames"], np.float32)
    np.testing.assert_array_equal(rest_frames, frames)
    assert np.asarray(inputs["seed"], np.int32).tolist() == list(SEED)
    out = signature(frames=tf.constant(rest_frames), num_samples=tf.constant(inputs["num_samples"]),
                    num_steps=tf.constant(inputs["num_steps"]),
                    seed=tf.constant(inputs["seed"], tf.int32))
    np.testing.assert_array_equal(out["posterior_mean"].numpy(), sampled["posterior_mean"])


def test_diffusion_json_of_an_older_export_still_reads(models):
    """A SavedModel's diffusion.json is the recipe's plus export-only keys, which Recipe.from_dict
    ignores, also the "reverse_variance" of exports written before the learned reverse variance
    was removed (docs/sampler.md)."""
    from smlm_tfdiff.diffusion.recipe import Recipe
    module = SamplerModule(models, t_start=10)
    diffusion = json.loads(module.diffusion_json.numpy())
    assert "reverse_variance" not in diffusion
    for extra in ({}, {"reverse_variance": "fixed"}):
        recipe = Recipe.from_dict({**diffusion, **extra})
        assert (recipe.t_start, recipe.method) == (10, "ddpm")
    with pytest.raises(ValueError, match="unknown keys"):
        Recipe.from_dict({**diffusion, "reverse_varience": "fixed"})


def test_module_equals_the_in_package_sampler_for_ddim_and_a_frame_conditioned_psi(models,
                                                                                  frames):
    """method and t_start are export-time choices, and a psi conditioned on the frame
    (PsiConfig.frame_condition) gets the request's frames beside phi's estimate, as the
    in-package sampler gives them (checked on the module without saving)."""
    import dataclasses

    from smlm_tfdiff.experimental.frame_condition import frame_condition_fields
    from smlm_tfdiff.models.psi import build_psi, transfer_weights
    config = dataclasses.replace(models.psi_config, **frame_condition_fields(models.config))
    psi = build_psi(config)
    transfer_weights(models.psi, psi)
    kernel, bias = psi.get_layer("conv_in").get_weights()
    kernel[:, :, 2] = 0.05  # The frame now matters.
    psi.get_layer("conv_in").set_weights([kernel, bias])
    framed = dataclasses.replace(models, psi=psi, psi_config=config)
    module = SamplerModule(framed, method="ddim", t_start=10)
    out = _numpy(module.sample(**_request(frames[:1], num_samples=2, num_steps=2)))
    kw = dict(seed=list(SEED), method="ddim", t_start=10, return_samples=True)
    ref = PosteriorSampler(framed, jit_compile=False)(frames[:1], 2, 2, **kw)
    np.testing.assert_allclose(out["samples"], ref["samples"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(out["posterior_std"], ref["std"], atol=1e-5, rtol=0)
    plain = PosteriorSampler(models, jit_compile=False)(frames[:1], 2, 2, **kw)
    assert np.abs(plain["samples"] - ref["samples"]).max() > 1e-3
    with pytest.raises(tf.errors.InvalidArgumentError, match="1..10"):
        module.sample(**_request(frames[:1], num_samples=2, num_steps=11))


def test_analyze_on_the_export_gives_the_same_localizations(export, backend, tmp_path):
    """analyze with the SavedModel (its base folder of versions) finds what the in-package
    backend finds: same frames, positions within 0.5 nm."""
    import csv

    import tifffile

    from smlm_tfdiff.analyze import Camera, StackAnalyzer, load_backend

    served = load_backend(export[0])
    assert served.config == backend.config
    data = st.simulate(st.SimulationConfig.preset("paper"), 2, seed=5)
    tifffile.imwrite(tmp_path / "s.tif", data["frames"][..., 0], photometric="minisblack")
    tables = []
    for name, which in (("keras", backend), ("served", served)):
        analyzer = StackAnalyzer(which, Camera(100.0, 1.0), num_samples=2, num_steps=1,
                                 progress=False, maps=False)
        analyzer.analyze(tmp_path / "s.tif", tmp_path / name)
        with open(tmp_path / name / "s.csv") as f:
            tables.append(list(csv.DictReader(f)))
    assert len(tables[0]) == len(tables[1]) > 0
    for a, b in zip(*tables):
        assert a["frame"] == b["frame"]
        assert abs(float(a["x [nm]"]) - float(b["x [nm]"])) < 0.5
        assert abs(float(a["y [nm]"]) - float(b["y [nm]"])) < 0.5
