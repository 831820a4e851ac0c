"""Shared fixtures and helpers of the test suite (no test module imports another).

The CPU is split into two logical devices before any TensorFlow op runs, as
`make_strategy(num_replicas=2)` does at the start of a training script: the trainers'
MirroredStrategy over 2 CPU replicas then runs in this process (`run_cli`) instead of a fresh
Python per call. Tests keep a subprocess only where the process boundary is what they test.
"""

import contextlib
import importlib.util
import io
import logging
import os
import signal
import sys
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _split_cpu(n=2):
    cpu = tf.config.list_physical_devices("CPU")[0]
    if len(tf.config.get_logical_device_configuration(cpu) or []) < n:
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * n)


_split_cpu()

import smlm_tfdiff as st  # noqa: E402
from smlm_tfdiff.analyze import load_backend as _load_backend  # noqa: E402
from smlm_tfdiff.models import training as _training  # noqa: E402

_make_strategy = _training.make_strategy
_STRATEGIES = {}


def shared_make_strategy(num_replicas=0, kind=None):
    """make_strategy, one strategy per (num_replicas, kind) for the session, as one program has:
    a second MirroredStrategy in a process restarts the collective instance keys, so its
    all-reduces clash with the first one's ("Shape mismatch in the collective instance")."""
    key = (num_replicas, kind or _training._strategy_flag())
    if key not in _STRATEGIES:
        _STRATEGIES[key] = _make_strategy(num_replicas, kind)
    _training._STRATEGY = _STRATEGIES[key]
    return _training._STRATEGY


# ------------------------------------------------------------------------------ shared objects
@pytest.fixture
def paper():
    return st.SimulationConfig.preset("paper")


@pytest.fixture(scope="session")
def paper_models():
    """The bundled paper model (phi, psi), loaded once; tests must not change its weights."""
    return st.pretrained("paper")


_BACKENDS = {}


def cached_load_backend(model="paper", method="ddpm", restart_t=None, restarts=1, need_psi=True,
                        jit_compile=True):
    """analyze.load_backend, one backend per bundled model, recipe and jit_compile for the whole
    session (its sampler is traced or compiled once per shape). Folders load afresh."""
    from smlm_tfdiff.pretrained import available

    if model not in available():
        return _load_backend(model, method, restart_t, restarts, need_psi, jit_compile)
    key = (model, method, restart_t, restarts if restart_t is not None else None, jit_compile)
    if key not in _BACKENDS:
        _BACKENDS[key] = _load_backend(model, method, restart_t, restarts,
                                       jit_compile=jit_compile)
    return _BACKENDS[key]


@pytest.fixture(scope="session")
def backend():
    """analyze's backend of the bundled paper model, loaded once, its psi loop without XLA:
    XLA compiles once per window count (5-9 s each on 2 cores), which short test movies never
    repay; `xla_backend` and the sampler's own tests cover the compiled loop."""
    return cached_load_backend("paper", jit_compile=False)


def write_small_movie(tmp_path, backend, seed, frames=2, side=24):
    """A `frames`-frame uint16 ImageJ stack of side x side px simulated with the backend model's
    camera (seed), written to tmp_path/movie.tif. Returns (config, path, analyze.Camera)."""
    import numpy as np
    import tifffile

    from smlm_tfdiff.analyze import Camera
    from smlm_tfdiff.simulation.simulate import simulate

    config = backend.config.replace(frame_height=side, frame_width=side,
                                    cluster_fraction=None)  # Uniform frames.
    data = simulate(config, frames, seed)
    path = tmp_path / "movie.tif"
    tifffile.imwrite(path, np.round(data["frames"][..., 0]).astype(np.uint16), imagej=True)
    return config, path, Camera(offset_adu=float(config.offset),
                                gain_adu_per_photon=float(config.gain))


@pytest.fixture
def small_movie(tmp_path):
    """write_small_movie into this test's tmp_path: small_movie(backend, seed)."""
    return lambda backend, seed, **kwargs: write_small_movie(tmp_path, backend, seed, **kwargs)


@pytest.fixture(scope="session")
def xla_backend():
    """analyze's default backend of the bundled paper model (XLA-compiled psi loop)."""
    return cached_load_backend("paper")


@pytest.fixture(scope="session")
def scalars():
    """scalars(folder, tag) -> [(step, value)] of a TensorBoard event folder ([] without tag)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(folder, tag):
        acc = EventAccumulator(folder, size_guidance={"tensors": 0})
        acc.Reload()
        if tag not in acc.Tags()["tensors"]:
            return []
        return [(e.step, float(tf.make_ndarray(e.tensor_proto))) for e in acc.Tensors(tag)]

    return read


# --------------------------------------------------------------- command-line programs in-process
class CliResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr

    def __repr__(self):
        return f"CliResult({self.returncode}, stderr=...{self.stderr[-2000:]!r})"


_SCRIPTS = 0


def _load_script(path):
    """Executes a script file as a fresh module (its absl flags are defined as it runs)."""
    global _SCRIPTS
    _SCRIPTS += 1
    name = f"_cli_{os.path.splitext(os.path.basename(path))[0]}_{_SCRIPTS}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _isolated_flags():
    """absl's global FLAGS as they were: flags defined inside are removed, values reset."""
    from absl import flags
    FLAGS = flags.FLAGS
    before = set(FLAGS)
    try:
        yield FLAGS
    finally:
        FLAGS.unparse_flags()
        for name in set(FLAGS) - before:
            delattr(FLAGS, name)


