"""absl flags shared by the scripts (analyze, demo, trainers/, export/, benchmarks/), defined once.

Training scripts call `define_trainer_flags()` (the GPU trainers under JAX
`define_jax_trainer_flags()`); scripts that load a model and sample its posterior
call `define_model_flag()`, `define_sampling_flags()` and `define_seed_flag()` with their own
defaults. None is required here: scripts mark what they require with `flags.mark_flag_as_required`.
"""

import json
import os

from absl import app, flags

from smlm_tfdiff.simulation.config import PRESETS

FLAGS = flags.FLAGS
METHODS = ("ddpm", "ddim")


def _key_flags(*names):
    """List the flags in the script's --help (absl lists the key flags of the module named
    sys.argv[0]; flags defined here would otherwise only show under --helpfull)."""
    import sys

    for name in names:
        FLAGS.register_key_flag_for_module(sys.argv[0], FLAGS[name])


def define_model_flag(default="paper", savedmodel=False, needs_psi=True):
    """--model: a bundled model name or a folder (and a SavedModel folder where `savedmodel`)."""
    what = "phi and psi" if needs_psi else "phi"
    flags.DEFINE_string(
        "model", default, "A bundled model name (smlm_tfdiff.pretrained.available(): 'paper', "
        f"'paper_wide', ...) or a model / training-run folder with {what}"
        + (", or a SavedModel folder (export/export_savedmodel.py)" if savedmodel else "") + ".")
    _key_flags("model")


def define_sampling_flags(num_samples=16, num_steps=None, method="ddpm"):
    """--num_samples, --num_steps, --jit_compile and --method of psi's posterior sampler.
    num_steps=None: the model's own default (diffusion.json); method=None leaves --method out."""
    flags.DEFINE_integer("num_samples", num_samples, "Posterior samples per frame.")
    flags.DEFINE_integer("num_steps", num_steps, "Reverse diffusion steps per sample"
                         + (" (default: the model's, from its diffusion.json)."
                            if num_steps is None else "."))
    flags.DEFINE_bool("jit_compile", True, "Compile psi's sampling loop with XLA, once per "
                      "batch shape (5-9 s each on 2 CPU cores, then 2-17% faster); "
                      "--nojit_compile traces it once for all shapes and starts sooner on a "
                      "short run.")
    _key_flags("num_samples", "num_steps", "jit_compile")
    if method is not None:
        flags.DEFINE_enum("method", method, list(METHODS), "Reverse sampler: ddpm (ancestral, "
                          "eta 1; the bundled models' recipe) or ddim (deterministic, eta 0).")
        _key_flags("method")


def define_seed_flag(default, help_text="Seed (same seed, same output)."):
    flags.DEFINE_integer("seed", default, help_text)
    _key_flags("seed")


def apply_overrides(config, assignments):
    """config with FIELD=VALUE assignments applied (VALUE is JSON; a bare word is a string)."""
    changes = {}
    for item in assignments:
        field, sep, text = item.partition("=")
        field = field.strip()
        if not sep or not field:
            raise app.UsageError(f"--set takes FIELD=VALUE (got {item!r})")
        if field not in config.to_dict():
            raise app.UsageError(f"--set: unknown SimulationConfig field {field!r}; fields: "
                                 f"{sorted(config.to_dict())}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        changes[field] = tuple(value) if isinstance(value, list) and field not in (
            "gain", "offset", "readout_var", "background") else value
    try:
        return config.replace(**changes)
    except (TypeError, ValueError) as err:
        raise app.UsageError(f"--set gives an invalid config: {err}") from None


def sim_config_from_flags(base=None):
    """The training SimulationConfig: --sim_config file, else `base`, else --preset; then --set."""
    from smlm_tfdiff.simulation.config import SimulationConfig

    if FLAGS.sim_config:
        if not os.path.exists(FLAGS.sim_config):
            raise app.UsageError(f"--sim_config {FLAGS.sim_config!r} does not exist")
        with open(FLAGS.sim_config) as f:
            config = SimulationConfig.from_json(f.read())
    else:
        config = base if base is not None else SimulationConfig.preset(FLAGS.preset)
    return apply_overrides(config, FLAGS.set)


def define_trainer_flags(steps=10000, batch_size=64, learning_rate=1e-3, ema_decay=None):
    from smlm_tfdiff.models.training import STRATEGIES

    flags.DEFINE_string("out_dir", None, "Run folder: checkpoints, TensorBoard events, weights.")
    flags.DEFINE_enum("preset", "paper", sorted(PRESETS), "Simulation preset to train on.")
    flags.DEFINE_string("sim_config", None, "A SimulationConfig JSON file (your camera, optics and "
                        "scene; e.g. a model's sim_config.json) instead of --preset.")
    flags.DEFINE_multi_string("set", [], "Override one SimulationConfig field, FIELD=VALUE with a "
                              "JSON value, repeatable: --set gain=2.5 --set offset=400 "
                              "--set photons_range=[100,1000].")
    flags.DEFINE_integer("steps", steps, "Total training steps (raise it to extend a finished run).")
    flags.DEFINE_integer("batch_size", batch_size, "Global batch size (split across replicas).")
    flags.DEFINE_float("learning_rate", learning_rate, "Peak learning rate (AdamW).")
    flags.DEFINE_enum("schedule", "cosine", ["cosine", "constant"], "Learning-rate schedule.")
    flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps of the cosine schedule.")
    flags.DEFINE_float("weight_decay", 0.0, "AdamW weight decay.")
    flags.DEFINE_float("clipnorm", 1.0, "Gradient norm clip (0 disables).")
    flags.DEFINE_float("ema_decay", ema_decay, "EMA decay of the weights (unset: no EMA).")
    define_seed_flag(0, "Training-data seed.")
    flags.DEFINE_integer("val_seed", 10_000, "Seed of the fixed validation set.")
    flags.DEFINE_integer("val_frames", 256, "Frames in the fixed validation set.")
    flags.DEFINE_integer("num_replicas", 0, "0: all GPUs or the default strategy on a CPU; n: "
                         "MirroredStrategy over n devices (n logical CPU devices without a GPU).")
    flags.DEFINE_enum("strategy", "auto", list(STRATEGIES), "auto: MultiWorkerMirroredStrategy "
                      "when TF_CONFIG names several workers, else as --num_replicas says; default: "
                      "one device; mirrored: MirroredStrategy; multi_worker: over TF_CONFIG.")
    flags.DEFINE_integer("log_every", 50, "Steps between TensorBoard scalars.")
    flags.DEFINE_integer("eval_every", 500, "Steps between validation runs.")
    flags.DEFINE_integer("checkpoint_every", 500, "Steps between checkpoints.")
    flags.DEFINE_bool("resume", True, "Resume from the latest checkpoint in --out_dir. With "
                      "--noresume an --out_dir that already holds checkpoints is an error.")
    flags.DEFINE_bool("progress", True, "Show a progress bar.")
    flags.DEFINE_bool("jit_compile", False, "Compile the training step with XLA.")
    # Every flag this module has defined (the trainer flags above, --seed, and whichever of
    # --model / --num_samples / ... the script defined before) is a key flag of the script.
    _key_flags(*(flag.name for flag in FLAGS.get_flags_for_module(__name__)))