def _exit_status(exit):
    """The status of a SystemExit as the interpreter reports it at exit: a message (printed to
    stderr) is status 1, None is 0."""
    if isinstance(exit.code, str):
        print(exit.code, file=sys.stderr)
        return 1
    return exit.code or 0


def run_cli(program, *args):
    """Runs a command-line program's absl main in this process, as `app.run(main)` would with
    argv [program, *args]: program is a script path (trainers/..., export/...), "analyze"
    (python -m smlm_tfdiff.analyze, which gets the session's backend of a bundled model from
    cached_load_backend; pass --nojit_compile for the `backend` fixture's) or a module with
    define_flags() and main (e.g. "smlm_tfdiff.demo");
    the scripts' make_strategy is shared_make_strategy.
    Returns its exit status (SystemExit and app.UsageError handled as app.run does: a message on
    stderr, status 1; absl's verbosity INFO unless given), stdout, and stderr with the absl /
    TensorFlow log records (INFO and up) appended. An uncaught exception propagates."""
    from absl import app

    argv = [str(program), *map(str, args)]
    out, err, log = io.StringIO(), io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    loggers = [logging.getLogger(n) for n in ("absl", "tensorflow")]
    levels = [lg.level for lg in loggers]
    showwarning, sigterm = warnings.showwarning, signal.getsignal(signal.SIGTERM)
    # The records reach the root logger, or (a logger that does not propagate) the logger itself.
    targets = [logging.getLogger()] + [lg for lg in loggers if not lg.propagate]
    for target in targets:
        target.addHandler(handler)
    for lg in loggers:
        lg.setLevel(logging.INFO)
    code = 0
    try:
        with _isolated_flags() as FLAGS, contextlib.redirect_stdout(out), \
                contextlib.redirect_stderr(err), contextlib.ExitStack() as stack:
            stack.callback(setattr, _training, "make_strategy", _training.make_strategy)
            _training.make_strategy = shared_make_strategy
            if program == "analyze":  # With the session's backend of a bundled model.
                from smlm_tfdiff import analyze
                analyze.define_flags()
                stack.callback(setattr, analyze, "load_backend", analyze.load_backend)
                analyze.load_backend = cached_load_backend
                main = analyze.main
            elif program.endswith(".py"):
                main = _load_script(program).main
            else:  # A module of the package (python -m smlm_tfdiff.demo) with define_flags().
                module = importlib.import_module(program)
                module.define_flags()
                main = module.main
            try:
                try:
                    rest = FLAGS(argv)
                except flags_error() as e:
                    raise app.UsageError(str(e)) from None
                if FLAGS["verbosity"].using_default_value:
                    FLAGS.verbosity = 0  # INFO, as under app.run.
                main(rest)
            except app.UsageError as e:
                print(e, file=sys.stderr)
                code = e.exitcode
            except SystemExit as e:
                code = _exit_status(e)
    finally:
        for target in targets:
            target.removeHandler(handler)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        warnings.showwarning = showwarning
        signal.signal(signal.SIGTERM, sigterm)
    return CliResult(code, out.getvalue(), err.getvalue() + log.getvalue())


@pytest.fixture
def entry_point_run():
    """entry_point_run(run, argv): a console script's absl entry point (which calls app.run)
    run in this process; returns (exit status, stdout, stderr). absl's global FLAGS, the key
    flags it registers for this program and the root logger's handlers are restored after."""
    def call(run, argv):
        root = logging.getLogger()
        handlers = list(root.handlers)
        out, err = io.StringIO(), io.StringIO()
        code = 0
        try:
            with _isolated_flags() as FLAGS, contextlib.redirect_stdout(out), \
                    contextlib.redirect_stderr(err):
                key_flags = {k: list(v) for k, v in FLAGS.key_flags_by_module_dict().items()}
                try:
                    run(list(argv))
                except SystemExit as e:
                    code = _exit_status(e)
                finally:
                    FLAGS.key_flags_by_module_dict().clear()
                    FLAGS.key_flags_by_module_dict().update(key_flags)
        finally:
            for handler in set(root.handlers) - set(handlers):  # app.run's absl handler.
                root.removeHandler(handler)
        return code, out.getvalue(), err.getvalue()

    return call


def flags_error():
    from absl import flags
    return flags.Error


@pytest.fixture(scope="session")
def cli():
    """cli(program, *args) -> CliResult: a command-line program run in this process (run_cli)."""
    return run_cli