def trainer_config_from_flags():
    """The TrainerConfig the flags ask for; with --noresume an --out_dir that already holds
    checkpoints is a usage error.

    Call it after make_strategy: on a non-chief worker of a multi-worker run, out_dir is that
    worker's scratch folder (so what the script writes at the end never clashes with the chief's
    files) and run_dir the shared --out_dir. Returns a models.training.TrainerConfig."""
    from smlm_tfdiff.models.training import TrainerConfig, worker_out_dir

    f = flags.FLAGS
    out_dir = worker_out_dir(f.out_dir)
    ckpt_dir = os.path.join(f.out_dir, "checkpoints")
    if not f.resume and os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise app.UsageError(f"{ckpt_dir} already holds checkpoints and --noresume was given; "
                             "choose a new --out_dir or delete it")
    return TrainerConfig(
        out_dir=out_dir, run_dir=None if out_dir == f.out_dir else f.out_dir, steps=f.steps,
        batch_size=f.batch_size, learning_rate=f.learning_rate,
        schedule=f.schedule, warmup_steps=f.warmup_steps, weight_decay=f.weight_decay,
        clipnorm=f.clipnorm or None, ema_decay=f.ema_decay, log_every=f.log_every,
        eval_every=f.eval_every, checkpoint_every=f.checkpoint_every, seed=f.seed,
        progress=f.progress, jit_compile=f.jit_compile)


def define_jax_trainer_flags(batch_size=128, learning_rate=1e-3):
    """The loop flags of the JAX trainers (trainers/train_*_jax.py; models/training_jax.py)."""
    flags.DEFINE_string("out_dir", None, "Model folder to write (load_models / load_phi read it).")
    flags.DEFINE_integer("batch_size", batch_size, "Global batch.")
    flags.DEFINE_float("learning_rate", learning_rate, "Peak learning rate (AdamW).")
    flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps.")
    flags.DEFINE_float("ema_decay", 0.999, "EMA decay of the exported weights.")
    flags.DEFINE_integer("steps", 100000, "Steps (the most, when --time_budget_s is set).")
    flags.DEFINE_float("time_budget_s", None, "Wall clock for the whole run; sizes the schedule.")
    flags.DEFINE_float("checkpoint_every_s", 60.0, "Seconds between weight saves.")
    flags.DEFINE_integer("log_every", 100, "Steps between log lines.")
    flags.DEFINE_integer("eval_every", 2000, "Steps between validations.")
    flags.DEFINE_integer("val_frames", 256, "Validation frames.")
    define_seed_flag(0, "Training seed.")
    flags.DEFINE_string("state_dir", None, "Save the full training state here (resumable).")
    flags.mark_flag_as_required("out_dir")
    _key_flags(*(flag.name for flag in FLAGS.get_flags_for_module(__name__)))


def require_jax_backend(tensorflow_script):
    """A usage error unless Keras runs on JAX (the JAX trainers; `tensorflow_script` is their
    TensorFlow twin, named in the message)."""
    import keras

    if keras.backend.backend() != "jax":
        raise app.UsageError(f"run with KERAS_BACKEND=jax (the backend is "
                             f"{keras.backend.backend()!r}); {tensorflow_script} trains with "
                             "TensorFlow")


def jax_trainer_config_from_flags():
    """The models.training_jax.JaxTrainConfig the JAX trainer flags ask for."""
    from smlm_tfdiff.models.training_jax import JaxTrainConfig

    f = flags.FLAGS
    return JaxTrainConfig(
        out_dir=f.out_dir, batch_size=f.batch_size, learning_rate=f.learning_rate,
        warmup_steps=f.warmup_steps, ema_decay=f.ema_decay, max_steps=f.steps,
        time_budget_s=f.time_budget_s, checkpoint_every_s=f.checkpoint_every_s,
        log_every=f.log_every, eval_every=f.eval_every, seed=f.seed,
        val_frames=f.val_frames, state_dir=f.state_dir)


def define_phi_flags(dropout=False):
    """phi's architecture flags (trainers/train_phi.py, train_phi_jax.py) and --init_phi."""
    flags.DEFINE_integer("context_filters", 32, "phi: channels of the context module.")
    flags.DEFINE_list("dilations", ["1", "2", "4", "8", "4", "2"], "phi: dilation rates.")
    flags.DEFINE_list("upsample_filters", ["16", "8"], "phi: channels of the 2x resize-convs.")
    flags.DEFINE_integer("prediction_filters", 8, "phi: channels of the prediction blocks.")
    flags.DEFINE_enum("input_transform", "linear", ["linear", "anscombe"],
                      "phi's input: photons (linear, the seeds') or variance-stabilised photons "
                      "(anscombe: dim and bright frames look alike; models/phi.py).")
    flags.DEFINE_float("photon_scale", None, "Divisor of phi's input (default 20 for linear, 4 "
                       "for anscombe).")
    flags.DEFINE_float("brightness_reference", None, "phi reads frames scaled to this many "
                       "photons per emitter (N0 of each training frame; analyze estimates a "
                       "movie's N0): models/phi.py, PhiConfig.brightness_reference. Train with "
                       "a scene of one N0 per frame (--set photons_frame_spread=...).")
    flags.DEFINE_bool("spread_input", False, "phi is also told the spread (log-sd) of the "
                      "emitters' photons about N0 (with --brightness_reference; models/phi.py, "
                      "PhiConfig.spread_input). Train with a scene that draws it per frame "
                      "(--set photons_frame_spread=null --set "
                      "'photons_frame_spread_range=[0,0.6]').")
    if dropout:
        flags.DEFINE_float("dropout", 0.0, "phi: dropout after every context and upsampling "
                           "block (> 0 makes an MC-dropout model, "
                           "smlm_tfdiff.uncertainty.mc_dropout).")
    flags.DEFINE_string("init_phi", None, "Start from this phi's weights (a bundled name or a "
                        "folder; fine-tuning): the same widths required; dropout, input_transform, "
                        "photon_scale, brightness_reference and the dilation rates (as many) "
                        "may differ, and a phi told the spread starts from one that is not (the "
                        "spread's weights 0: the same function at first). Ignored on resume.")
    _key_flags("context_filters", "dilations", "upsample_filters", "prediction_filters",
               "input_transform", "photon_scale", "brightness_reference", "spread_input",
               "init_phi",
               *(["dropout"] if dropout else []))


def phi_config_from_flags():
    """The models.phi.PhiConfig the phi flags ask for."""
    from smlm_tfdiff.models.phi import PhiConfig

    f = flags.FLAGS
    photon_scale = f.photon_scale
    if photon_scale is None:
        photon_scale = 4.0 if f.input_transform == "anscombe" else 20.0
    return PhiConfig(context_filters=f.context_filters,
                     dilations=tuple(int(d) for d in f.dilations),
                     upsample_filters=tuple(int(v) for v in f.upsample_filters),
                     prediction_filters=f.prediction_filters,
                     photon_scale=photon_scale, input_transform=f.input_transform,
                     dropout=f.dropout if "dropout" in f else 0.0,
                     brightness_reference=f.brightness_reference,
                     spread_input=f.spread_input)


def init_phi_weights(phi_config):
    """The weights of --init_phi (None without it), checked against phi_config's widths."""
    import dataclasses

    if not flags.FLAGS.init_phi:
        return None
    from smlm_tfdiff.pretrained import load_phi_source

    init = load_phi_source(flags.FLAGS.init_phi)
    free = dict(dropout=0.0, input_transform="linear", photon_scale=1.0,
                brightness_reference=None, spread_input=False)
    if len(init.phi_config.dilations) == len(phi_config.dilations):
        free["dilations"] = phi_config.dilations  # The same kernels at other rates.
    if dataclasses.replace(init.phi_config, **free) != dataclasses.replace(phi_config, **free):
        raise app.UsageError(f"--init_phi {flags.FLAGS.init_phi!r} has {init.phi_config}, this "
                             f"run {phi_config}: set the phi flags to match its widths")
    if init.phi_config.spread_input and not phi_config.spread_input:
        raise app.UsageError(f"--init_phi {flags.FLAGS.init_phi!r} is told the spread of the "
                             "emitters' photons (spread_input); pass --spread_input too")
    if phi_config.spread_input and not init.phi_config.spread_input:
        from smlm_tfdiff.models.phi import add_spread_weights

        return add_spread_weights(init.phi)
    return init.phi.get_weights()
